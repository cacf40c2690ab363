//! Ground-truth annotation files and their text→image to image→text transform.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::direction::Direction;
use crate::error::EvalError;
use crate::lines::{LineError, UniversalLines};
use crate::pyfmt::{json_value, py_strip, py_type_name};

/// The relevant ids of every query, as cn_clip's `read_reference` builds them.
///
/// Queries keep the order of their first line; when a query appears on several lines the last line's
/// ids win (a Python dict assignment). The order does not change any recall; it is kept so that
/// callers listing per-query results see the file's order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroundTruth {
    order: Vec<i64>,
    relevant: HashMap<i64, Vec<i64>>,
}

impl GroundTruth {
    /// Builds ground truth from `(query, relevant ids)` pairs with the file rules: first-seen order,
    /// last pair wins.
    pub fn from_pairs<I: IntoIterator<Item = (i64, Vec<i64>)>>(pairs: I) -> Self {
        let mut gt = GroundTruth::default();
        for (query, ids) in pairs {
            gt.insert(query, ids);
        }
        gt
    }

    fn insert(&mut self, query: i64, ids: Vec<i64>) {
        if self.relevant.insert(query, ids).is_none() {
            self.order.push(query);
        }
    }

    /// Reads a ground-truth jsonl file: `{"text_id": 1, "image_ids": [..]}` per line (text→image),
    /// `{"image_id": 1, "text_ids": [..]}` (image→text), or Tianchi's
    /// `{"query_id": 1, "query_text": "…", "item_ids": [..]}` (text→image). Other keys are ignored.
    pub fn read(path: &Path, direction: Direction) -> Result<Self, EvalError> {
        let mut gt = GroundTruth::default();
        for_each_annotation(path, direction, |_, query, ids| gt.insert(query, ids))?;
        Ok(gt)
    }

    /// Number of distinct queries.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Queries in the order of their first line.
    pub fn queries(&self) -> impl ExactSizeIterator<Item = i64> + '_ {
        self.order.iter().copied()
    }

    /// The relevant ids of `query`, as written on its last line (duplicates kept).
    pub fn relevant(&self, query: i64) -> Option<&[i64]> {
        self.relevant.get(&query).map(Vec::as_slice)
    }
}

pub(crate) fn open(path: &Path, what: &'static str) -> Result<BufReader<File>, EvalError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|source| EvalError::Io {
            path: path.to_owned(),
            what,
            // cn_clip opens the ground truth without a check, so the script reports the exception's
            // first argument: the errno (2 for a missing file).
            cn_clip: source
                .raw_os_error()
                .map(Value::from)
                .unwrap_or_else(|| Value::from(source.to_string())),
            source,
        })
}

/// Reads an annotation file line by line and hands every line's `(line number, query, ids)` to `f`,
/// in file order, repeated queries included.
fn for_each_annotation(
    path: &Path,
    direction: Direction,
    mut f: impl FnMut(usize, i64, Vec<i64>),
) -> Result<(), EvalError> {
    let mut lines = UniversalLines::new(open(path, "ground truth")?);
    loop {
        let raw = lines
            .next_line()
            .map_err(|e| next_line_error(path, direction, e))?;
        let Some(raw) = raw else { break };
        let (query, ids) = parse_annotation_line(path, raw.number, &raw.bytes, direction)?;
        f(raw.number, query, ids);
    }
    Ok(())
}

/// A failure to produce the next line: an I/O error, or invalid UTF-8 (whose Python
/// `UnicodeDecodeError` has the codec name as its first argument, which is what cn_clip reports).
pub(crate) fn next_line_error(path: &Path, direction: Direction, e: LineError) -> EvalError {
    match e {
        LineError::Io(source) => EvalError::Io {
            path: path.to_owned(),
            what: "file",
            cn_clip: Value::from(source.to_string()),
            source,
        },
        LineError::Utf8 { line, offset } => line_error(
            path,
            line,
            direction,
            format!("invalid UTF-8 at byte {offset} of the file, expected UTF-8 text"),
            Value::from("utf-8"),
        ),
    }
}

