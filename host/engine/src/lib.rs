//! slm-engine: ONNX decoder inference on tract, with the KV cache kept inside the session.
//!
//! No wasmtime types: the native host's wasi:nn backend and the in-wasm wasi:nn (guest/nn)
//! both wrap this crate.
//!
//! Contract (ARCHITECTURE.md at the repository root, "The wasi:nn contract"): a [`Session`] is
//! stateful. Callers send only new `input_ids` (and `position_ids`); the session appends to its
//! KV cache and returns last-position `logits` [1, 1, vocab]. A `position_ids` start below the
//! cached length rewinds (truncates) the cache. Callers that pass `past_key_values.*` themselves
//! get plain stateless ONNX. The tensor names are in [`names`].
//!
//! Layout, by job:
//! - `model/`: loading a [`Model`]: the CPU engine (`cpu.rs`), the GPU plan (`gpu.rs`), the
//!   device it runs on (`device.rs`);
//! - `onnx/`: the ONNX protobuf, streamed from the file (`proto.rs`) and rewritten before tract
//!   parses it: int8 and Q4_1 weights stay quantized, attention chains are fused;
//! - `ops/`: the tract ops those rewrites produce (quantized matmul and gather, attention);
//! - `kernels/`: their compute (int8, Q4_1, Q8, attention), activation quantization, CPU feature
//!   detection, and the threads a product is split across;
//! - `batching.rs`: concurrent sessions' steps run as one packed run (continuous batching);
//! - [`Session`] (`session.rs`), [`Tensor`] (`tensor.rs`), [`EngineError`] (`error.rs`).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod batching;
mod error;
mod kernels;
mod model;
pub mod names;
mod onnx;
mod ops;
mod session;
mod tensor;

#[doc(hidden)]
pub use batching::BatchingStats;
pub use batching::INTERLEAVED_PREFILL;
pub use error::EngineError;
pub use kernels::set_threads;
pub use model::{gpu, gpu_memory_mib, resolve, Device, GpuInfo, Placement, GPU_BUILT, NOT_BUILT};
pub use model::{release_free_memory, Model, ModelInfo};
pub use session::{KvSnapshot, Session, PREFILL_CHUNK};
#[doc(hidden)]
pub use session::{NodeTime, Profile};
pub use tensor::{DType, Tensor};
