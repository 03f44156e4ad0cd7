//! Matrix products against int8 weights with one f32 scale per output channel, activations in
//! f32: `y[m, n] = scale[n] * sum_k x[m, k] * q(k, n)`.
//!
//! The weights stay int8 in memory (a quarter of the f32 bytes) and are widened to f32 in
//! registers, so the result is the f32 product with the dequantized weights, up to the order of
//! the additions. An ONNX export writes them in one of two layouts ([`Layout`]); both are
//! repacked at load into panels of 64 columns (`[N/64][K][64]`), so that a row of x streams
//! through contiguous memory, one cache line per K step, for every weight: a tied LM head too
//! (its rows, the embedding table's, are read back as columns by [`QWeights::copy_column`]).
//!
//! Kernels: AVX2 on x86_64 (detected at run time), a portable version elsewhere (written so that
//! the compiler can vectorize it, e.g. to simd128 on wasm32). Both multiply then add, in the same
//! order, so they give the same bits (no FMA: wasm has none). Columns are split across
//! threads when there is enough work ([`super::parallel`]).

use super::parallel::{parallel_ranges, OutPtr};

/// Where the K and N axes of an int8 weight lie in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `[K, N]` row-major: a `MatMul` weight, a scale per column.
    KN,
    /// `[N, K]` row-major: a transposed weight such as a tied LM head, a scale per row.
    NK,
}

/// An int8 weight with per-output-channel scales.
pub struct QWeights {
    pub k: usize,
    pub n: usize,
    /// The layout it was read from (it is stored in panels either way).
    pub layout: Layout,
    /// int8 values, stored as bytes (two's complement), in panels of [`PANEL`] columns
    /// (`[N/PANEL][K][PANEL]`), the last one padded with zeros.
    q: Vec<u8>,
    /// One per output channel, padded with zeros to whole panels.
    scale: Vec<f32>,
}

/// Columns per panel of the packed layout.
pub const PANEL: usize = 64;

/// Columns of the smallest tile: column ranges given to a kernel start at a multiple of it.
const BLOCK: usize = 16;

impl std::fmt::Debug for QWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QWeights {{ k: {}, n: {}, layout: {:?} }}",
            self.k, self.n, self.layout
        )
    }
}

/// `values` (`k * n` of them, in `layout`) repacked into panels of [`PANEL`] columns
/// (`[N/PANEL][K][PANEL]`), the last one padded with zeros: the layout of every weight of the
/// f32-activation kernels (int8 here, f32 in [`super::float`]).
pub(crate) fn pack_panels<T: Copy + Default>(
    k: usize,
    n: usize,
    layout: Layout,
    values: Vec<T>,
) -> Vec<T> {
    debug_assert_eq!(values.len(), k * n);
    let panels = n.div_ceil(PANEL);
    match layout {
        Layout::KN => {
            let mut packed = vec![T::default(); panels * k * PANEL];
            for p in 0..panels {
                let (c0, width) = (p * PANEL, PANEL.min(n - p * PANEL));
                for kk in 0..k {
                    let dst = (p * k + kk) * PANEL;
                    packed[dst..dst + width]
                        .copy_from_slice(&values[kk * n + c0..kk * n + c0 + width]);
                }
            }
            packed
        }
        // Panel p holds rows p*64.. of the file, which are exactly the values it replaces:
        // transposed in place, one panel at a time through a small buffer (a tied LM head is the
        // largest weight; no second copy of it, not even while loading).
        Layout::NK => {
            let mut packed = values;
            packed.resize(panels * k * PANEL, T::default());
            let mut rows = vec![T::default(); PANEL * k];
            for p in 0..panels {
                let width = PANEL.min(n - p * PANEL);
                let panel = &mut packed[p * k * PANEL..(p + 1) * k * PANEL];
                rows[..width * k].copy_from_slice(&panel[..width * k]);
                panel.fill(T::default());
                for j in 0..width {
                    for (kk, &v) in rows[j * k..(j + 1) * k].iter().enumerate() {
                        panel[kk * PANEL + j] = v;
                    }
                }
            }
            packed
        }
    }
}

