//! Matrix products against Q4_1 weights: asymmetric 4-bit blocks of 32 along K, each with its
//! own float16 scale `d` and offset `m`, so a weight is `d * q + m` with `q` in 0..16.
//!
//! The default model's GGUF stores its layer weights exactly so; keeping them so in memory holds
//! them exactly, in 5 bits per weight (int8 per channel needs 8 and rounds them). At decode, a
//! token reads every weight once, so bytes are time.
//!
//! Activations are quantized per row in blocks of 32 (int8, one f32 scale per block, as
//! llama.cpp does for its Q4_1 product): a block's sum of products is then an exact integer dot
//! product, `y[n] += d * xs * sum(q * xq) + m * sum(x)` (the offset term uses the exact f32 sum
//! of the block). The rounding of x to 8 bits per block of 32 values is the only approximation;
//! its effect on perplexity is measured by the quality tests (tests/python/test_quality.py).
//!
//! Kernels: AVX-512 VNNI (`vpdpbusd` on 256-bit vectors) or AVX2 (`vpmaddubsw`) on x86_64,
//! detected at run time; simd128 (`i32x4.dot_i16x8_s`) on wasm32 built with it (the guests are);
//! a portable version elsewhere.

use half::f16;

use crate::qkernel::{parallel_ranges, OutPtr};

/// Weights per block along K (one `d` and one `m` each).
pub const QBLOCK: usize = 32;
/// Columns per panel: a panel's block is 512 contiguous bytes, one per thread split unit.
pub const Q4_PANEL: usize = 32;
/// Bytes of one (panel, block): 32 columns x 32 values x 4 bits.
const BLOCK_BYTES: usize = Q4_PANEL * QBLOCK / 2;

/// A Q4_1 weight `[K, N]` (K a multiple of 32), packed for the kernels.
pub struct Q4Weights {
    pub k: usize,
    pub n: usize,
    /// Nibbles by (panel, block): 4 groups of 8 K values; in a group, 4 bytes per column; byte t
    /// of column j holds q[8g + t] (low nibble) and q[8g + 4 + t] (high nibble). So one 32-byte
    /// load is 8 columns x 4 bytes, ready for a 4-wide byte dot product per 32-bit lane.
    q: Vec<u8>,
    /// `d` and `m` by (panel, block, column), padded columns 0.
    d: Vec<f16>,
    m: Vec<f16>,
}

impl std::fmt::Debug for Q4Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q4Weights {{ k: {}, n: {} }}", self.k, self.n)
    }
}

impl Q4Weights {
    /// `value(n, k)` is the value (0..16) of output channel n at k; `d` and `m` are `[N][K/32]`.
    #[cfg(test)]
    pub fn new(
        k: usize,
        n: usize,
        value: impl Fn(usize, usize) -> u8,
        d: &[f16],
        m: &[f16],
    ) -> Result<Q4Weights, String> {
        let mut raw = vec![0u8; n * k / 2];
        for c in 0..n {
            for kk in 0..k {
                let v = value(c, kk);
                if v > 15 {
                    return Err(format!("Q4_1 value {v} out of 0..16"));
                }
                raw[(c * k + kk) / 2] |= v << (4 * (kk % 2));
            }
        }
        Self::from_nbits(k, n, &raw, d, m)
    }

