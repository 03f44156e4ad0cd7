//! Activations rounded to 8 bits per block of 32 ([`QuantRows`]), as llama.cpp rounds them for
//! its Q4_1 product: the input of the Q4_1 and Q8 kernels, whose block sums are then integer
//! dot products.

use half::f16;

use super::detmath;
use super::q4_1::QBLOCK;

const ROUND: f32 = 12582912.0;

/// How activations are rounded to 8 bits for a weight's product: as llama.cpp rounds them for
/// the GGUF type the weight comes from, so that a model computes as it does there (next-token
/// agreement with llama.cpp), or with f32 scales and exact sums (our own layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activations {
    /// Per block of 32: `amax / 127` in f32, the block's exact f32 sum.
    #[default]
    F32Scale,
    /// llama.cpp's Q8_0 (for Q4_0, Q5_0, Q8_0 weights): the scale rounded to float16; the sum
    /// (for an offset) `scale * sum(q)`.
    Q8_0,
    /// llama.cpp's Q8_1 (for Q4_1 weights): the scale rounded to float16, the sum
    /// `amax / 127 * sum(q)` rounded to float16.
    Q8_1,
    /// llama.cpp's Q8_K (for K-quant weights): one scale per 256 values, `1 / (127 / amax)`;
    /// the sum of each block of 32 `scale * sum(q)`. Rows whose width is not whole blocks of
    /// 256 round as [`Activations::F32Scale`].
    Q8K,
}

/// Values per block of llama.cpp's Q8_K.
const K_BLOCK: usize = 256;

/// Rows of x quantized per block of 32: `x ~ xs * xq`, with the sum of each block.
pub(crate) struct QuantRows {
    pub(crate) q: Vec<i8>,
    /// Per row and block: the scale and the sum of the f32 values.
    pub(crate) scale: Vec<f32>,
    pub(crate) sum: Vec<f32>,
}

/// The sum of quantized values as an integer (a block's, for the kernels' offset corrections).
#[inline(always)]
pub(crate) fn int_sum(q: &[i8]) -> i32 {
    q.iter().map(|&v| v as i32).sum()
}

impl QuantRows {
    /// Rounded as `how` says.
    pub(crate) fn with(x: &[f32], m: usize, k: usize, how: Activations) -> QuantRows {
        match how {
            Activations::F32Scale => Self::new(x, m, k),
            Activations::Q8K if k % K_BLOCK == 0 => Self::q8_k(x, m, k),
            Activations::Q8K => Self::new(x, m, k),
            Activations::Q8_0 | Activations::Q8_1 => {
                let mut rows = Self::new(x, m, k);
                for (i, (s, t)) in rows.scale.iter_mut().zip(rows.sum.iter_mut()).enumerate() {
                    let q = int_sum(&rows.q[i * QBLOCK..][..QBLOCK]);
                    let rounded = f16::from_f32(*s).to_f32();
                    *t = match how {
                        Activations::Q8_1 => f16::from_f32(*s * q as f32).to_f32(),
                        _ => rounded * q as f32,
                    };
                    *s = rounded;
                }
                rows
            }
        }
    }

    /// llama.cpp's Q8_K: per 256 values, `inv = 127 / amax`, `q = round(x * inv)` (to nearest
    /// even, as llama.cpp's `nearest_int`), the scale `1 / inv`, given to each block of 32.
    fn q8_k(x: &[f32], m: usize, k: usize) -> QuantRows {
        let blocks = m * k / QBLOCK;
        let mut q = vec![0i8; m * k];
        let (mut scale, mut sum) = (vec![0f32; blocks], vec![0f32; blocks]);
        for (g, (xg, qg)) in x
            .chunks_exact(K_BLOCK)
            .zip(q.chunks_exact_mut(K_BLOCK))
            .enumerate()
        {
            let amax = xg.iter().fold(0f32, |a, v| detmath::max(a, v.abs()));
            if amax == 0.0 {
                continue;
            }
            let inv = 127.0 / amax;
            for (o, v) in qg.iter_mut().zip(xg) {
                *o = (((v * inv + ROUND) - ROUND) as i32).min(127) as i8;
            }
            let d = 1.0 / inv;
            for b in 0..K_BLOCK / QBLOCK {
                let i = g * (K_BLOCK / QBLOCK) + b;
                let qs: i32 = qg[b * QBLOCK..][..QBLOCK].iter().map(|&v| v as i32).sum();
                scale[i] = d;
                sum[i] = d * qs as f32;
            }
        }
        QuantRows { q, scale, sum }
    }

