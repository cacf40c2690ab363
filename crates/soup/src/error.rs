//! The crate's one error type: every variant names the file and, where there is one, the key.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SoupError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a native cnclip checkpoint: {reason}")]
    NotNative { path: PathBuf, reason: String },
    #[error(transparent)]
    Weights(#[from] cnclip_model::weights::WeightsError),
    #[error(transparent)]
    Load(#[from] cnclip_model::LoadError),
    #[error(
        "{path} holds a different model than {first}: their configs differ\n  {first}: {first_config}\n  {path}: {config}"
    )]
    ConfigMismatch {
        first: PathBuf,
        path: PathBuf,
        first_config: String,
        config: String,
    },
    #[error("{path} has no tensor {key}, which {first} has")]
    MissingKey {
        first: PathBuf,
        path: PathBuf,
        key: String,
    },
    #[error("{path} has tensor {key}, which {first} does not have")]
    UnexpectedKey {
        first: PathBuf,
        path: PathBuf,
        key: String,
    },
    #[error("tensor {key}: shape {found:?} in {path} but {expected:?} in {first}")]
    ShapeMismatch {
        first: PathBuf,
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "tensor {key}: dtype {found} in {path} but {expected} in {first} (non-float tensors must agree)"
    )]
    DtypeMismatch {
        first: PathBuf,
        path: PathBuf,
        key: String,
        expected: String,
        found: String,
    },
    #[error(
        "tensor {key} ({dtype}) differs between {first} and {path}: integer and bool tensors are not \
         averaged, so every member must hold the same values"
    )]
    NonFloatDiffers {
        first: PathBuf,
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error("{path}: tensor {key} has dtype {dtype}, which a checkpoint may not hold")]
    UnsupportedDtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error("tensor {key}: {source}")]
    Torch { key: String, source: tch::TchError },
    #[error("{path}: {source}")]
    Model {
        path: PathBuf,
        source: cnclip_model::model::ModelError,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("validation data: {0}")]
    Data(String),
    #[error(transparent)]
    Lmdb(#[from] muge_data::LmdbError),
    #[error(transparent)]
    Extract(#[from] cnclip_extract::ExtractError),
    #[error(transparent)]
    File(#[from] muge_data::FileError),
    #[error(transparent)]
    Text(#[from] muge_data::text::TextError),
    #[error(transparent)]
    Preprocess(#[from] cnclip_model::preprocess::PreprocessError),
    #[error(transparent)]
    Retrieval(#[from] retrieval::RetrievalError),
    #[error(transparent)]
    Eval(#[from] eval::EvalError),
    #[error("{path}: {reason}")]
    Cache { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{0}")]
    Lora(String),
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> SoupError + '_ {
    move |source| SoupError::Io {
        path: path.to_path_buf(),
        source,
    }
}