    /// From `MatMulNBits` data: `raw` is `[N][K/32][16]`, two values per byte, low nibble first;
    /// `d` and `m` are `[N][K/32]`.
    pub fn from_nbits(
        k: usize,
        n: usize,
        raw: &[u8],
        d: &[f16],
        m: &[f16],
    ) -> Result<Q4Weights, String> {
        let kb = k / QBLOCK;
        if k == 0
            || n == 0
            || k % QBLOCK != 0
            || d.len() != n * kb
            || m.len() != n * kb
            || raw.len() != n * k / 2
        {
            return Err(format!(
                "Q4_1 weight of {} bytes, {} scales, {} offsets for K={k} N={n}",
                raw.len(),
                d.len(),
                m.len()
            ));
        }
        let panels = n.div_ceil(Q4_PANEL);
        let mut q = vec![0u8; panels * kb * BLOCK_BYTES];
        let mut ds = vec![f16::ZERO; panels * kb * Q4_PANEL];
        let mut ms = vec![f16::ZERO; panels * kb * Q4_PANEL];
        // Spreads the 4 nibbles of x (16 bits) to the low nibbles of 4 bytes.
        let spread = |x: u32| {
            let x = (x | (x << 8)) & 0x00FF_00FF;
            (x | (x << 4)) & 0x0F0F_0F0F
        };
        for c in 0..n {
            let (p, j) = (c / Q4_PANEL, c % Q4_PANEL);
            for b in 0..kb {
                let src = &raw[(c * kb + b) * QBLOCK / 2..][..QBLOCK / 2];
                let dst = (p * kb + b) * BLOCK_BYTES + j * 4;
                for g in 0..4 {
                    // Values 8g..8g+8 (a u32 of nibbles) -> bytes t = 0..4 of (8g + t, 8g + 4 + t).
                    let v = u32::from_le_bytes(src[4 * g..4 * g + 4].try_into().unwrap());
                    let packed = spread(v & 0xFFFF) | (spread(v >> 16) << 4);
                    q[dst + g * 128..dst + g * 128 + 4].copy_from_slice(&packed.to_le_bytes());
                }
                ds[(p * kb + b) * Q4_PANEL + j] = d[c * kb + b];
                ms[(p * kb + b) * Q4_PANEL + j] = m[c * kb + b];
            }
        }
        Ok(Q4Weights {
            k,
            n,
            q,
            d: ds,
            m: ms,
        })
    }

    /// The dequantized weight as f32 `[K, N]` (tests and references).
    #[cfg(test)]
    pub fn dequantized_kn(&self) -> Vec<f32> {
        let kb = self.k / QBLOCK;
        let mut w = vec![0f32; self.k * self.n];
        for c in 0..self.n {
            let (p, j) = (c / Q4_PANEL, c % Q4_PANEL);
            for kk in 0..self.k {
                let (b, r) = (kk / QBLOCK, kk % QBLOCK);
                let (g, t, high) = (r / 8, r % 4, r % 8 >= 4);
                let byte = self.q[(p * kb + b) * BLOCK_BYTES + g * 128 + j * 4 + t];
                let v = if high { byte >> 4 } else { byte & 15 };
                let i = (p * kb + b) * Q4_PANEL + j;
                w[kk * self.n + c] = self.d[i].to_f32() * v as f32 + self.m[i].to_f32();
            }
        }
        w
    }

    /// `y = x @ W` for `x` `[m, K]` and `y` `[m, N]`, row-major.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        assert_eq!(x.len(), m * self.k);
        assert_eq!(y.len(), m * self.n);
        if m == 0 {
            return;
        }
        let xq = QuantRows::new(x, m, self.k);
        let out = OutPtr(y.as_mut_ptr());
        let panels = self.n.div_ceil(Q4_PANEL);
        let run = |p0: usize, p1: usize| {
            // SAFETY: every call writes only the columns of panels p0..p1; the ranges are disjoint.
            unsafe { self.panels(&xq, m, out, p0, p1) }
        };
        parallel_ranges(panels, m * self.k * self.n, &run);
    }

    unsafe fn panels(&self, x: &QuantRows, m: usize, y: OutPtr, p0: usize, p1: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_vnni() {
                return x86::panels_vnni(self, x, m, y.0, p0, p1);
            }
            if x86::has_avx2() {
                return x86::panels_avx2(self, x, m, y.0, p0, p1);
            }
        }
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        return wasm::panels(self, x, m, y.0, p0, p1);
        #[allow(unreachable_code)]
        portable::panels(self, x, m, y.0, p0, p1)
    }
}

const ROUND: f32 = 12582912.0;

