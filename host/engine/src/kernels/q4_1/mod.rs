//! Matrix products against Q4_1 weights: asymmetric 4-bit blocks of 32 along K, each with its
//! own scale `d` and offset `m`, so a weight is `d * q + m` with `q` in 0..16.
//!
//! The default model's GGUF stores its layer weights exactly so, with float16 `d` and `m`;
//! keeping them so in memory holds them exactly, in 5 bits per weight (int8 per channel needs 8
//! and rounds them). At decode, a token reads every weight once, so bytes are time. A Q4_K
//! super-block is 8 such blocks whose `d = d_super * sc` and `m = -dmin * mc` need up to 17
//! significant bits: those are held as f32 ([`BlockScale`]), 6 bits per weight, still exact.
//!
//! Activations are quantized per row in blocks of 32 (int8, one f32 scale per block, as
//! llama.cpp does for its Q4_1 product): a block's sum of products is then an exact integer dot
//! product, `y[n] += d * xs * sum(q * xq) + m * sum(x)` (the offset term uses the exact f32 sum
//! of the block). The rounding of x to 8 bits per block of 32 values is the only approximation;
//! its effect on perplexity is measured by the quality tests (tests/python/test_quality.py).
//!
//! Kernels: AVX-512 VNNI (`vpdpbusd` on 512-bit vectors) or AVX2 (`vpmaddubsw`) on x86_64
//! (`x86.rs`), detected at run time; simd128 (`i32x4.dot_i16x8_s`) on wasm32 built with it (the
//! guests are; `wasm.rs`), or relaxed SIMD's 8-bit dot product with the `relaxed-simd` feature
//! (crate slm-wasm-relaxed); a portable version elsewhere (here). [`super::dispatch`] quantizes x
//! ([`super::quantize`]), picks the kernel and splits the panels across threads.

use half::f16;

use super::dispatch::panel_kernels;
use super::quantize::{Activations, QuantRows};

/// How the blocks' `d` and `m` are stored: float16 (Q4_0 and Q4_1 files, 2 bytes each) or f32
/// (Q4_K, whose products of two scales float16 cannot hold). Every kernel widens them to f32.
pub trait BlockScale: Copy + Send + Sync + 'static {
    const ZERO: Self;

    fn to_f32(self) -> f32;

    /// Eight values at `p`, widened.
    ///
    /// # Safety
    /// `p` points at 8 readable values; the CPU has AVX and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;

    /// Sixteen values at `p`, widened.
    ///
    /// # Safety
    /// `p` points at 16 readable values; the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;

    /// Four values at `p`, widened.
    ///
    /// # Safety
    /// `p` points at 4 readable values.
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    unsafe fn load4(p: *const Self) -> std::arch::wasm32::v128;

    /// The scales as slm-wasm-relaxed reads them: a type of the same size and bits.
    #[cfg(all(
        target_arch = "wasm32",
        target_feature = "simd128",
        feature = "relaxed-simd"
    ))]
    type Bits;

    /// The relaxed-SIMD kernel (slm-wasm-relaxed) for these scales.
    #[cfg(all(
        target_arch = "wasm32",
        target_feature = "simd128",
        feature = "relaxed-simd"
    ))]
    const RELAXED_PANELS: slm_wasm_relaxed::Q4Kernel<Self::Bits>;
}

impl BlockScale for f16 {
    const ZERO: f16 = f16::ZERO;

    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's 16 bytes and F16C.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's 32 bytes and AVX-512F.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }

    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    #[inline(always)]
    unsafe fn load4(p: *const f16) -> std::arch::wasm32::v128 {
        // SAFETY: the caller's 8 bytes.
        unsafe { wasm::f16x4(p) }
    }

    #[cfg(all(
        target_arch = "wasm32",
        target_feature = "simd128",
        feature = "relaxed-simd"
    ))]
    type Bits = u16;
    #[cfg(all(
        target_arch = "wasm32",
        target_feature = "simd128",
        feature = "relaxed-simd"
    ))]
    const RELAXED_PANELS: slm_wasm_relaxed::Q4Kernel<u16> = slm_wasm_relaxed::q4_panels_f16;
}

