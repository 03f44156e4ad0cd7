//! GGUF, the file format llama.cpp and the model hubs ship quantized models in.
//!
//! [`Gguf::open`] reads the header, the metadata and the tensor directory, checks that every
//! tensor's data lies inside the file and matches its shape and type, and maps the data in place.
//! [`dequantize`] turns any supported tensor type into f32 values **equal, bit for bit, to the
//! reference dequantizer** (`gguf` Python package, llama.cpp's ggml): the engine's weights must be
//! the file's weights, not an approximation of them.
//!
//! [`ModelConfig`] reads an architecture's hyper-parameters from the metadata and checks every
//! tensor it needs against them. [`Vocabulary`] rebuilds the file's tokenizer as Hugging Face tokenizer files.
//!
//! Errors are values ([`GgufError`]) that say what is wrong and, for types, what is supported.

mod config;
mod dequant;
mod error;
mod metadata;
mod reader;
mod tokenizer;
mod types;

pub use config::{Architecture, ModelConfig, SlidingWindow};
pub use dequant::{dequantize, dequantize_into, int8_affine, int8_scales, q4_affine};
pub use error::GgufError;
pub use metadata::Value;
pub use reader::{Gguf, TensorInfo};
pub use tokenizer::Vocabulary;
pub use types::GgmlType;