impl QWeights {
    /// `q` holds `k * n` int8 values (as bytes) in `layout`; `scale` one value per output channel.
    pub fn new(
        k: usize,
        n: usize,
        layout: Layout,
        q: Vec<u8>,
        scale: Vec<f32>,
    ) -> Result<QWeights, String> {
        if q.len() != k * n || scale.len() != n || k == 0 || n == 0 {
            return Err(format!(
                "int8 weight of {} values and {} scales for K={k} N={n}",
                q.len(),
                scale.len()
            ));
        }
        let panels = n.div_ceil(PANEL);
        let packed = pack_panels(k, n, layout, q);
        let mut scale = scale;
        scale.resize(panels * PANEL, 0.0);
        Ok(QWeights {
            k,
            n,
            layout,
            q: packed,
            scale,
        })
    }

    fn q(&self) -> &[i8] {
        // SAFETY: u8 and i8 have the same size and alignment.
        unsafe { std::slice::from_raw_parts(self.q.as_ptr() as *const i8, self.q.len()) }
    }

    /// Output channel `c` (K values) into `out`: a token's row of a tied embedding table.
    pub fn copy_column(&self, c: usize, out: &mut [i8]) {
        assert!(c < self.n && out.len() == self.k);
        let q = self.q();
        let base = (c / PANEL) * self.k * PANEL + c % PANEL;
        for (kk, o) in out.iter_mut().enumerate() {
            *o = q[base + kk * PANEL];
        }
    }

    /// The dequantized weight as f32 `[K, N]` (tests and references).
    #[cfg(test)]
    pub fn dequantized_kn(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.k * self.n];
        let mut col = vec![0i8; self.k];
        for nn in 0..self.n {
            self.copy_column(nn, &mut col);
            for kk in 0..self.k {
                w[kk * self.n + nn] = col[kk] as f32 * self.scale[nn];
            }
        }
        w
    }

    /// `y[m, n] = scale[n] * sum_k x[m, k] q(k, n)` for `x` `[m, K]` and `y` `[m, N]`, row-major.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        assert_eq!(x.len(), m * self.k);
        assert_eq!(y.len(), m * self.n);
        if m == 0 {
            return;
        }
        let out = OutPtr(y.as_mut_ptr());
        // Columns go to threads in blocks of 16 (every kernel's smallest column tile), so that a
        // decode step's products (9 or 3 panels wide) split evenly.
        let block = BLOCK;
        let blocks = self.n.div_ceil(block);
        let run = |b0: usize, b1: usize| {
            let (n0, n1) = (b0 * block, (b1 * block).min(self.n));
            // SAFETY: every call writes only columns n0..n1 of y; the ranges are disjoint.
            unsafe { self.columns(x, m, out, n0, n1) }
        };
        parallel_ranges(blocks, m * self.k * self.n, &run);
    }

    /// Computes columns `n0..n1` (n0 a multiple of [`BLOCK`]) of every row of y.
    ///
    /// # Safety
    /// `y` points at `m * N` floats, of which no other thread writes columns `n0..n1`;
    /// `x` holds `m * K`.
    unsafe fn columns(&self, x: &[f32], m: usize, y: OutPtr, n0: usize, n1: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            if super::cpu::avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA; the rest is the caller's contract.
                return unsafe { x86::kn_panels(self, x, m, y.0, n0, n1) };
            }
        }
        // SAFETY: the caller's contract.
        unsafe { portable::kn_panels(self, x, m, y.0, n0, n1) }
    }
}

mod portable {
    use super::{QWeights, PANEL};