impl BlockScale for f32 {
    const ZERO: f32 = 0.0;

    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's 32 bytes and AVX.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's 64 bytes and AVX-512F.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }

    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    #[inline(always)]
    unsafe fn load4(p: *const f32) -> std::arch::wasm32::v128 {
        // SAFETY: the caller's 16 bytes.
        unsafe { std::arch::wasm32::v128_load(p as *const std::arch::wasm32::v128) }
    }

    #[cfg(all(
        target_arch = "wasm32",
        target_feature = "simd128",
        feature = "relaxed-simd"
    ))]
    type Bits = f32;
    #[cfg(all(
        target_arch = "wasm32",
        target_feature = "simd128",
        feature = "relaxed-simd"
    ))]
    const RELAXED_PANELS: slm_wasm_relaxed::Q4Kernel<f32> = slm_wasm_relaxed::q4_panels_f32;
}

/// Weights per block along K (one `d` and one `m` each).
pub const QBLOCK: usize = 32;
/// Columns per panel: a panel's block is 512 contiguous bytes, one per thread split unit.
pub const Q4_PANEL: usize = 32;
/// Bytes of one (panel, block): 32 columns x 32 values x 4 bits.
const BLOCK_BYTES: usize = Q4_PANEL * QBLOCK / 2;

/// A Q4_1 weight `[K, N]` (K a multiple of 32), packed for the kernels, its `d` and `m` held
/// as `S`.
pub struct Q4Weights<S: BlockScale = f16> {
    pub k: usize,
    pub n: usize,
    /// Nibbles by (panel, block): 4 groups of 8 K values; in a group, 4 bytes per column; byte t
    /// of column j holds q[8g + t] (low nibble) and q[8g + 4 + t] (high nibble). So one 32-byte
    /// load is 8 columns x 4 bytes, ready for a 4-wide byte dot product per 32-bit lane.
    q: Vec<u8>,
    /// `d` and `m` by (panel, block, column), padded columns 0.
    d: Vec<S>,
    m: Vec<S>,
    /// How its products round activations.
    activations: Activations,
}

impl<S: BlockScale> std::fmt::Debug for Q4Weights<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scales = std::any::type_name::<S>().rsplit("::").next().unwrap_or("");
        write!(f, "Q4Weights<{scales}> {{ k: {}, n: {} }}", self.k, self.n)
    }
}

impl<S: BlockScale> Q4Weights<S> {
    /// `value(n, k)` is the value (0..16) of output channel n at k; `d` and `m` are `[N][K/32]`.
    #[cfg(test)]
    pub fn new(
        k: usize,
        n: usize,
        value: impl Fn(usize, usize) -> u8,
        d: &[S],
        m: &[S],
    ) -> Result<Q4Weights<S>, String> {
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
        d: &[S],
        m: &[S],
    ) -> Result<Q4Weights<S>, String> {
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
        let mut ds = vec![S::ZERO; panels * kb * Q4_PANEL];
        let mut ms = vec![S::ZERO; panels * kb * Q4_PANEL];
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
            activations: Activations::default(),
        })
    }

    /// The same weight, its products rounding activations as `activations` says.
    pub fn with_activations(self, activations: Activations) -> Self {
        Q4Weights {
            activations,
            ..self
        }
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
}

panel_kernels!(impl<S: BlockScale> Q4Weights<S>, Q4_PANEL);

mod portable {
    use super::*;

