//! Prediction files (`{"text_id": 1, "image_ids": [10 ids]}` per line) and their validation, in the
//! order and with the messages of cn_clip's `read_submission`.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use serde_json::Value;

use crate::direction::Direction;
use crate::error::EvalError;
use crate::ground_truth::{
    GroundTruth, as_id, keys_of, line_error, next_line_error, open, parse_json_line,
};
use crate::lines::UniversalLines;
use crate::pyfmt::{py_str, py_type_name};
use crate::recall::Rankings;

/// How strictly a prediction file is checked.
///
/// [`Validation::cn_clip`] (the default) accepts exactly what `evaluation.py` accepts: extra queries
/// are ignored and a repeated query keeps its last line. [`Validation::strict`] refuses both, for
/// submissions that should be exactly one line per ground-truth query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validation {
    /// Ids required per query (cn_clip: 10).
    pub k: usize,
    /// Accept lines whose query is not in the ground truth (and ignore them).
    pub allow_unknown_queries: bool,
    /// Accept several lines for one query (the last one counts).
    pub allow_repeated_queries: bool,
}

impl Validation {
    pub fn cn_clip() -> Self {
        Validation {
            k: 10,
            allow_unknown_queries: true,
            allow_repeated_queries: true,
        }
    }

    pub fn strict() -> Self {
        Validation {
            k: 10,
            allow_unknown_queries: false,
            allow_repeated_queries: false,
        }
    }
}

impl Default for Validation {
    fn default() -> Self {
        Validation::cn_clip()
    }
}

/// Validated predictions: the ranked ids of every query, plus what cn_clip would silently accept.
#[derive(Clone, Debug, Default)]
pub struct Predictions {
    rankings: HashMap<i64, Vec<i64>>,
    /// Prediction lines whose query is not in the ground truth (ignored for recall), ascending.
    pub unknown_queries: Vec<i64>,
    /// Queries that had more than one line (the last counted), ascending.
    pub repeated_queries: Vec<i64>,
}

impl Predictions {
    /// The ranking of `query`.
    pub fn ranking(&self, query: i64) -> Option<&[i64]> {
        self.rankings.get(&query).map(Vec::as_slice)
    }

    /// Number of queries with a prediction.
    pub fn len(&self) -> usize {
        self.rankings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rankings.is_empty()
    }

    /// Reads and validates a prediction file against `ground_truth`.
    ///
    /// Checks, in cn_clip's order, every line: JSON object; integer query id; a list of exactly `k`
    /// integer ids; no id twice. Then that every ground-truth query has a line. The first failure is
    /// returned.
    pub fn read(
        path: &Path,
        direction: Direction,
        ground_truth: &GroundTruth,
        validation: &Validation,
    ) -> Result<Self, EvalError> {
        // cn_clip checks `os.path.exists` first and has its own message for that.
        if !path.exists() {
            return Err(EvalError::Io {
                path: path.to_owned(),
                what: "predictions",
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                cn_clip: Value::from("The submission file is not found!"),
            });
        }
        Self::read_from(
            open(path, "predictions")?,
            path,
            direction,
            ground_truth,
            validation,
        )
    }

    /// [`Predictions::read`] over any reader; `name` is used in messages.
    pub fn read_from<R: Read>(
        reader: R,
        name: &Path,
        direction: Direction,
        ground_truth: &GroundTruth,
        validation: &Validation,
    ) -> Result<Self, EvalError> {
        let mut lines = UniversalLines::new(reader);
        let mut out = Predictions::default();
        let mut first_line: HashMap<i64, usize> = HashMap::new();
        let mut unknown: HashSet<i64> = HashSet::new();
        let mut repeated: HashSet<i64> = HashSet::new();
        // `evaluation.py` formats the *previous* line's `qid` in its invalid-text_id message (the
        // variable is assigned after the check); before any line it is unbound.
        let mut last_query: Option<i64> = None;
        while let Some(raw) = lines
            .next_line()
            .map_err(|e| next_line_error(name, direction, e))?
        {
            let (query, ids) = parse_prediction_line(
                name,
                raw.number,
                &raw.bytes,
                direction,
                validation.k,
                last_query,
            )?;
            last_query = Some(query);
            if ground_truth.relevant(query).is_none() {
                if !validation.allow_unknown_queries {
                    return Err(EvalError::UnknownQuery {
                        path: name.to_owned(),
                        line: raw.number,
                        query_key: direction.query_key(),
                        query,
                    });
                }
                unknown.insert(query);
            }
            if let Some(&first) = first_line.get(&query) {
                if !validation.allow_repeated_queries {
                    return Err(EvalError::RepeatedQuery {
                        path: name.to_owned(),
                        line: raw.number,
                        first_line: first,
                        query_key: direction.query_key(),
                        query,
                    });
                }
                repeated.insert(query);
            } else {
                first_line.insert(query, raw.number);
            }
            out.rankings.insert(query, ids);
        }
        let mut missing: Vec<i64> = ground_truth
            .queries()
            .filter(|q| !out.rankings.contains_key(q))
            .collect();
        if !missing.is_empty() {
            // cn_clip lists a Python set, whose order follows hash slots; ascending order is the
            // same for small ids and at least deterministic otherwise.
            missing.sort_unstable();
            let listed: Vec<String> = missing.iter().map(i64::to_string).collect();
            let cn_clip = format!(
                "The following {}s have no prediction in your submission, please check again: {}",
                direction.query_key(),
                listed.join(", ")
            );
            return Err(EvalError::MissingPredictions {
                path: name.to_owned(),
                query_key: direction.query_key(),
                ids: missing,
                cn_clip: Value::from(cn_clip),
            });
        }
        out.unknown_queries = unknown.into_iter().collect();
        out.unknown_queries.sort_unstable();
        out.repeated_queries = repeated.into_iter().collect();
        out.repeated_queries.sort_unstable();
        Ok(out)
    }
}

