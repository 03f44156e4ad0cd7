//! slm-engine: ONNX decoder inference on tract, with the KV cache kept inside the session.
//!
//! No wasmtime types: the native host's wasi:nn backend and the in-wasm wasi:nn (guest/nn)
//! both wrap this crate.
//!
//! Contract (see DESIGN.md): a [`Session`] is stateful. Callers send only new `input_ids`
//! (and `position_ids`); the session appends to its KV cache and returns last-position
//! `logits` [1, 1, vocab]. A `position_ids` start below the cached length rewinds (truncates)
//! the cache. Callers that pass `past_key_values.*` themselves get plain stateless ONNX.

mod attention;
mod device;
mod error;
mod model;
mod proto;
mod q4kernel;
mod q8kernel;
mod qkernel;
mod quant;
mod session;
#[cfg(feature = "threads")]
mod spin;
mod tensor;

pub use device::{gpu, gpu_memory_mib, resolve, Device, GpuInfo, Placement, GPU_BUILT, NOT_BUILT};
pub use error::EngineError;
pub use model::{set_threads, Model, ModelInfo};
pub use session::{KvSnapshot, Session};
#[doc(hidden)]
pub use session::{NodeTime, Profile};
pub use tensor::{DType, Tensor};
