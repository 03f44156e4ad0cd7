//! The compute kernels of our ops: matrix products on f32 ([`float`]), int8 ([`int8`]), Q4_1 and Q4_K
//! ([`q4_1`]), int8 blocks (Q8_0, Q5_0, Q6_K, Q3_K; with
//! [`offsets`], Q5_1, Q5_K, Q2_K: [`q8_blocks`]) and Q8 ([`q8`]) weights, a row of fused
//! attention ([`attention`]); the rounding of activations to 8 bits that the Q4_1 and Q8 products share ([`quantize`], [`dispatch`]); which instructions the
//! CPU has ([`cpu`]); how a product is split across threads ([`parallel`], `pool`).

pub(crate) mod attention;
pub(crate) mod cpu;
pub(crate) mod detmath;
pub(crate) mod dispatch;
pub(crate) mod float;
pub(crate) mod int8;
pub(crate) mod offsets;
pub(crate) mod parallel;
#[cfg(feature = "threads")]
pub(crate) mod pool;
pub(crate) mod q4_1;
pub(crate) mod q5_blocks;
pub(crate) mod q8;
pub(crate) mod q8_blocks;
pub(crate) mod quantize;
#[cfg(test)]
pub(crate) mod testing;

pub use parallel::set_threads;
pub(crate) use parallel::{parallel_ranges, threads, OutPtr};
