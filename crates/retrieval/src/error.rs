//! Errors of the retrieval crate: every one names the file, line or id it is about.

use std::path::PathBuf;

/// Everything that can go wrong reading features, searching or writing predictions.
#[derive(Debug, thiserror::Error)]
pub enum RetrievalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Jsonl {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: not a native feature file: {message}")]
    Native { path: PathBuf, message: String },
    #[error("{path}: no features (an empty {what} set cannot be searched)")]
    Empty { path: PathBuf, what: &'static str },
    #[error("{what}: feature dimension {actual} does not match {expected}")]
    Dim {
        what: String,
        expected: usize,
        actual: usize,
    },
    #[error("{what}: feature of id {id} has a non-finite value at position {position}")]
    NonFinite {
        what: String,
        id: i64,
        position: usize,
    },
    #[error("{what}: feature of id {id} has zero norm and cannot be L2-normalised")]
    ZeroNorm { what: String, id: i64 },
    #[error("{what}: id {id} appears twice (rows {first} and {second})")]
    DuplicateId {
        what: String,
        id: i64,
        first: usize,
        second: usize,
    },
    #[error("{what} id {id} appears in two shards: {first} and {second}")]
    DuplicateShardId {
        what: &'static str,
        id: i64,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("shard {path}: {source}")]
    Shard {
        path: PathBuf,
        #[source]
        source: Box<RetrievalError>,
    },
    #[error("unknown {what} id {id}")]
    UnknownId { what: &'static str, id: i64 },
    #[error("invalid search parameter: {0}")]
    Param(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("tensor view: {0}")]
    View(#[from] torch_ext::ViewError),
    /// Boxed: `EvalError` carries cn_clip's report and would make every `Result` here large.
    #[error(transparent)]
    Eval(Box<eval::EvalError>),
}

impl From<eval::EvalError> for RetrievalError {
    fn from(e: eval::EvalError) -> Self {
        RetrievalError::Eval(Box::new(e))
    }
}

/// Result alias of the crate.
pub type Result<T, E = RetrievalError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &std::path::Path, source: std::io::Error) -> RetrievalError {
    RetrievalError::Io {
        path: path.to_path_buf(),
        source,
    }
}