    pub(crate) fn new(x: &[f32], m: usize, k: usize) -> QuantRows {
        let blocks = m * k / QBLOCK;
        let mut q = vec![0i8; m * k];
        let (mut scale, mut sum) = (vec![0f32; blocks], vec![0f32; blocks]);
        #[cfg(target_arch = "x86_64")]
        if super::cpu::avx2_fma_f16c() {
            // SAFETY: the CPU has AVX2 and FMA; `x` and `q` hold `blocks` whole blocks of 32
            // (m * k values), `scale` and `sum` one value per block.
            unsafe { x86::quantize(x, &mut q, &mut scale, &mut sum) };
            return QuantRows { q, scale, sum };
        }
        Self::quantize_portable(x, &mut q, &mut scale, &mut sum);
        QuantRows { q, scale, sum }
    }

    fn quantize_portable(x: &[f32], q: &mut [i8], scale: &mut [f32], sum: &mut [f32]) {
        for (i, (xb, qb)) in x
            .chunks_exact(QBLOCK)
            .zip(q.chunks_exact_mut(QBLOCK))
            .enumerate()
        {
            let amax = xb.iter().fold(0f32, |a, v| detmath::max(a, v.abs()));
            // The sum in the AVX2 version's order (8 lanes, a tree), so that every build rounds
            // it alike: lane l = (x[l] + x[8+l]) + (x[16+l] + x[24+l]), then lanes l + (l+4), ...
            let t: [f32; 8] =
                std::array::from_fn(|l| (xb[l] + xb[8 + l]) + (xb[16 + l] + xb[24 + l]));
            sum[i] = ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
            if amax > 0.0 {
                scale[i] = amax / 127.0;
                let inv = 127.0 / amax;
                for (o, v) in qb.iter_mut().zip(xb) {
                    // Round half to even by the 1.5 * 2^23 trick (f32::round is a libm call).
                    *o = ((v * inv + ROUND) - ROUND) as i32 as i8;
                }
            }
        }
    }
}

