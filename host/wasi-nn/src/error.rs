//! Typed wasi:nn errors: the `error-code` a guest sees and the full message (`error.data`).

use slm_engine::EngineError;

/// wasi:nn `error-code`, case for case in WIT order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller's fault: bad tensors, token ids out of range, a model that does not parse.
    InvalidArgument,
    /// A graph encoding other than ONNX.
    InvalidEncoding,
    Timeout,
    /// The engine or the model failed.
    RuntimeError,
    /// An execution target we cannot serve (no GPU, TPU).
    UnsupportedOperation,
    TooLarge,
    /// `load-by-name` of a model that is not installed.
    NotFound,
    Security,
    Unknown,
}

/// A wasi:nn error: its code and a one-line message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct NnError {
    pub kind: ErrorKind,
    pub message: String,
}

impl NnError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        NnError {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    pub fn runtime(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::RuntimeError, message)
    }

    /// The encoding a graph was given in, by its WIT case name.
    pub fn invalid_encoding(encoding: impl std::fmt::Debug) -> Self {
        Self::new(
            ErrorKind::InvalidEncoding,
            format!("graph encoding {encoding:?} is not supported (only onnx)"),
        )
    }
}

/// The engine's own split: the caller's tensors do not fit the model, or the engine failed.
impl From<EngineError> for NnError {
    fn from(e: EngineError) -> Self {
        let kind = match e {
            EngineError::InvalidInput(_) => ErrorKind::InvalidArgument,
            EngineError::Load { .. } | EngineError::Runtime(_) => ErrorKind::RuntimeError,
        };
        NnError::new(kind, e.to_string())
    }
}