impl Rankings for Predictions {
    fn ranking(&self, query: i64) -> Option<&[i64]> {
        Predictions::ranking(self, query)
    }
}

fn parse_prediction_line(
    path: &Path,
    line: usize,
    bytes: &[u8],
    direction: Direction,
    k: usize,
    last_query: Option<i64>,
) -> Result<(i64, Vec<i64>), EvalError> {
    let qkey = direction.query_key();
    let value = parse_json_line(bytes).map_err(|(problem, text, utf8)| {
        let cn_clip = if utf8 {
            // UnicodeDecodeError's first argument is the codec name.
            "utf-8".to_owned()
        } else {
            format!("Cannot parse this line into json object: {text}")
        };
        line_error(path, line, direction, problem, Value::from(cn_clip))
    })?;
    let stripped = std::str::from_utf8(bytes)
        .map(crate::pyfmt::py_strip)
        .unwrap_or("");
    let not_containing =
        |what: &str| format!("There exists one line not containing {what}: {stripped}");

    let obj = match &value {
        Value::Object(obj) => obj,
        other => {
            // `"text_id" not in pred_obj` on a non-dict: membership in a list, a substring test on
            // a str, a TypeError on numbers, booleans and null.
            let cn_clip = match other {
                Value::Array(a) if a.iter().any(|v| v.as_str() == Some(qkey)) => {
                    "list indices must be integers or slices, not str".to_owned()
                }
                Value::Array(_) => not_containing(qkey),
                Value::String(s) if s.contains(qkey) => {
                    "string indices must be integers, not 'str'".to_owned()
                }
                Value::String(_) => not_containing(qkey),
                v => format!("argument of type '{}' is not iterable", py_type_name(v)),
            };
            let problem = format!(
                "found a JSON {}, expected an object with an integer \"{qkey}\" and a list \"{}\"",
                py_type_name(other),
                direction.items_key()
            );
            return Err(line_error(
                path,
                line,
                direction,
                problem,
                Value::from(cn_clip),
            ));
        }
    };
    let (qk, ik) = keys_of(obj, direction);
    let Some(qval) = obj.get(qk) else {
        let problem = format!("no \"{qkey}\", expected an integer \"{qkey}\" on every line");
        return Err(line_error(
            path,
            line,
            direction,
            problem,
            Value::from(not_containing(qkey)),
        ));
    };
    let Some(query) = as_id(qval) else {
        let cn_clip = match direction {
            Direction::TextToImage => match last_query {
                Some(q) => format!(
                    "Found an invalid text_id {q}, it should be an integer (not string), please check your schema"
                ),
                None => {
                    "cannot access local variable 'qid' where it is not associated with a value"
                        .to_owned()
                }
            },
            Direction::ImageToText => format!(
                "Found an invalid image_id {}, it should be an integer (not string), please check your schema",
                py_str(qval)
            ),
        };
        let problem = format!("\"{qk}\" is {qval}, expected an integer id");
        return Err(line_error(
            path,
            line,
            direction,
            problem,
            Value::from(cn_clip),
        ));
    };
    let title = direction.query_title();
    let err = |problem: String, cn_clip: String| EvalError::Line {
        path: path.to_owned(),
        line,
        query: Some(query),
        query_key: qkey,
        problem,
        cn_clip: Value::from(cn_clip),
    };
    let items_key = direction.items_key();
    let Some(ival) = obj.get(ik) else {
        return Err(err(
            format!("no \"{ik}\", expected a list of {k} ranked ids"),
            not_containing(&format!("the predicted {items_key}")),
        ));
    };
    let Value::Array(items) = ival else {
        return Err(err(
            format!("\"{ik}\" is {ival}, expected a list of {k} ranked ids"),
            format!(
                "The {items_key} field of {qkey} {query} is not a list, please check your schema"
            ),
        ));
    };
    if items.len() != k {
        return Err(err(
            format!("{} ids in \"{ik}\", expected exactly {k}", items.len()),
            format!(
                "{title} {query} has wrong number of predicted {items_key}! Require {k}, but {} founded.",
                items.len()
            ),
        ));
    }
    let mut ids = Vec::with_capacity(k);
    for (rank, item) in items.iter().enumerate() {
        match as_id(item) {
            Some(id) => ids.push(id),
            None => {
                let item_key = direction.item_key();
                return Err(err(
                    format!(
                        "\"{ik}\" has {item} at rank {}, expected an integer id",
                        rank + 1
                    ),
                    format!(
                        "{title} {query} has an invalid predicted {item_key} {} at rank {}, it should be an integer (not string), please check your schema",
                        py_str(item),
                        rank + 1
                    ),
                ));
            }
        }
    }
    let mut seen = HashSet::with_capacity(k);
    if let Some(dup) = ids.iter().find(|id| !seen.insert(**id)) {
        return Err(err(
            format!("id {dup} appears more than once in \"{ik}\", expected {k} distinct ids"),
            format!(
                "{title} {query} has duplicate topk {} in your prediction. Pleace check again!",
                direction.items_noun()
            ),
        ));
    }
    Ok((query, ids))
}