/// A line-level error with no query known yet.
pub(crate) fn line_error(
    path: &Path,
    line: usize,
    direction: Direction,
    problem: String,
    cn_clip: Value,
) -> EvalError {
    EvalError::Line {
        path: path.to_owned(),
        line,
        query: None,
        query_key: direction.query_key(),
        problem,
        cn_clip,
    }
}

/// Decodes and parses one line as `json.loads(line.strip())` would. `Err` carries our message and
/// the stripped text (cn_clip quotes it in some messages).
pub(crate) fn parse_json_line(bytes: &[u8]) -> Result<Value, (String, String, bool)> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        (
            format!("not valid UTF-8 ({e})"),
            String::new(),
            true, // a decoding error, not a JSON one
        )
    })?;
    let stripped = py_strip(text);
    if stripped.is_empty() {
        return Err((
            "blank line, expected one JSON object per line".to_owned(),
            String::new(),
            false,
        ));
    }
    serde_json::from_str(stripped).map_err(|e| {
        (
            format!("not valid JSON ({e}), expected one JSON object per line"),
            stripped.to_owned(),
            false,
        )
    })
}

fn expected_schema(direction: Direction) -> String {
    let (q, items) = (direction.query_key(), direction.items_key());
    match direction.tianchi_keys() {
        Some((tq, ti)) => format!(
            "expected a JSON object with an integer \"{q}\" and a list \"{items}\" (or Tianchi's \"{tq}\" and \"{ti}\")"
        ),
        None => format!("expected a JSON object with an integer \"{q}\" and a list \"{items}\""),
    }
}

/// The keys this object uses: cn_clip's, or Tianchi's when cn_clip's query key is absent.
pub(crate) fn keys_of(
    obj: &Map<String, Value>,
    direction: Direction,
) -> (&'static str, &'static str) {
    match direction.tianchi_keys() {
        Some((tq, ti)) if !obj.contains_key(direction.query_key()) && obj.contains_key(tq) => {
            (tq, ti)
        }
        _ => (direction.query_key(), direction.items_key()),
    }
}

/// An id as cn_clip accepts it: a JSON integer. Booleans (which Python counts as the ints 0 and 1)
/// and integers beyond i64 are refused.
pub(crate) fn as_id(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn parse_annotation_line(
    path: &Path,
    line: usize,
    bytes: &[u8],
    direction: Direction,
) -> Result<(i64, Vec<i64>), EvalError> {
    let value = parse_json_line(bytes).map_err(|(problem, _, utf8)| {
        // Python's messages: UnicodeDecodeError's first argument is the codec name; json.loads('')
        // says "Expecting value: line 1 column 1 (char 0)". Other JSON errors have no
        // reproducible text and get ours.
        let cn_clip = if utf8 {
            Value::from("utf-8")
        } else if problem.starts_with("blank") {
            Value::from("Expecting value: line 1 column 1 (char 0)")
        } else {
            Value::from(problem.clone())
        };
        line_error(path, line, direction, problem, cn_clip)
    })?;
    let Value::Object(obj) = &value else {
        // `obj['text_id']` on a non-dict raises a TypeError.
        let cn_clip = match &value {
            Value::Array(_) => "list indices must be integers or slices, not str".to_owned(),
            Value::String(_) => "string indices must be integers, not 'str'".to_owned(),
            other => format!("'{}' object is not subscriptable", py_type_name(other)),
        };
        let problem = format!(
            "found a JSON {}, {}",
            py_type_name(&value),
            expected_schema(direction)
        );
        return Err(line_error(
            path,
            line,
            direction,
            problem,
            Value::from(cn_clip),
        ));
    };
    let (qkey, ikey) = keys_of(obj, direction);
    // cn_clip runs `reference[obj['text_id']] = obj['image_ids']`: Python evaluates the right-hand
    // side first, so a missing `image_ids` is reported before a missing `text_id`. A missing key
    // is a KeyError whose first argument is the key.
    let Some(ival) = obj.get(ikey) else {
        let problem = format!("no \"{ikey}\", {}", expected_schema(direction));
        return Err(line_error(
            path,
            line,
            direction,
            problem,
            Value::from(ikey),
        ));
    };
    let Some(qval) = obj.get(qkey) else {
        let problem = format!("no \"{qkey}\", {}", expected_schema(direction));
        return Err(line_error(
            path,
            line,
            direction,
            problem,
            Value::from(qkey),
        ));
    };
    let Some(query) = as_id(qval) else {
        let problem = format!("\"{qkey}\" is {qval}, expected an integer id");
        return Err(line_error(
            path,
            line,
            direction,
            problem.clone(),
            Value::from(problem),
        ));
    };
    let with_query = |problem: String| EvalError::Line {
        path: path.to_owned(),
        line,
        query: Some(query),
        query_key: direction.query_key(),
        cn_clip: Value::from(problem.clone()),
        problem,
    };
    let Value::Array(items) = ival else {
        return Err(with_query(format!(
            "\"{ikey}\" is {ival}, expected a list of integer ids"
        )));
    };
    let mut ids = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match as_id(item) {
            Some(id) => ids.push(id),
            None => {
                return Err(with_query(format!(
                    "\"{ikey}\"[{i}] is {item}, expected an integer id"
                )));
            }
        }
    }
    Ok((query, ids))
}

