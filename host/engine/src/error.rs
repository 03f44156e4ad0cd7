//! The engine's error type: loading a model failed, the caller's tensors do not fit it, or
//! inference itself failed.

use thiserror::Error;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, Clone, Error)]
pub enum EngineError {
    /// The model file is missing, unreadable, not ONNX, or uses something tract cannot run.
    #[error("cannot load model {source_name}: {message}")]
    Load {
        source_name: String,
        message: String,
    },
    /// The caller's tensors do not fit the model (names, types, shapes, positions).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Inference itself failed.
    #[error("inference failed: {0}")]
    Runtime(String),
}

impl EngineError {
    pub(crate) fn load(source_name: impl Into<String>, e: impl std::fmt::Display) -> Self {
        EngineError::Load {
            source_name: source_name.into(),
            message: format!("{e:#}"),
        }
    }
}
