//! The crate's error type: mirrors the WIT `error` variant, without depending on the bindings
//! (so the pure modules test natively).

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    ModelNotFound(String),
    InvalidRequest(String),
    /// An option's value; `name` as in the WIT `options` / `sampling` records ("top-p").
    InvalidOption {
        name: &'static str,
        message: String,
    },
    ContextOverflow {
        prompt_tokens: u32,
        context_length: u32,
    },
    ModelError(String),
    BackendFailure(String),
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidRequest(msg.into())
    }
    pub fn invalid_option(name: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidOption {
            name,
            message: msg.into(),
        }
    }
    pub fn model(msg: impl Into<String>) -> Self {
        Error::ModelError(msg.into())
    }
    pub fn backend(msg: impl Into<String>) -> Self {
        Error::BackendFailure(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ModelNotFound(m) => write!(f, "model not found: {m}"),
            Error::InvalidRequest(m) => write!(f, "invalid request: {m}"),
            Error::InvalidOption { message, .. } => write!(f, "invalid request: {message}"),
            Error::ContextOverflow {
                prompt_tokens,
                context_length,
            } => write!(
                f,
                "the prompt has {prompt_tokens} tokens; the context window is {context_length}"
            ),
            Error::ModelError(m) => write!(f, "model error: {m}"),
            Error::BackendFailure(m) => write!(f, "backend failure: {m}"),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