/// `transform_ir_annotation_to_tr.py`: turns text→image ground truth into image→text ground truth.
///
/// Every line counts (a text repeated on two lines is listed twice, unlike [`GroundTruth::read`]);
/// images come in the order of their first mention and each lists its texts in line order.
pub fn transform_ir_annotation_to_tr(input: &Path) -> Result<Vec<(i64, Vec<i64>)>, EvalError> {
    let mut order: Vec<i64> = Vec::new();
    let mut texts: HashMap<i64, Vec<i64>> = HashMap::new();
    for_each_annotation(input, Direction::TextToImage, |_, text_id, image_ids| {
        for image_id in image_ids {
            texts
                .entry(image_id)
                .or_insert_with(|| {
                    order.push(image_id);
                    Vec::new()
                })
                .push(text_id);
        }
    })?;
    Ok(order
        .into_iter()
        .map(|image| (image, texts.remove(&image).unwrap_or_default()))
        .collect())
}

/// The output path cn_clip's transform derives from its input:
/// `input.replace(".jsonl", "") + ".tr.jsonl"` (every `.jsonl` in the path is removed).
pub fn tr_annotation_path(input: &Path) -> Option<PathBuf> {
    let s = input.to_str()?;
    Some(PathBuf::from(format!(
        "{}.tr.jsonl",
        s.replace(".jsonl", "")
    )))
}

/// Writes image→text ground truth as cn_clip's transform does: one
/// `{"image_id": 1, "text_ids": [2, 3]}` line per image, `\n`-terminated.
pub fn write_tr_annotation(out: &Path, records: &[(i64, Vec<i64>)]) -> Result<(), EvalError> {
    let write_error = |source| EvalError::Write {
        path: out.to_owned(),
        what: "image→text annotation",
        source,
    };
    let mut w = BufWriter::new(File::create(out).map_err(write_error)?);
    let mut line = String::new();
    for (image_id, text_ids) in records {
        line.clear();
        let mut obj = Map::new();
        obj.insert("image_id".to_owned(), Value::from(*image_id));
        obj.insert("text_ids".to_owned(), Value::from(text_ids.clone()));
        // serde_json's Map is sorted; "image_id" < "text_ids", which is also cn_clip's order.
        json_value(&Value::Object(obj), &mut line);
        line.push('\n');
        w.write_all(line.as_bytes()).map_err(write_error)?;
    }
    w.flush().map_err(write_error)
}

/// Reads ground truth from any reader (for callers holding the bytes); `name` is used in messages.
pub fn read_ground_truth_from<R: Read>(
    reader: R,
    name: &Path,
    direction: Direction,
) -> Result<GroundTruth, EvalError> {
    let mut gt = GroundTruth::default();
    let mut lines = UniversalLines::new(reader);
    while let Some(raw) = lines
        .next_line()
        .map_err(|e| next_line_error(name, direction, e))?
    {
        let (query, ids) = parse_annotation_line(name, raw.number, &raw.bytes, direction)?;
        gt.insert(query, ids);
    }
    Ok(gt)
}
