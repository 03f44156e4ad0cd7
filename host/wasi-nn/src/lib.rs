//! The wasi:nn contract (`wasi:nn@0.2.0-rc-2024-10-28`) over slm-engine, written once.
//!
//! Two components implement wasi:nn: the native host (`slm`, host/src/nn) for wasmtime, and
//! guest/nn, which exports it from inside WebAssembly for hosts without one. Each keeps only the
//! glue its bindings generator needs; everything else lives here, free of generated types:
//!
//! - [`NnTensor`]: a tensor as it crosses the boundary, and its checked conversion to the engine's;
//! - [`NnError`] / [`ErrorKind`]: typed errors (wasi:nn `error-code` + message), never matched by text;
//! - [`ExecContext`]: the stateful execution context (KV cache, token-id validation, failure
//!   handling, the optional [`PrefixCache`] and its `cached_tokens` extension output);
//! - [`wit_conversions!`]: the one mapping between a binding's generated enums and ours;
//! - [`names`]: the tensor names of the contract (re-exported from the engine).
//!
//! The contract itself is written down in ARCHITECTURE.md ("The wasi:nn contract").

mod context;
mod error;
mod load;
mod panic;
pub mod prefix;
mod tensor;

pub use context::ExecContext;
pub use error::{ErrorKind, NnError};
pub use load::{check_model_name, load_bytes, load_file, no_gpu, Target, NO_GPU};
pub use panic::{catch_panic, panics_are_caught};
pub use prefix::PrefixCache;
pub use slm_engine::names;
pub use slm_engine::DType;
pub use tensor::NnTensor;

/// Implements the conversions between one binding's generated wasi:nn enums and this crate's
/// types, in the calling module: `to_dtype`, `to_tensor_type`, `to_error_code` and `to_target`.
/// Both bindings generators (wasmtime's `bindgen!`, `wit_bindgen::generate!`) name the cases
/// after the same WIT, so the table is written once, here. Pass the generated enums by name:
/// `slm_wasi_nn::wit_conversions!(TensorType, ErrorCode, ExecutionTarget);`
#[macro_export]
macro_rules! wit_conversions {
    ($tensor_type:ident, $error_code:ident, $execution_target:ident) => {
        $crate::wit_conversions!(@table $tensor_type, $error_code, $execution_target,
            tensor: [Fp16 = F16, Fp32 = F32, Fp64 = F64, Bf16 = BF16, U8 = U8, I32 = I32, I64 = I64],
            error: [InvalidArgument, InvalidEncoding, Timeout, RuntimeError, UnsupportedOperation,
                    TooLarge, NotFound, Security, Unknown],
            target: [Cpu, Gpu, Tpu]);
    };
    (@table $tt:ident, $ec:ident, $et:ident,
        tensor: [$($wit:ident = $ours:ident),*],
        error: [$($kind:ident),*],
        target: [$($target:ident),*]) => {
        /// wasi:nn `tensor-type` as the engine's element type.
        #[allow(dead_code)]
        fn to_dtype(t: $tt) -> $crate::DType {
            match t { $($tt::$wit => $crate::DType::$ours),* }
        }
        /// The engine's element type as wasi:nn `tensor-type`.
        #[allow(dead_code)]
        fn to_tensor_type(t: $crate::DType) -> $tt {
            match t { $($crate::DType::$ours => $tt::$wit),* }
        }
        /// An error kind as wasi:nn `error-code`.
        #[allow(dead_code)]
        fn to_error_code(k: $crate::ErrorKind) -> $ec {
            match k { $($crate::ErrorKind::$kind => $ec::$kind),* }
        }
        /// wasi:nn `execution-target` as ours.
        #[allow(dead_code)]
        fn to_target(t: $et) -> $crate::Target {
            match t { $($et::$target => $crate::Target::$target),* }
        }
    };
}
