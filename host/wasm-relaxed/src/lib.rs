//! slm-engine's kernels on WebAssembly relaxed SIMD (wasm32 with simd128; empty elsewhere).
//!
//! Why a crate of their own: LLVM compiles every function of a wasm module with the union of
//! the target features of its functions, since a module cannot mix them. Inside slm-engine, one
//! relaxed-SIMD kernel turned `x > c ? c : x` selects in other ops into `f32x4.relaxed_min`,
//! whose answer for NaN differs between engines. Here only these kernels get relaxed SIMD, and
//! slm-engine calls them (non-generic, never inlined across crates; the workspace builds
//! without LTO).
//!
//! Every kernel computes the same integer sums and the same float operations, in the same
//! order, as slm-engine's portable kernel, so the outputs are the same bits.

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod q4;

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub use q4::{q4_panels_f16, q4_panels_f32, Q4Kernel, Q4Product, BLOCK, PANEL};