    /// # Safety
    /// As `dispatch::PanelKernels`.
    pub unsafe fn panels<S: BlockScale>(
        w: &Q4Weights<S>,
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
                    // SAFETY: row < m and column p * 32 + j < N, of a panel this call owns.
                    unsafe { *y.add(row * n + p * Q4_PANEL + j) = *v };
                }
            }
        }
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm;

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dispatch::kernels;
    use crate::kernels::dispatch::PanelKernels;
    use crate::kernels::testing::{same_on_threads, Lcg, SHAPES};

    fn weights(g: &mut Lcg, k: usize, n: usize) -> Q4Weights {
        weights_as(g, k, n, f16::from_f32)
    }

    /// Random weights, their scales and offsets held as `S` (`as_s` rounds them).
    fn weights_as<S: BlockScale>(
        g: &mut Lcg,
        k: usize,
        n: usize,
        as_s: impl Fn(f32) -> S,
    ) -> Q4Weights<S> {
        let q: Vec<u8> = (0..k * n).map(|_| (g.next() % 16) as u8).collect();
        let d: Vec<S> = (0..n * k / QBLOCK)
            .map(|_| as_s(0.002 + g.f32().abs() * 0.02))
            .collect();
        let m: Vec<S> = (0..n * k / QBLOCK)
            .map(|_| as_s(-0.15 * g.f32().abs()))
            .collect();
        Q4Weights::new(k, n, |c, kk| q[c * k + kk], &d, &m).unwrap()
    }

    /// The product with the dequantized weights, with x rounded as the kernel rounds it: the
    /// kernel must match it up to f32 rounding; and with x exact: within the 8-bit rounding.
    /// Float16 scales, then f32 ones (Q4_K's).
    fn check(m: usize, k: usize, n: usize) {
        let mut g = Lcg(m as u64 * 7919 + k as u64 * 31 + n as u64);
        check_with(m, weights(&mut g, k, n), &mut g);
        check_with(m, weights_as(&mut g, k, n, |v| v), &mut g);
    }

    fn check_with<S: BlockScale>(m: usize, w: Q4Weights<S>, g: &mut Lcg) {
        let (k, n) = (w.k, w.n);
        let x: Vec<f32> = (0..m * k).map(|_| g.f32()).collect();
        let xr = QuantRows::new(&x, m, k);
        let rounded: Vec<f32> = (0..m * k)
            .map(|i| xr.q[i] as f32 * xr.scale[i / QBLOCK])
            .collect();
        let wd = w.dequantized_kn();
        let mut y = vec![f32::NAN; m * n];
        // The entry point (which picks a kernel, and threads), then every kernel this CPU runs.
        w.matmul(&x, m, &mut y);
        compare("matmul", &w, &wd, &x, &rounded, &y, m);
        for (name, kernel) in kernels::<Q4Weights<S>>() {
            let mut y = vec![f32::NAN; m * n];
            // SAFETY: the kernel's CPU features were detected; x holds m rows, y m x n.
            unsafe { kernel(&w, &xr, m, y.as_mut_ptr(), 0, n.div_ceil(Q4_PANEL)) };
            compare(name, &w, &wd, &x, &rounded, &y, m);
        }
    }

    fn compare<S: BlockScale>(
        name: &str,
        w: &Q4Weights<S>,
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
        for (m, k, n) in SHAPES {
            check(m, k, n);
        }
    }

    /// Every kernel gives the portable kernel's bits, at every row count (the vector kernels
    /// compute rows in tiles, with remainders).
    #[test]
    fn q4_1_kernels_agree_bit_for_bit() {
        let mut g = Lcg(5);
        agree_bit_for_bit(weights(&mut g, 256, 80), &mut g);
        agree_bit_for_bit(weights_as(&mut g, 256, 80, |v| v), &mut g);
        // A last panel of 14 columns: a group of 4 columns cut short.
        agree_bit_for_bit(weights(&mut g, 64, 78), &mut g);
    }

    fn agree_bit_for_bit<S: BlockScale>(w: Q4Weights<S>, g: &mut Lcg) {
        let (k, n) = (w.k, w.n);
        for m in 1..=9 {
            let x: Vec<f32> = (0..m * k).map(|_| g.f32()).collect();
            let xr = QuantRows::new(&x, m, k);
            let run = |kernel: crate::kernels::dispatch::Kernel<Q4Weights<S>>| {
                let mut y = vec![f32::NAN; m * n];
                // SAFETY: the kernel's CPU features were detected; x holds m rows, y m x n.
                unsafe { kernel(&w, &xr, m, y.as_mut_ptr(), 0, n.div_ceil(Q4_PANEL)) };
                y.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
            };
            let kernels = kernels::<Q4Weights<S>>();
            let portable = run(kernels[0].1);
            for (name, kernel) in &kernels[1..] {
                assert!(
                    run(*kernel) == portable,
                    "{name} differs from portable at m={m}"
                );
            }
        }
    }

    #[test]
    fn q4_1_matmul_is_the_same_on_threads() {
        let (m, k, n) = (6, 1024, 1000);
        let mut g = Lcg(11);
        let w = weights(&mut g, k, n);
        let x: Vec<f32> = (0..m * k).map(|_| g.f32()).collect();
        let one = same_on_threads(m * n, |y| w.matmul(&x, m, y));
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
