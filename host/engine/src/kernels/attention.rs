//! Fused attention on a block of query rows of one head: each row's scores against every key,
//! their softmax and the weighted sum of the values, the rows sharing each key and value read
//! (AVX2 when the CPU has it).

/// A mask value at or below this is taken as is for the score: whatever the dot product, the
/// exponential of such a score underflows to exactly 0 (the export's "minus infinity" is -1e9).
const MASKED: f32 = -1e8;

use super::f16::F16;

/// How keys and values are stored: f32, or [`F16`] (the in-place KV cache).
pub trait KvElem: Copy + Send + Sync + 'static {
    /// `src` as f32: itself, or widened into `buf` (at least as long).
    fn widen<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
}

impl KvElem for f32 {
    #[inline(always)]
    fn widen<'a>(src: &'a [f32], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl KvElem for F16 {
    #[inline(always)]
    fn widen<'a>(src: &'a [F16], buf: &'a mut [f32]) -> &'a [f32] {
        for (b, h) in buf.iter_mut().zip(src) {
            *b = h.to_f32();
        }
        &buf[..src.len()]
    }
}

/// Query rows of one head, at most [`BLOCK_ROWS`], that share what they attend to: `q`
/// (`[rows, D]`), keys `k` (`[T, D]`) and values `v` (`[T, Dv]`), the mask, `scale` the factor
/// of the scores.
pub struct Block<'a, T> {
    pub q: &'a [f32],
    pub d: usize,
    pub k: &'a [T],
    pub v: &'a [T],
    /// The mask of row i and key j is `mask[i * mask_row + j * mask_col]`.
    pub mask: &'a [f32],
    pub mask_row: usize,
    pub mask_col: usize,
    pub scale: f32,
}

/// The most query rows one [`attend_block`] takes: the rows of a block read each key and value
/// once between them (a decode step's query heads that share a KV head; a prefill's rows), so
/// the cache streams from memory once per block, not once per row.
pub const BLOCK_ROWS: usize = 16;

/// The rows of `block`: `scores` (rows * T) is scratch, `out` (rows * Dv) receives the results.
/// Each row's arithmetic is that of the row alone, in the same order (key by key): results do
/// not depend on how rows are grouped.
#[inline(always)]
fn attend_block_body<T: KvElem>(block: &Block<T>, scores: &mut [f32], out: &mut [f32]) {
    let Block {
        q,
        d,
        k,
        v,
        mask,
        mask_row,
        mask_col,
        scale,
    } = *block;
    let rows = q.len() / d;
    debug_assert!(rows <= BLOCK_ROWS);
    let t = scores.len() / rows;
    let dv = out.len() / rows;
    let mask_of = |i: usize, j: usize| mask[i * mask_row + j * mask_col];
    // Keys after a row's last unmasked one (a causal mask's future) would add exact zeros to
    // every sum below: leave them out (the same result, bit for bit; half the work of a prompt).
    let mut keys = [0usize; BLOCK_ROWS];
    for (i, n) in keys[..rows].iter_mut().enumerate() {
        *n = (0..t)
            .rposition(|j| mask_of(i, j) > MASKED)
            .map_or(t, |j| j + 1);
    }
    let keys = &keys[..rows];
    let last = keys.iter().copied().max().unwrap_or(0);
    // A key (value) widened to f32 once for all the rows.
    let mut wide = vec![0f32; d.max(dv)];
    for j in 0..last {
        let kj = T::widen(&k[j * d..][..d], &mut wide);
        for (i, &n) in keys.iter().enumerate() {
            if j < n {
                let m = mask_of(i, j);
                scores[i * t + j] = if m <= MASKED {
                    m
                } else {
                    dot(&q[i * d..][..d], kj) * scale + m
                };
            }
        }
    }
    let mut sum = [0f32; BLOCK_ROWS];
    for (i, &n) in keys.iter().enumerate() {
        let row = &mut scores[i * t..][..n];
        let max = max_of(row);
        for s in row.iter_mut() {
            *s = exp(*s - max);
        }
        sum[i] = sum_of(row);
    }
    out.fill(0.0);
    for j in 0..last {
        let vj = T::widen(&v[j * dv..][..dv], &mut wide);
        for (i, &n) in keys.iter().enumerate() {
            let p = scores[i * t + j];
            if j < n {
                for (o, &x) in out[i * dv..][..dv].iter_mut().zip(vj) {
                    *o += p * x;
                }
            }
        }
    }
    for (i, o) in out.chunks_exact_mut(dv).enumerate() {
        let inv = 1.0 / sum[i];
        for x in o {
            *x *= inv;
        }
    }
}

/// The largest of `x` (the same in any order: 8 lanes, then across them).
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// The sum of `x` in 8 lanes, then across them.
#[inline(always)]
fn sum_of(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            lanes[i] += c[i];
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// e^x for x <= 0 (a score minus its row's maximum), within 2 ulp; exactly 0 below -87 (where
/// e^x is under the smallest normal f32), as masked keys need. Branch-free and all in f32 and
/// integer lanes, so a loop over a row vectorizes; no fused multiply-add, so every target
/// rounds alike.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: n * LN2_HI is exact for the n that occur (|n| <= 126).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer n (ties to even) and leaves it in the low bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.max(-87.0);
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Taylor series of e^r to r^7 on |r| <= ln(2) / 2: truncation under 1e-8 relative.
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2^n from its exponent bits (n in -126..=0: a normal number).
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * two_n
    }
}

/// A dot product in 8 independent lanes (the compiler keeps them in one vector register).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// [`attend_block_body`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_block_avx2<T: KvElem>(block: &Block<T>, scores: &mut [f32], out: &mut [f32]) {
    attend_block_body(block, scores, out)
}

/// The rows of `block`: each row of `out` (`[rows, Dv]`) = softmax(q k^T * scale + mask) v;
/// `scores` (`rows * T`) is scratch.
pub fn attend_block<T: KvElem>(block: &Block<T>, scores: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { attend_block_avx2(block, scores, out) };
    }
    attend_block_body(block, scores, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_2_ulp_and_zero_below_the_normals() {
        let mut worst = 0u32;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let want = (x as f64).exp() as f32;
            worst = worst.max(exp(x).to_bits().abs_diff(want.to_bits()));
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        for x in [-87.01, -100.0, -1e9, f32::NEG_INFINITY] {
            assert_eq!(exp(x), 0.0, "{x}");
        }
    }
}
