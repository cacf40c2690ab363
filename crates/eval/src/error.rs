//! Errors, each with a clear message for people and the detail cn_clip's script would have written.

use std::path::PathBuf;

use serde_json::Value;

/// Everything that can go wrong while reading ground truth or predictions or computing recall.
///
/// `Display` names the file, the line and the query and says what was expected.
/// [`EvalError::cn_clip_detail`] is what `evaluation.py` puts into `errorDetail`/`errorMsg` for the
/// same input, so a score file written on failure matches cn_clip's byte for byte where cn_clip's
/// behaviour is deliberate (see the crate documentation for the cases where it is not).
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The file could not be opened or read.
    #[error("{}: cannot read {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        /// "ground truth", "predictions", …
        what: &'static str,
        #[source]
        source: std::io::Error,
        cn_clip: Value,
    },
    /// One line of a file is not what was expected.
    #[error("{}, line {line}: {}{problem}", path.display(), query_prefix(*query, query_key))]
    Line {
        path: PathBuf,
        /// 1-based, counting lines as Python's text mode does (`\n`, `\r\n` and `\r` end a line).
        line: usize,
        /// The id of the query (text or image) the line is about, once it is known.
        query: Option<i64>,
        /// `text_id` or `image_id`, naming the id in the message.
        query_key: &'static str,
        problem: String,
        cn_clip: Value,
    },
    /// Ground-truth queries without a prediction (every one needs exactly one).
    #[error(
        "{}: no prediction for {} ground-truth {query_key}(s): {}",
        path.display(),
        ids.len(),
        id_list(ids)
    )]
    MissingPredictions {
        path: PathBuf,
        query_key: &'static str,
        /// Ascending.
        ids: Vec<i64>,
        cn_clip: Value,
    },
    /// A prediction line for a query the ground truth does not have (strict validation only;
    /// cn_clip ignores such lines).
    #[error(
        "{}, line {line}: {query_key} {query} is not in the ground truth (strict validation rejects unknown queries)",
        path.display()
    )]
    UnknownQuery {
        path: PathBuf,
        line: usize,
        query_key: &'static str,
        query: i64,
    },
    /// A second prediction line for the same query (strict validation only; cn_clip keeps the last).
    #[error(
        "{}, line {line}: {query_key} {query} already has a prediction on line {first_line} (strict validation rejects repeated queries)",
        path.display()
    )]
    RepeatedQuery {
        path: PathBuf,
        line: usize,
        first_line: usize,
        query_key: &'static str,
        query: i64,
    },
    /// The ground truth has no query, so recall is undefined (cn_clip fails with "float division by zero").
    #[error("{source_name}: the ground truth has no query, recall is undefined")]
    EmptyGroundTruth { source_name: String },
    /// In-memory evaluation: a ground-truth query has no ranking.
    #[error("no ranking for ground-truth query {query}")]
    MissingRanking { query: i64 },
    /// A cut-off `k` of 0, or no cut-off at all.
    #[error("invalid recall cut-offs {ks:?}: expected at least one k, every k ≥ 1")]
    InvalidKs { ks: Vec<usize> },
    /// Writing an output file failed.
    #[error("{}: cannot write {what}: {source}", path.display())]
    Write {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn query_prefix(query: Option<i64>, key: &str) -> String {
    match query {
        Some(q) => format!("{key} {q}: "),
        None => String::new(),
    }
}

fn id_list(ids: &[i64]) -> String {
    const SHOWN: usize = 20;
    let mut s: Vec<String> = ids.iter().take(SHOWN).map(i64::to_string).collect();
    if ids.len() > SHOWN {
        s.push(format!("… ({} more)", ids.len() - SHOWN));
    }
    s.join(", ")
}

impl EvalError {
    /// What cn_clip's `evaluation.py` (or `evaluation_tr.py`) writes as `errorDetail`/`errorMsg`
    /// for the same input: usually its own message string, sometimes a Python exception's first
    /// argument (`2` for a missing ground-truth file, `"text_id"` for a `KeyError`).
    ///
    /// For failures cn_clip cannot have (strict validation, in-memory calls, inputs it would accept
    /// by accident) this is our own message.
    pub fn cn_clip_detail(&self) -> Value {
        match self {
            EvalError::Io { cn_clip, .. }
            | EvalError::Line { cn_clip, .. }
            | EvalError::MissingPredictions { cn_clip, .. } => cn_clip.clone(),
            EvalError::EmptyGroundTruth { .. } => Value::from("float division by zero"),
            other => Value::from(other.to_string()),
        }
    }
}
