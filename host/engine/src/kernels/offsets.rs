//! Per-block offsets of a block weight (`value = s * q + o`): the `o * sum(x over the block)`
//! part of a product, which the int8 kernels leave out. Q5_1 and Q5_K have an offset per 32
//! values, Q2_K per 16. One portable loop in one order on every target, so every build adds the
//! same bits; it costs a 16th or a 32nd of the product.

use std::borrow::Cow;

use super::parallel::OutPtr;
use super::q4_1::QBLOCK;
use super::quantize::{int_sum, QuantRows};

/// Offsets `[N][K / per]` of a weight `[K, N]`, `per` 16 or 32.
pub struct BlockOffsets {
    per: usize,
    o: Vec<f32>,
}

impl BlockOffsets {
    /// `o` by (output channel, block of `per` values along K).
    pub fn new(k: usize, n: usize, per: usize, o: &[f32]) -> Result<BlockOffsets, String> {
        if !(per == 16 || per == QBLOCK) || k % QBLOCK != 0 || o.len() != n * (k / per) {
            return Err(format!(
                "{} block offsets for K={k} N={n} in blocks of {per} (16 or 32)",
                o.len()
            ));
        }
        Ok(BlockOffsets { per, o: o.to_vec() })
    }

    /// Values per offset along K.
    pub fn per(&self) -> usize {
        self.per
    }

    /// The offset of output channel `c` at `kk` along K.
    pub fn at(&self, k: usize, c: usize, kk: usize) -> f32 {
        self.o[c * (k / self.per) + kk / self.per]
    }

    /// Each block's activation sum, as this weight's offsets multiply it: per 32, the sum the
    /// rounding gives (`x.sum`: llama.cpp's Q8_1 sum for Q5_1); per 16, `scale * sum(q)` (Q8_K's
    /// block sums, for Q2_K).
    pub(crate) fn block_sums<'x>(&self, x: &'x QuantRows) -> Cow<'x, [f32]> {
        if self.per == QBLOCK {
            return Cow::Borrowed(&x.sum);
        }
        x.q.chunks_exact(self.per)
            .enumerate()
            .map(|(h, q)| x.scale[h * self.per / QBLOCK] * int_sum(q) as f32)
            .collect()
    }

    /// `y[row, c] += sum over blocks b of o[c, b] * sums[row, b]` for columns `c0..c1` of `m`
    /// rows of `n`.
    ///
    /// # Safety
    /// `y` points at `m * n` floats of which no other thread touches columns `c0..c1`; `sums`
    /// holds `m` rows of `K / per` (from [`Self::block_sums`]).
    pub(crate) unsafe fn add(
        &self,
        sums: &[f32],
        m: usize,
        n: usize,
        y: OutPtr,
        c0: usize,
        c1: usize,
    ) {
        let nb = sums.len() / m;
        for row in 0..m {
            let s = &sums[row * nb..][..nb];
            for c in c0..c1 {
                let o = &self.o[c * nb..][..nb];
                let mut acc = 0f32;
                for (o, s) in o.iter().zip(s) {
                    acc += o * s;
                }
                // SAFETY: row < m, c < n: inside y, a column this call owns.
                unsafe { *y.at(row * n + c) += acc };
            }
        }
    }
}