/// What the simd128 kernels load from quantized rows.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub(crate) mod wasm {
    use std::arch::wasm32::*;

    /// The 4 int8 at `p`, widened to i16, twice: `[a0 a1 a2 a3 a0 a1 a2 a3]`, the operand of
    /// `i32x4.dot_i16x8_s` against 2 columns x 4 values of a weight.
    ///
    /// # Safety
    /// `p` points at 4 readable bytes.
    #[inline(always)]
    pub(crate) unsafe fn i8x4_twice(p: *const i8) -> v128 {
        // SAFETY: the caller's 4 bytes; `[i8; 4]` has alignment 1.
        let a = unsafe { *(p as *const [i8; 4]) };
        i16x8(
            a[0] as i16,
            a[1] as i16,
            a[2] as i16,
            a[3] as i16,
            a[0] as i16,
            a[1] as i16,
            a[2] as i16,
            a[3] as i16,
        )
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::QBLOCK;

    /// [`QuantRows`](super::QuantRows) of whole blocks: per block of 32, the largest magnitude,
    /// the sum, and the values rounded (to nearest even, as the portable version) to multiples
    /// of amax / 127.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `x` holds at least 32 values per entry of `scale`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize(x: &[f32], q: &mut [i8], scale: &mut [f32], sum: &mut [f32]) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for (i, ((s, t), qb)) in scale
            .iter_mut()
            .zip(sum.iter_mut())
            .zip(q.chunks_exact_mut(QBLOCK))
            .enumerate()
        {
            // SAFETY: block i of x (32 values) is in bounds by the caller's contract; `qb` is a
            // whole block of 32 bytes, the width of one 256-bit store.
            unsafe {
                let p = x.as_ptr().add(i * QBLOCK);
                let v = [
                    _mm256_loadu_ps(p),
                    _mm256_loadu_ps(p.add(8)),
                    _mm256_loadu_ps(p.add(16)),
                    _mm256_loadu_ps(p.add(24)),
                ];
                let m = _mm256_max_ps(
                    _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                    _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
                );
                let total = _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
                *t = fold(total, |a, b| _mm_add_ps(a, b));
                let amax = fold(m, |a, b| _mm_max_ps(a, b));
                if amax > 0.0 {
                    *s = amax / 127.0;
                    let inv = _mm256_set1_ps(127.0 / amax);
                    // Round to nearest even (the default rounding mode), then pack to bytes: the
                    // packs interleave 128-bit lanes, the permute puts them back in order.
                    let r = |v: __m256| _mm256_cvtps_epi32(_mm256_mul_ps(v, inv));
                    let w01 = _mm256_packs_epi32(r(v[0]), r(v[1]));
                    let w23 = _mm256_packs_epi32(r(v[2]), r(v[3]));
                    let b = _mm256_packs_epi16(w01, w23);
                    let b =
                        _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                    _mm256_storeu_si256(qb.as_mut_ptr() as *mut __m256i, b);
                } else {
                    *s = 0.0;
                    qb.fill(0);
                }
            }
        }
    }

    /// The 8 lanes of `v` folded by `op` (lane-wise on 128-bit halves) in a tree: lane l with
    /// lane l + 4, then l + 2, then l + 1 (the order the portable sum copies).
    ///
    /// # Safety
    /// The CPU has AVX (the caller is compiled for AVX2).
    #[inline(always)]
    unsafe fn fold(v: __m256, op: impl Fn(__m128, __m128) -> __m128) -> f32 {
        // SAFETY: register-only AVX/SSE operations, on a CPU with AVX (the caller's contract).
        unsafe {
            let s = op(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = op(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(op(s, _mm_shuffle_ps(s, s, 1)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::Lcg;

    /// The llama.cpp roundings, against their definitions.
    #[test]
    fn llama_cpp_roundings() {
        let mut g = Lcg(9);
        let (m, k) = (2, 512);
        let x: Vec<f32> = (0..m * k).map(|_| g.f32() * 2.0).collect();
        let base = QuantRows::new(&x, m, k);
        let q8_0 = QuantRows::with(&x, m, k, Activations::Q8_0);
        let q8_1 = QuantRows::with(&x, m, k, Activations::Q8_1);
        assert_eq!((&q8_0.q, &q8_1.q), (&base.q, &base.q));
        for i in 0..m * k / QBLOCK {
            let q: i32 = base.q[i * 32..][..32].iter().map(|&v| v as i32).sum();
            let d = f16::from_f32(base.scale[i]).to_f32();
            assert_eq!((q8_0.scale[i], q8_1.scale[i]), (d, d));
            assert_eq!(q8_0.sum[i], d * q as f32);
            assert_eq!(
                q8_1.sum[i],
                f16::from_f32(base.scale[i] * q as f32).to_f32()
            );
        }
        let q8_k = QuantRows::with(&x, m, k, Activations::Q8K);
        for (gi, xg) in x.chunks(256).enumerate() {
            let amax = xg.iter().fold(0f32, |a, v| a.max(v.abs()));
            let iscale = 127.0 / amax;
            for (j, v) in xg.iter().enumerate() {
                assert_eq!(q8_k.q[gi * 256 + j] as f32, (v * iscale).round_ties_even());
            }
            assert!(q8_k.scale[gi * 8..gi * 8 + 8]
                .iter()
                .all(|&s| s == 1.0 / iscale));
        }
        // Not whole blocks of 256: as F32Scale.
        let short = QuantRows::with(&x[..96], 1, 96, Activations::Q8K);
        assert_eq!(short.scale, QuantRows::new(&x[..96], 1, 96).scale);
    }

    #[test]
    fn activation_rounding_is_the_same_everywhere() {
        let mut g = Lcg(3);
        let (m, k) = (3, 96);
        let mut x: Vec<f32> = (0..m * k).map(|_| g.f32() * 3.0).collect();
        x[..32].fill(0.0); // an all-zero block
        let fast = QuantRows::new(&x, m, k);
        let (mut q, mut scale, mut sum) = (
            vec![0i8; m * k],
            vec![0f32; m * k / 32],
            vec![0f32; m * k / 32],
        );
        QuantRows::quantize_portable(&x, &mut q, &mut scale, &mut sum);
        assert_eq!(fast.q, q);
        assert_eq!(fast.scale, scale);
        assert_eq!(fast.sum, sum, "the same order of additions");
    }
}
