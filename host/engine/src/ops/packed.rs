//! The weight of a quantized product, in one of the packed formats of [`crate::kernels`].

use std::sync::Arc;

use crate::kernels::dispatch::PanelKernels;
use crate::kernels::float::F32Weights;
use crate::kernels::int8::{Layout, QWeights};
use crate::kernels::q4_1::Q4Weights;
use crate::kernels::q5_blocks::Q5Blocks;
use crate::kernels::q8::Q8Weights;
use crate::kernels::q8_blocks::Q8Blocks;

/// The weight of a rewritten product, in one of the packed formats.
#[derive(Clone)]
pub enum Packed {
    /// Float matrices, summed in one order on every target.
    F32(Arc<F32Weights>),
    Int8(Arc<QWeights>),
    /// Q4_0 and Q4_1 blocks: float16 scales and offsets.
    Q4_1(Arc<Q4Weights>),
    /// Q4_K blocks: f32 scales and offsets (a super-block's scale times each block's own).
    Q4F32(Arc<Q4Weights<f32>>),
    /// int8 blocks of 16 or 32 with f32 or float16 scales (Q8_0, Q6_K; Q5_0 and the other
    /// 5-bit types when their values span more than 32 integers).
    Q8Blocks(Arc<Q8Blocks>),
    /// The same weights held in 5 bits (Q5_0, Q5_1, Q5_K, Q3_K).
    Q5Blocks(Arc<Q5Blocks>),
    /// The tied LM head of a Q4_1 model: int8, with activations rounded as the Q4_1 products.
    Q8Head(Arc<Q8Weights>),
}

impl Packed {
    pub(crate) fn k(&self) -> usize {
        match self {
            Packed::F32(w) => w.k,
            Packed::Int8(w) => w.k,
            Packed::Q4_1(w) => w.k,
            Packed::Q4F32(w) => w.k,
            Packed::Q8Blocks(w) => w.k,
            Packed::Q5Blocks(w) => w.k,
            Packed::Q8Head(w) => w.k,
        }
    }

    pub(crate) fn n(&self) -> usize {
        match self {
            Packed::F32(w) => w.n,
            Packed::Int8(w) => w.n,
            Packed::Q4_1(w) => w.n,
            Packed::Q4F32(w) => w.n,
            Packed::Q8Blocks(w) => w.n,
            Packed::Q5Blocks(w) => w.n,
            Packed::Q8Head(w) => w.n,
        }
    }

    /// `y = x @ W` for `x` `[m, K]` and `y` `[m, N]`.
    pub(crate) fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        match self {
            Packed::F32(w) => w.matmul(x, m, y),
            Packed::Int8(w) => w.matmul(x, m, y),
            Packed::Q4_1(w) => w.matmul(x, m, y),
            Packed::Q4F32(w) => w.matmul(x, m, y),
            Packed::Q8Blocks(w) => w.matmul(x, m, y),
            Packed::Q5Blocks(w) => w.matmul(x, m, y),
            Packed::Q8Head(w) => w.matmul(x, m, y),
        }
    }

    /// Whether its output channels are rows of a table (a tied embedding reads them back).
    pub(crate) fn is_table(&self) -> bool {
        match self {
            Packed::F32(w) => w.layout == Layout::NK,
            Packed::Int8(w) => w.layout == Layout::NK,
            Packed::Q8Head(_) | Packed::Q8Blocks(_) | Packed::Q5Blocks(_) => true,
            Packed::Q4_1(_) | Packed::Q4F32(_) => false,
        }
    }

    /// Whether a row of its table reads as f32 values (int8 blocks, each with its scale) rather
    /// than int8 values for one scale per row.
    pub(crate) fn has_f32_rows(&self) -> bool {
        matches!(
            self,
            Packed::Q8Blocks(_) | Packed::Q5Blocks(_) | Packed::F32(_)
        )
    }

    /// Output channel `c` (K values) into `out`; only for a [`Packed::is_table`] weight without
    /// [`Packed::has_f32_rows`].
    pub(crate) fn copy_column(&self, c: usize, out: &mut [i8]) {
        match self {
            Packed::Int8(w) => w.copy_column(c, out),
            Packed::Q8Head(w) => w.copy_column(c, out),
            _ => unreachable!("checked by is_table and has_f32_rows"),
        }
    }

    /// Output channel `c` (K values, dequantized) into `out`; only for a weight with
    /// [`Packed::has_f32_rows`].
    pub(crate) fn copy_column_f32(&self, c: usize, out: &mut [f32]) {
        match self {
            Packed::Q8Blocks(w) => w.copy_column(c, out),
            Packed::Q5Blocks(w) => w.copy_column(c, out),
            Packed::F32(w) => w.copy_column(c, out),
            _ => unreachable!("checked by has_f32_rows"),
        }
    }
}

/// The same weight (not a copy): ops that read it are equal.
impl PartialEq for Packed {
    fn eq(&self, other: &Packed) -> bool {
        match (self, other) {
            (Packed::F32(a), Packed::F32(b)) => Arc::ptr_eq(a, b),
            (Packed::Int8(a), Packed::Int8(b)) => Arc::ptr_eq(a, b),
            (Packed::Q4_1(a), Packed::Q4_1(b)) => Arc::ptr_eq(a, b),
            (Packed::Q4F32(a), Packed::Q4F32(b)) => Arc::ptr_eq(a, b),
            (Packed::Q8Blocks(a), Packed::Q8Blocks(b)) => Arc::ptr_eq(a, b),
            (Packed::Q5Blocks(a), Packed::Q5Blocks(b)) => Arc::ptr_eq(a, b),
            (Packed::Q8Head(a), Packed::Q8Head(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}
impl Eq for Packed {}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Packed::F32(w) => w.fmt(f),
            Packed::Int8(w) => w.fmt(f),
            Packed::Q4_1(w) => w.fmt(f),
            Packed::Q4F32(w) => w.fmt(f),
            Packed::Q8Blocks(w) => w.fmt(f),
            Packed::Q5Blocks(w) => w.fmt(f),
            Packed::Q8Head(w) => w.fmt(f),
        }
    }
}
