//! The crate's one error type: every variant names the file or image it is about.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An image source that cannot be opened or read (the path and what is wrong).
    #[error("{path}: {message}")]
    Source { path: PathBuf, message: String },
    #[error(transparent)]
    Load(#[from] cnclip_model::LoadError),
    #[error(transparent)]
    Config(#[from] cnclip_model::config::ConfigError),
    #[error(transparent)]
    Text(#[from] muge_data::text::TextError),
    #[error(transparent)]
    EncodeTexts(#[from] muge_data::text::EncodeTextsError),
    #[error(transparent)]
    Lmdb(#[from] muge_data::LmdbError),
    #[error(transparent)]
    File(#[from] muge_data::FileError),
    #[error(transparent)]
    Preprocess(#[from] cnclip_model::preprocess::PreprocessError),
    /// The image transform refused an image (`name`: which image).
    #[error("{name}: {source}")]
    Transform {
        name: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{name}: the transform returned {got_w}x{got_h}, expected {want_w}x{want_h}")]
    TransformSize {
        name: String,
        got_w: usize,
        got_h: usize,
        want_w: usize,
        want_h: usize,
    },
    #[error(transparent)]
    Retrieval(#[from] retrieval::RetrievalError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// Inputs that do not fit together (the message says which and what was expected).
    #[error("{0}")]
    Invalid(String),
    /// A shard directory left by another run, or a shard that did not complete in time.
    #[error("{path}: {message}")]
    Shard { path: PathBuf, message: String },
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ExtractError {
    let path = path.into();
    move |source| ExtractError::Io { path, source }
}

pub(crate) fn source_err(path: impl Into<PathBuf>, message: impl Into<String>) -> ExtractError {
    ExtractError::Source {
        path: path.into(),
        message: message.into(),
    }
}
