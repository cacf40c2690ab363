//! Two kinds of failure: the service cannot start ([`ServeError`], for the operator), and one
//! request is refused or failed ([`ApiError`], a JSON body for the client). A request never takes
//! the service down: every refusal is an `ApiError` with a status and a message.

use std::path::PathBuf;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Load(#[from] cnclip_model::LoadError),
    #[error(transparent)]
    Config(#[from] cnclip_model::config::ConfigError),
    #[error(transparent)]
    Lmdb(#[from] muge_data::LmdbError),
    /// Boxed: extraction errors are large.
    #[error(transparent)]
    Extract(Box<cnclip_extract::ExtractError>),
    #[error(transparent)]
    File(#[from] muge_data::FileError),
    #[error(transparent)]
    Text(#[from] muge_data::text::TextError),
    #[error(transparent)]
    Retrieval(#[from] retrieval::RetrievalError),
    #[error(transparent)]
    Preprocess(#[from] cnclip_model::preprocess::PreprocessError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Features { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("the model thread stopped: {0}")]
    Engine(String),
}

impl From<cnclip_extract::ExtractError> for ServeError {
    fn from(e: cnclip_extract::ExtractError) -> Self {
        ServeError::Extract(Box::new(e))
    }
}

impl ServeError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ServeError {
        let path = path.into();
        move |source| ServeError::Io { path, source }
    }
}

/// A refused or failed request: the status and the message of its JSON body `{"error": …}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message, "status": self.status.as_u16() });
        (self.status, Json(body)).into_response()
    }
}
