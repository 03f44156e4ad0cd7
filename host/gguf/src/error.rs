use thiserror::Error;

/// What can be wrong with a GGUF file. The caller adds the file's path.
#[derive(Debug, Error)]
pub enum GgufError {
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a GGUF file (it starts with \"{}\"; a GGUF file starts with \"GGUF\")", .found.escape_ascii())]
    NotGguf { found: [u8; 4] },
    #[error("GGUF version {0} is not supported (versions 2 and 3 are)")]
    Version(u32),
    #[error("the file is truncated or corrupt: {0}")]
    Corrupt(String),
    #[error(
        "tensor '{tensor}' has type {kind}, which is not supported (supported: {})",
        crate::GgmlType::supported_names()
    )]
    UnsupportedType { tensor: String, kind: String },
    #[error("tensor '{tensor}' {problem}")]
    BadTensor { tensor: String, problem: String },
    #[error("metadata '{key}': {problem}")]
    BadMetadata { key: String, problem: String },
}