    /// Packed KN layout, columns n0..n1: a panel's accumulators in an array the compiler keeps
    /// in vector registers (whole panels are computed, the columns in range written).
    ///
    /// # Safety
    /// As [`QWeights::columns`].
    pub unsafe fn kn_panels(w: &QWeights, x: &[f32], m: usize, y: *mut f32, n0: usize, n1: usize) {
        let (q, scale, k, n) = (w.q(), &w.scale[..], w.k, w.n);
        for p in n0 / PANEL..n1.div_ceil(PANEL) {
            let panel = &q[p * k * PANEL..(p + 1) * k * PANEL];
            let lo = n0.max(p * PANEL) - p * PANEL;
            let hi = n1.min((p + 1) * PANEL) - p * PANEL;
            for row in 0..m {
                let xr = &x[row * k..(row + 1) * k];
                let mut acc = [0f32; PANEL];
                for (kk, &xv) in xr.iter().enumerate() {
                    let w = &panel[kk * PANEL..(kk + 1) * PANEL];
                    for j in 0..PANEL {
                        acc[j] += xv * w[j] as f32;
                    }
                }
                for j in lo..hi {
                    // SAFETY: row < m and p * PANEL + j < n1 <= N: inside y, in the columns
                    // this call owns.
                    unsafe { *y.add(row * n + p * PANEL + j) = acc[j] * scale[p * PANEL + j] };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{QWeights, PANEL};

    /// 8 int8 at `p` widened to 8 f32.
    ///
    /// # Safety
    /// `p` points at 8 readable bytes; the CPU has AVX2.
    #[inline(always)]
    unsafe fn load8(p: *const i8) -> __m256 {
        // SAFETY: the caller's 8 bytes, on a CPU with AVX2.
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
    }

    /// A tile of MR rows of x by NV*8 columns of a panel, over all of K. `q` points at the
    /// tile's first column in the panel (rows of PANEL bytes); `out` is `[MR][PANEL]`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `q` has K rows of PANEL bytes with NV*8 of them from `q`, `x`
    /// MR rows of K floats, `out` MR rows of PANEL floats with NV*8 from `out`, `scale` NV*8.
    #[inline(always)]
    unsafe fn kn_tile<const MR: usize, const NV: usize>(
        q: *const i8,
        k: usize,
        x: *const f32,
        out: *mut f32,
        scale: *const f32,
    ) {
        // SAFETY: every pointer stays inside the ranges of the caller's contract (kk < K,
        // r < MR, v < NV), on a CPU with AVX2 and FMA.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NV]; MR];
            for kk in 0..k {
                let w = q.add(kk * PANEL);
                let mut xb = [_mm256_setzero_ps(); MR];
                for r in 0..MR {
                    xb[r] = _mm256_broadcast_ss(&*x.add(r * k + kk));
                }
                for v in 0..NV {
                    let wv = load8(w.add(v * 8));
                    for r in 0..MR {
                        // Multiply, then add (no FMA): the portable and wasm kernels' rounding,
                        // so every build gives the same bits.
                        acc[r][v] = _mm256_add_ps(acc[r][v], _mm256_mul_ps(xb[r], wv));
                    }
                }
            }
            for v in 0..NV {
                let s = _mm256_loadu_ps(scale.add(v * 8));
                for r in 0..MR {
                    _mm256_storeu_ps(out.add(r * PANEL + v * 8), _mm256_mul_ps(acc[r][v], s));
                }
            }
        }
    }

    /// Packed KN layout, columns n0..n1 (n0 a multiple of 16).
    ///
    /// # Safety
    /// As [`QWeights::columns`], on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kn_panels(w: &QWeights, x: &[f32], m: usize, y: *mut f32, n0: usize, n1: usize) {
        let (q, scale, k, n) = (w.q(), &w.scale[..], w.k, w.n);
        let mut out = [0f32; 4 * PANEL];
        let o = out.as_mut_ptr();
        // SAFETY: panels p < N/PANEL (rounded up) are inside the packed weights (K x PANEL
        // bytes each) and their scales; tiles start at s in lo..hi, a multiple of 16, and span
        // at most hi - s columns of the panel; rows row..row + 4 <= m of x; `out` holds 4
        // rows of PANEL; y receives columns lo..hi of panel p, which lie in n0..n1 (the
        // caller's) and below N.
        unsafe {
            for p in n0 / PANEL..n1.div_ceil(PANEL) {
                let panel = q.as_ptr().add(p * k * PANEL);
                let sp = scale.as_ptr().add(p * PANEL);
                // The panel's columns in range: lo a multiple of 16, the last panel's padding
                // beyond n.
                let lo = n0.max(p * PANEL) - p * PANEL;
                let hi = n1.min((p + 1) * PANEL) - p * PANEL;
                let mut row = 0;
                // Four rows at a time (prefill): each widened weight vector feeds four rows; the
                // panel (K x 64 bytes) stays in cache across the row tiles.
                while row + 4 <= m {
                    let xp = x.as_ptr().add(row * k);
                    for s in (lo..hi).step_by(16) {
                        kn_tile::<4, 2>(panel.add(s), k, xp, o.add(s), sp.add(s));
                    }
                    for r in 0..4 {
                        std::ptr::copy_nonoverlapping(
                            o.add(r * PANEL + lo),
                            y.add((row + r) * n + p * PANEL + lo),
                            hi - lo,
                        );
                    }
                    row += 4;
                }
                // One row at a time (decode): the whole panel width, a cache line of weights per
                // K step; a part of a panel (a thread's share) in tiles of 32 and 16 columns.
                while row < m {
                    let xr = x.as_ptr().add(row * k);
                    if lo == 0 && hi > 32 {
                        kn_tile::<1, 8>(panel, k, xr, o, sp);
                    } else {
                        let mut s = lo;
                        while s < hi {
                            if hi - s > 16 {
                                kn_tile::<1, 4>(panel.add(s), k, xr, o.add(s), sp.add(s));
                                s += 32;
                            } else {
                                kn_tile::<1, 2>(panel.add(s), k, xr, o.add(s), sp.add(s));
                                s += 16;
                            }
                        }
                    }
                    std::ptr::copy_nonoverlapping(
                        o.add(lo),
                        y.add(row * n + p * PANEL + lo),
                        hi - lo,
                    );
                    row += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{reference_kn, same_on_threads, Lcg, SHAPES};

    fn reference(w: &QWeights, x: &[f32], m: usize) -> Vec<f32> {
        let y = reference_kn(&w.dequantized_kn(), x, m, w.k, w.n);
        y.into_iter().map(|v| v as f32).collect()
    }

    fn check(layout: Layout, m: usize, k: usize, n: usize) {
        let mut g = Lcg(m as u64 * 1000003 + k as u64 * 1009 + n as u64);
        let q: Vec<u8> = (0..k * n).map(|_| g.i8()).collect();
        let scale: Vec<f32> = (0..n).map(|_| 0.001 + g.f32().abs() * 0.02).collect();
        let x: Vec<f32> = (0..m * k).map(|_| g.f32()).collect();
        let w = QWeights::new(k, n, layout, q, scale).unwrap();
        let expected = reference(&w, &x, m);
        let mut y = vec![f32::NAN; m * n];
        w.matmul(&x, m, &mut y);
        // Sums of k products of magnitude <= 127 * 0.021: the f32 rounding stays far below 1e-3.
        for (i, (a, b)) in y.iter().zip(&expected).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{layout:?} m={m} k={k} n={n} at {i}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn int8_matmul_matches_f32_reference() {
        for layout in [Layout::KN, Layout::NK] {
            // And K off the blocks of 32 (the int8 products take any K), N below a tile of 16.
            let odd = [
                (1, 1, 1),
                (1, 13, 77),
                (2, 17, 129),
                (4, 40, 72),
                (7, 31, 9),
            ];
            for (m, k, n) in SHAPES.into_iter().chain(odd) {
                check(layout, m, k, n);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_kernel_gives_the_portable_kernels_bits() {
        if !crate::kernels::cpu::avx2_fma() {
            return;
        }
        for (m, k, n) in [(1, 64, 128), (5, 200, 96), (4, 576, 200), (9, 31, 64)] {
            let mut g = Lcg(k as u64 * 31 + n as u64);
            let q: Vec<u8> = (0..k * n).map(|_| g.i8()).collect();
            let scale: Vec<f32> = (0..n).map(|_| 0.001 + g.f32().abs() * 0.02).collect();
            let x: Vec<f32> = (0..m * k).map(|_| g.f32()).collect();
            let w = QWeights::new(k, n, Layout::KN, q, scale).unwrap();
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            // SAFETY: a and b hold m * N floats, x holds m * K; the CPU has AVX2 and FMA.
            unsafe {
                x86::kn_panels(&w, &x, m, a.as_mut_ptr(), 0, n);
                portable::kn_panels(&w, &x, m, b.as_mut_ptr(), 0, n);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "m={m} k={k} n={n}");
        }
    }

    #[test]
    fn int8_matmul_is_the_same_on_threads() {
        // Enough work (m * k * n >= PARALLEL_MIN_MACS) to be split.
        let (m, k, n) = (6, 800, 1000);
        let mut g = Lcg(7);
        let q: Vec<u8> = (0..k * n).map(|_| g.i8()).collect();
        let scale: Vec<f32> = (0..n).map(|_| 0.01).collect();
        let x: Vec<f32> = (0..m * k).map(|_| g.f32()).collect();
        for layout in [Layout::KN, Layout::NK] {
            let w = QWeights::new(k, n, layout, q.clone(), scale.clone()).unwrap();
            let one = same_on_threads(m * n, |y| w.matmul(&x, m, y));
            for (a, b) in one.iter().zip(reference(&w, &x, m)) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{layout:?}: {a} vs {b}"
                );
            }
        }
    }
}