/// Rows of x quantized per block of 32: `x ~ xs * xq`, with the exact sum of each block.
pub(crate) struct QuantRows {
    pub(crate) q: Vec<i8>,
    /// Per row and block: the scale and the sum of the f32 values.
    pub(crate) scale: Vec<f32>,
    pub(crate) sum: Vec<f32>,
}

impl QuantRows {
    pub(crate) fn new(x: &[f32], m: usize, k: usize) -> QuantRows {
        let blocks = m * k / QBLOCK;
        let mut q = vec![0i8; m * k];
        let (mut scale, mut sum) = (vec![0f32; blocks], vec![0f32; blocks]);
        #[cfg(target_arch = "x86_64")]
        if x86::has_avx2() {
            // SAFETY: AVX2 is present; the slices hold `blocks` whole blocks.
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
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
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

mod portable {
    use super::*;

    pub unsafe fn panels(
        w: &Q4Weights,
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        let (k, n, kb) = (w.k, w.n, w.k / QBLOCK);
        for p in p0..p1 {
            let cols = Q4_PANEL.min(n - p * Q4_PANEL);
            for row in 0..m {
                let mut facc = [0f32; Q4_PANEL];
                for b in 0..kb {
                    let blk = &w.q[(p * kb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                    let xq = &x.q[row * k + b * QBLOCK..][..QBLOCK];
                    let mut acc = [0i32; Q4_PANEL];
                    for g in 0..4 {
                        for (j, a) in acc.iter_mut().enumerate() {
                            for t in 0..4 {
                                let byte = blk[g * 128 + j * 4 + t];
                                *a += (byte & 15) as i32 * xq[8 * g + t] as i32
                                    + (byte >> 4) as i32 * xq[8 * g + 4 + t] as i32;
                            }
                        }
                    }
                    let (xs, sx) = (x.scale[row * kb + b], x.sum[row * kb + b]);
                    let i = (p * kb + b) * Q4_PANEL;
                    for j in 0..Q4_PANEL {
                        // The order of the vector kernels' operations, rounding for rounding.
                        let f = facc[j] + acc[j] as f32 * (w.d[i + j].to_f32() * xs);
                        facc[j] = f + w.m[i + j].to_f32() * sx;
                    }
                }
                for (j, v) in facc[..cols].iter().enumerate() {
                    *y.add(row * n + p * Q4_PANEL + j) = *v;
                }
            }
        }
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm {
    use std::arch::wasm32::*;

    use super::*;

    /// Four float16 at `p` as f32 (finite values: the exponent is rebased by a multiply, which
    /// also handles zeros and subnormals).
    #[inline(always)]
    unsafe fn f16x4(p: *const f16) -> v128 {
        let h = u32x4_extend_low_u16x8(v128_load64_zero(p as *const u64));
        let magnitude = f32x4_mul(
            u32x4_shl(v128_and(h, u32x4_splat(0x7fff)), 13),
            f32x4_splat(f32::from_bits(0x7780_0000)),
        ); // 2^112
        v128_or(magnitude, u32x4_shl(v128_and(h, u32x4_splat(0x8000)), 16))
    }

    pub unsafe fn panels(
        w: &Q4Weights,
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        let (k, n, kb) = (w.k, w.n, w.k / QBLOCK);
        let nib = u8x16_splat(15);
        let mut out = [0f32; Q4_PANEL];
        for p in p0..p1 {
            let cols = Q4_PANEL.min(n - p * Q4_PANEL);
            for row in 0..m {
                let mut facc = [f32x4_splat(0.0); Q4_PANEL / 4];
                for b in 0..kb {
                    let blk = w.q.as_ptr().add((p * kb + b) * BLOCK_BYTES);
                    let xq = x.q.as_ptr().add(row * k + b * QBLOCK);
                    // Per 4 columns: two lanes per column (pairs of K values), added at the end.
                    let mut acc = [[i32x4_splat(0); 2]; Q4_PANEL / 4];
                    for g in 0..4 {
                        let xg = xq.add(8 * g);
                        let a = *(xg as *const [i8; 4]);
                        let bb = *(xg.add(4) as *const [i8; 4]);
                        let xa = i16x8(
                            a[0] as i16,
                            a[1] as i16,
                            a[2] as i16,
                            a[3] as i16,
                            a[0] as i16,
                            a[1] as i16,
                            a[2] as i16,
                            a[3] as i16,
                        );
                        let xb = i16x8(
                            bb[0] as i16,
                            bb[1] as i16,
                            bb[2] as i16,
                            bb[3] as i16,
                            bb[0] as i16,
                            bb[1] as i16,
                            bb[2] as i16,
                            bb[3] as i16,
                        );
                        for (c4, acc) in acc.iter_mut().enumerate() {
                            let v = v128_load(blk.add(g * 128 + c4 * 16) as *const v128);
                            let (lo, hi) = (v128_and(v, nib), u8x16_shr(v, 4));
                            acc[0] =
                                i32x4_add(acc[0], i32x4_dot_i16x8(u16x8_extend_low_u8x16(lo), xa));
                            acc[0] =
                                i32x4_add(acc[0], i32x4_dot_i16x8(u16x8_extend_low_u8x16(hi), xb));
                            acc[1] =
                                i32x4_add(acc[1], i32x4_dot_i16x8(u16x8_extend_high_u8x16(lo), xa));
                            acc[1] =
                                i32x4_add(acc[1], i32x4_dot_i16x8(u16x8_extend_high_u8x16(hi), xb));
                        }
                    }
                    let i = row * kb + b;
                    let (xs, sx) = (f32x4_splat(x.scale[i]), f32x4_splat(x.sum[i]));
                    let sm = (p * kb + b) * Q4_PANEL;
                    for (c4, acc) in acc.iter().enumerate() {
                        // [c0 c0 c1 c1] and [c2 c2 c3 c3] -> [c0 c1 c2 c3]
                        let sums = i32x4_add(
                            i32x4_shuffle::<0, 2, 4, 6>(acc[0], acc[1]),
                            i32x4_shuffle::<1, 3, 5, 7>(acc[0], acc[1]),
                        );
                        let d = f16x4(w.d.as_ptr().add(sm + c4 * 4));
                        let mo = f16x4(w.m.as_ptr().add(sm + c4 * 4));
                        let f = f32x4_add(
                            facc[c4],
                            f32x4_mul(f32x4_convert_i32x4(sums), f32x4_mul(d, xs)),
                        );
                        facc[c4] = f32x4_add(f, f32x4_mul(mo, sx));
                    }
                }
                for (c4, f) in facc.iter().enumerate() {
                    v128_store(out.as_mut_ptr().add(c4 * 4) as *mut v128, *f);
                }
                std::ptr::copy_nonoverlapping(out.as_ptr(), y.add(row * n + p * Q4_PANEL), cols);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    pub fn has_vnni() -> bool {
        has_avx2()
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512vl")
    }

    pub fn has_avx2() -> bool {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }

    /// [`QuantRows`] of whole blocks: per block of 32, the largest magnitude, the sum, and the
    /// values rounded (to nearest even, as the portable version) to multiples of amax / 127.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize(x: &[f32], q: &mut [i8], scale: &mut [f32], sum: &mut [f32]) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for (i, ((s, t), qb)) in scale
            .iter_mut()
            .zip(sum.iter_mut())
            .zip(q.chunks_exact_mut(QBLOCK))
            .enumerate()
        {
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
            *t = hsum(total);
            let amax = hmax(m);
            if amax > 0.0 {
                *s = amax / 127.0;
                let inv = _mm256_set1_ps(127.0 / amax);
                // Round to nearest even (the default rounding mode), then pack to bytes: the
                // packs interleave 128-bit lanes, the permute puts them back in order.
                let r = |v: __m256| _mm256_cvtps_epi32(_mm256_mul_ps(v, inv));
                let w01 = _mm256_packs_epi32(r(v[0]), r(v[1]));
                let w23 = _mm256_packs_epi32(r(v[2]), r(v[3]));
                let b = _mm256_packs_epi16(w01, w23);
                let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(qb.as_mut_ptr() as *mut __m256i, b);
            } else {
                *s = 0.0;
                qb.fill(0);
            }
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    #[inline(always)]
    unsafe fn hmax(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// `acc + sum of 4 products u8 * i8` per 32-bit lane.
    pub(crate) trait Dot {
        unsafe fn dot(acc: __m256i, w: __m256i, x: __m256i) -> __m256i;
    }

    pub(crate) struct Vnni;
    impl Dot for Vnni {
        #[inline(always)]
        unsafe fn dot(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(acc, w, x)
        }
    }

    pub(crate) struct Avx2;
    impl Dot for Avx2 {
        #[inline(always)]
        unsafe fn dot(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
            // u8 <= 15 times i8: pairs sum to at most 2 * 15 * 128, no i16 saturation.
            _mm256_add_epi32(
                acc,
                _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)),
            )
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub unsafe fn panels_vnni(
        w: &Q4Weights,
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        panels::<Vnni, 4>(w, x, m, y, p0, p1)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn panels_avx2(
        w: &Q4Weights,
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        // 16 vector registers: 4 rows x 16 columns of accumulators at a time.
        panels::<Avx2, 2>(w, x, m, y, p0, p1)
    }

    #[inline(always)]
    unsafe fn panels<D: Dot, const NV4: usize>(
        w: &Q4Weights,
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        let n = w.n;
        let mut out = [0f32; 4 * Q4_PANEL];
        let o = out.as_mut_ptr();
        for p in p0..p1 {
            let cols = Q4_PANEL.min(n - p * Q4_PANEL);
            let mut row = 0;
            // Four rows at a time (prefill): each unpacked weight vector feeds four dot products.
            while row + 4 <= m {
                for c in (0..Q4_PANEL).step_by(8 * NV4) {
                    tile::<D, 4, NV4>(w, p, c, x, row, o.add(c));
                }
                for r in 0..4 {
                    std::ptr::copy_nonoverlapping(
                        o.add(r * Q4_PANEL),
                        y.add((row + r) * n + p * Q4_PANEL),
                        cols,
                    );
                }
                row += 4;
            }
            // One row at a time (decode): the whole panel, 512 contiguous bytes per block.
            while row < m {
                tile::<D, 1, 4>(w, p, 0, x, row, o);
                std::ptr::copy_nonoverlapping(o, y.add(row * n + p * Q4_PANEL), cols);
                row += 1;
            }
        }
    }

    /// Rows `row..row + MR` by columns `c..c + 8 * NV` of panel `p`, over all of K, into `out`
    /// (`[MR][Q4_PANEL]`, at column c).
    #[inline(always)]
    unsafe fn tile<D: Dot, const MR: usize, const NV: usize>(
        w: &Q4Weights,
        p: usize,
        c: usize,
        x: &QuantRows,
        row: usize,
        out: *mut f32,
    ) {
        let (k, kb) = (w.k, w.k / QBLOCK);
        let nib = _mm256_set1_epi8(0x0F);
        let mut facc = [[_mm256_setzero_ps(); NV]; MR];
        for b in 0..kb {
            let blk = w.q.as_ptr().add((p * kb + b) * BLOCK_BYTES + c * 4);
            let mut acc = [[_mm256_setzero_si256(); NV]; MR];
            for g in 0..4 {
                let mut xa = [_mm256_setzero_si256(); MR];
                let mut xb = [_mm256_setzero_si256(); MR];
                for r in 0..MR {
                    let xp = x.q.as_ptr().add((row + r) * k + b * QBLOCK + 8 * g);
                    xa[r] = _mm256_set1_epi32((xp as *const i32).read_unaligned());
                    xb[r] = _mm256_set1_epi32((xp.add(4) as *const i32).read_unaligned());
                }
                for v in 0..NV {
                    let bytes = _mm256_loadu_si256(blk.add(g * 128 + v * 32) as *const __m256i);
                    let lo = _mm256_and_si256(bytes, nib);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nib);
                    for r in 0..MR {
                        acc[r][v] = D::dot(acc[r][v], lo, xa[r]);
                        acc[r][v] = D::dot(acc[r][v], hi, xb[r]);
                    }
                }
            }
            let sm = (p * kb + b) * Q4_PANEL + c;
            for v in 0..NV {
                let d = _mm256_cvtph_ps(_mm_loadu_si128(
                    w.d.as_ptr().add(sm + v * 8) as *const __m128i
                ));
                let mo = _mm256_cvtph_ps(_mm_loadu_si128(
                    w.m.as_ptr().add(sm + v * 8) as *const __m128i
                ));
                for r in 0..MR {
                    let i = (row + r) * kb + b;
                    let xs = _mm256_set1_ps(*x.scale.get_unchecked(i));
                    let sx = _mm256_set1_ps(*x.sum.get_unchecked(i));
                    // Multiply, then add (no FMA): the same roundings as the wasm kernel, so that
                    // native and portable builds give the same logits (and greedy text).
                    let f = _mm256_add_ps(
                        facc[r][v],
                        _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][v]), _mm256_mul_ps(d, xs)),
                    );
                    facc[r][v] = _mm256_add_ps(f, _mm256_mul_ps(mo, sx));
                }
            }
        }
        for r in 0..MR {
            for v in 0..NV {
                _mm256_storeu_ps(out.add(r * Q4_PANEL + v * 8), facc[r][v]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
        fn f32(&mut self) -> f32 {
            self.next() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
        }
    }

    fn weights(g: &mut Lcg, k: usize, n: usize) -> Q4Weights {
        let q: Vec<u8> = (0..k * n).map(|_| (g.next() % 16) as u8).collect();
        let d: Vec<f16> = (0..n * k / QBLOCK)
            .map(|_| f16::from_f32(0.002 + g.f32().abs() * 0.02))
            .collect();
        let m: Vec<f16> = (0..n * k / QBLOCK)
            .map(|_| f16::from_f32(-0.15 * g.f32().abs()))
            .collect();
        Q4Weights::new(k, n, |c, kk| q[c * k + kk], &d, &m).unwrap()
    }

    /// The product with the dequantized weights, with x rounded as the kernel rounds it: the
    /// kernel must match it up to f32 rounding; and with x exact: within the 8-bit rounding.
    fn check(m: usize, k: usize, n: usize) {
        let mut g = Lcg(m as u64 * 7919 + k as u64 * 31 + n as u64);
        let w = weights(&mut g, k, n);
        let x: Vec<f32> = (0..m * k).map(|_| g.f32()).collect();
        let xr = QuantRows::new(&x, m, k);
        let rounded: Vec<f32> = (0..m * k)
            .map(|i| xr.q[i] as f32 * xr.scale[i / QBLOCK])
            .collect();
        let wd = w.dequantized_kn();
        for (name, kernel) in kernels() {
            let mut y = vec![f32::NAN; m * n];
            if name == "matmul" {
                w.matmul(&x, m, &mut y);
            } else {
                // SAFETY: the kernel's CPU features were detected; y holds m x n.
                unsafe { kernel(&w, &xr, m, y.as_mut_ptr(), 0, n.div_ceil(Q4_PANEL)) };
            }
            compare(name, &w, &wd, &x, &rounded, &y, m);
        }
    }

    type Kernel = unsafe fn(&Q4Weights, &QuantRows, usize, *mut f32, usize, usize);

    /// Every kernel this CPU runs, and the public entry point (which picks one, and threads).
    fn kernels() -> Vec<(&'static str, Kernel)> {
        #[allow(unused_mut)]
        let mut v: Vec<(&'static str, Kernel)> =
            vec![("matmul", portable::panels), ("portable", portable::panels)];
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_avx2() {
                v.push(("avx2", x86::panels_avx2));
            }
            if x86::has_vnni() {
                v.push(("vnni", x86::panels_vnni));
            }
        }
        v
    }

    fn compare(
        name: &str,
        w: &Q4Weights,
        wd: &[f32],
        x: &[f32],
        rounded: &[f32],
        y: &[f32],
        m: usize,
    ) {
        let (k, n) = (w.k, w.n);
        for r in 0..m {
            for c in 0..n {
                let (mut same, mut exact, mut mag) = (0f64, 0f64, 0f64);
                for kk in 0..k {
                    let wv = wd[kk * n + c] as f64;
                    exact += x[r * k + kk] as f64 * wv;
                    mag += (x[r * k + kk] as f64 * wv).abs();
                    let i = (c / Q4_PANEL * (k / QBLOCK) + kk / QBLOCK) * Q4_PANEL + c % Q4_PANEL;
                    // d * q times the rounded x; the offset m times the exact x (its block sum).
                    let mv = w.m[i].to_f32() as f64;
                    same += rounded[r * k + kk] as f64 * (wv - mv) + x[r * k + kk] as f64 * mv;
                }
                let got = y[r * n + c] as f64;
                assert!(
                    (got - same).abs() <= 1e-5 * (1.0 + mag),
                    "{name} m={m} k={k} n={n} [{r},{c}]: {got} vs {same}"
                );
                // Rounding x to 8 bits per block moves each product by at most 1/254 of it.
                assert!(
                    (got - exact).abs() <= mag / 254.0 + 1e-5,
                    "{name} m={m} k={k} n={n} [{r},{c}]: {got} vs exact {exact}"
                );
            }
        }
    }

    #[test]
    fn q4_1_matmul_matches_reference() {
        for (m, k, n) in [
            (1, 32, 1),
            (1, 64, 32),
            (1, 576, 192),
            (1, 96, 77),
            (2, 32, 33),
            (3, 128, 64),
            (4, 64, 40),
            (5, 576, 96),
            (9, 160, 70),
            (1, 1536, 64),
        ] {
            check(m, k, n);
        }
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

    #[test]
    fn q4_1_matmul_is_the_same_on_threads() {
        let (m, k, n) = (6, 1024, 1000);
        let mut g = Lcg(11);
        let w = weights(&mut g, k, n);
        let x: Vec<f32> = (0..m * k).map(|_| g.f32()).collect();
        let mut one = vec![0f32; m * n];
        w.matmul(&x, m, &mut one);
        #[cfg(feature = "threads")]
        {
            use tract_linalg::multithread::{multithread_tract_scope, Executor};
            let mut two = vec![0f32; m * n];
            multithread_tract_scope(Executor::multithread(2), || w.matmul(&x, m, &mut two));
            assert_eq!(one, two);
        }
        assert!(one.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn zero_rows_and_constant_blocks() {
        let (k, n) = (64, 8);
        let d = vec![f16::from_f32(0.5); n * k / QBLOCK];
        let m = vec![f16::from_f32(-1.0); n * k / QBLOCK];
        let w = Q4Weights::new(k, n, |c, _| c as u8, &d, &m).unwrap();
        let mut y = vec![f32::NAN; 2 * n];
        let mut x = vec![0f32; 2 * k];
        x[k..].fill(1.0);
        w.matmul(&x, 2, &mut y);
        for c in 0..n {
            assert_eq!(y[c], 0.0);
            let want = k as f32 * (0.5 * c as f32 - 1.0);
            assert!(
                (y[n + c] - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{c}: {} vs {want}",
                y[n + c]
            );
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let d = vec![f16::ONE; 2];
        assert!(Q4Weights::new(48, 1, |_, _| 0, &d, &d).is_err());
        assert!(Q4Weights::from_nbits(64, 1, &[0; 31], &d, &d).is_err());
        assert!(Q4Weights::new(64, 1, |_, _| 16, &d, &d).is_err());
    }
}
