//! Matrix products against f32 weights: the float matrices of a GGUF file (F32, F16 and BF16,
//! which the converter writes as f32) and the f32 layout of an export.
//! `y[m, n] = sum_k x[m, k] w(k, n)`.
//!
//! tract's f32 matmul gives other bits on every target (fused multiply-adds natively, none in
//! wasm; K split by each vector width), so greedy texts of a model with float matrices parted
//! between builds. Here every output is summed over k in order, multiply then add, on every
//! target: the lanes of a vector are different outputs, never parts of one sum, so a scalar, an
//! AVX2 and a simd128 build give the same bits.
//!
//! The weights are packed as the int8 kernel's ([`super::int8::pack_panels`]): panels of 64
//! columns, `[N/64][K][64]`. Kernels: AVX2 on x86_64 (chosen at run time), a portable one
//! elsewhere, written for the compiler to vectorize (simd128 on wasm32).

use super::int8::{pack_panels, Layout, PANEL};
use super::parallel::{parallel_ranges, OutPtr};

/// Columns of the smallest tile: column ranges given to a kernel start at a multiple of it.
const BLOCK: usize = 16;

/// An f32 weight, packed in panels.
pub struct F32Weights {
    pub k: usize,
    pub n: usize,
    /// The layout it was read from (it is stored in panels either way).
    pub layout: Layout,
    /// `[N/PANEL][K][PANEL]`, the last panel padded with zeros.
    w: Vec<f32>,
}

impl std::fmt::Debug for F32Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "F32Weights {{ k: {}, n: {}, layout: {:?} }}",
            self.k, self.n, self.layout
        )
    }
}

impl F32Weights {
    /// `values` holds `k * n` floats in `layout`.
    pub fn new(k: usize, n: usize, layout: Layout, values: Vec<f32>) -> Result<F32Weights, String> {
        if values.len() != k * n || k == 0 || n == 0 {
            return Err(format!(
                "f32 weight of {} values for K={k} N={n}",
                values.len()
            ));
        }
        Ok(F32Weights {
            k,
            n,
            layout,
            w: pack_panels(k, n, layout, values),
        })
    }

    /// Output channel `c` (K values) into `out`: a token's row of a tied embedding table.
    pub fn copy_column(&self, c: usize, out: &mut [f32]) {
        assert!(c < self.n && out.len() == self.k);
        let base = (c / PANEL) * self.k * PANEL + c % PANEL;
        for (kk, o) in out.iter_mut().enumerate() {
            *o = self.w[base + kk * PANEL];
        }
    }

    /// `y = x @ W` for `x` `[m, K]` and `y` `[m, N]`, row-major.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        assert_eq!(x.len(), m * self.k);
        assert_eq!(y.len(), m * self.n);
        if m == 0 {
            return;
        }
        let out = OutPtr(y.as_mut_ptr());
        let blocks = self.n.div_ceil(BLOCK);
        let run = |b0: usize, b1: usize| {
            let (n0, n1) = (b0 * BLOCK, (b1 * BLOCK).min(self.n));
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
                // SAFETY: the CPU has AVX2; the rest is the caller's contract.
                return unsafe { avx2_panels(self, x, m, y.0, n0, n1) };
            }
        }
        // SAFETY: the caller's contract.
        unsafe { panels(self, x, m, y.0, n0, n1) }
    }
}

/// Columns `s..s + W` of a panel for rows `row0..row0 + R` of x: R * W sums over k in order,
/// each weight vector loaded once for the R rows. `out` is `[R][PANEL]`.
#[inline(always)]
fn tile<const R: usize, const W: usize>(
    panel: &[f32],
    x: &[f32],
    k: usize,
    row0: usize,
    s: usize,
    out: &mut [[f32; PANEL]; TILE_ROWS],
) {
    let mut acc = [[0f32; W]; R];
    for kk in 0..k {
        let w: &[f32; W] = panel[kk * PANEL + s..kk * PANEL + s + W]
            .try_into()
            .unwrap();
        for (r, acc) in acc.iter_mut().enumerate() {
            let xv = x[(row0 + r) * k + kk];
            for j in 0..W {
                // Multiply, then add: Rust never fuses them, on any target.
                acc[j] += xv * w[j];
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        out[r][s..s + W].copy_from_slice(acc);
    }
}

/// Rows computed together in a prefill.
const TILE_ROWS: usize = 4;

/// Columns of a prefill tile in the portable body: its accumulators (TILE_ROWS x this) take 8 of
/// the 16 vector registers of 128 bits (the order of each sum does not depend on the tile's
/// shape).
const TILE_COLS: usize = 8;

/// Columns n0..n1 of every row: whole panels in tiles of 64 columns for a single row
/// (decode), of TILE_ROWS rows by TILE_COLS columns otherwise. Written for the compiler to
/// vectorize (simd128 on wasm32); x86_64 with AVX2 runs [`avx2_panels`], the same sums.
///
/// # Safety
/// As [`F32Weights::columns`].
unsafe fn panels(w: &F32Weights, x: &[f32], m: usize, y: *mut f32, n0: usize, n1: usize) {
    let (k, n) = (w.k, w.n);
    let mut out = [[0f32; PANEL]; TILE_ROWS];
    for p in n0 / PANEL..n1.div_ceil(PANEL) {
        let panel = &w.w[p * k * PANEL..(p + 1) * k * PANEL];
        let lo = n0.max(p * PANEL) - p * PANEL;
        let hi = n1.min((p + 1) * PANEL) - p * PANEL;
        let mut row = 0;
        while row < m {
            let rows = if m - row >= TILE_ROWS {
                for s in (lo..hi).step_by(TILE_COLS) {
                    tile::<TILE_ROWS, TILE_COLS>(panel, x, k, row, s, &mut out);
                }
                TILE_ROWS
            } else {
                if lo == 0 && hi > PANEL - BLOCK {
                    tile::<1, PANEL>(panel, x, k, row, 0, &mut out);
                } else {
                    for s in (lo..hi).step_by(BLOCK) {
                        tile::<1, BLOCK>(panel, x, k, row, s, &mut out);
                    }
                }
                1
            };
            for (r, out) in out.iter().enumerate().take(rows) {
                // SAFETY: row + r < m and p * PANEL + hi <= n1 <= N: inside y, in the columns
                // this call owns.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        out.as_ptr().add(lo),
                        y.add((row + r) * n + p * PANEL + lo),
                        hi - lo,
                    )
                };
            }
            row += rows;
        }
    }
}

/// Rows of an AVX2 prefill tile: 4 rows by 16 columns take 8 of the 16 registers (6 rows ran
/// slower here).
#[cfg(target_arch = "x86_64")]
const X86_ROWS: usize = 4;

/// The kernel body with AVX2 tiles ([`x86::tile`]) where the portable body uses [`tile`].
///
/// # Safety
/// As [`F32Weights::columns`], on a CPU with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_panels(w: &F32Weights, x: &[f32], m: usize, y: *mut f32, n0: usize, n1: usize) {
    let (k, n) = (w.k, w.n);
    let mut out = [[0f32; PANEL]; X86_ROWS];
    let o = out.as_mut_ptr() as *mut f32;
    // SAFETY: panels p below N/PANEL rounded up hold K x PANEL floats; tiles start at s, a
    // multiple of 16 below hi <= PANEL, and span at most PANEL - s columns; rows row..row + R
    // <= m of x; y receives columns lo..hi of panel p of rows below m, inside n0..n1 (the
    // caller's) and below N.
    unsafe {
        for p in n0 / PANEL..n1.div_ceil(PANEL) {
            let panel = w.w.as_ptr().add(p * k * PANEL);
            let lo = n0.max(p * PANEL) - p * PANEL;
            let hi = n1.min((p + 1) * PANEL) - p * PANEL;
            let mut row = 0;
            while row < m {
                let xr = x.as_ptr().add(row * k);
                let rows = if m - row >= X86_ROWS {
                    for s in (lo..hi).step_by(16) {
                        x86::tile::<X86_ROWS, 2>(panel.add(s), k, xr, o.add(s));
                    }
                    X86_ROWS
                } else {
                    if lo == 0 && hi > PANEL - BLOCK {
                        x86::tile::<1, 8>(panel, k, xr, o);
                    } else {
                        for s in (lo..hi).step_by(16) {
                            x86::tile::<1, 2>(panel.add(s), k, xr, o.add(s));
                        }
                    }
                    1
                };
                for r in 0..rows {
                    std::ptr::copy_nonoverlapping(
                        o.add(r * PANEL + lo),
                        y.add((row + r) * n + p * PANEL + lo),
                        hi - lo,
                    );
                }
                row += rows;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::PANEL;

    /// R rows of x by NV * 8 columns of a panel, over all of K, as [`super::tile`] computes
    /// them. `w` points at the tile's first column in the panel (rows of PANEL floats); `out`
    /// is `[R][PANEL]`.
    ///
    /// # Safety
    /// The CPU has AVX2; `w` has K rows of PANEL floats with NV * 8 of them from `w`, `x` R
    /// rows of K floats, `out` R rows of PANEL floats with NV * 8 from `out`.
    #[inline(always)]
    pub(super) unsafe fn tile<const R: usize, const NV: usize>(
        w: *const f32,
        k: usize,
        x: *const f32,
        out: *mut f32,
    ) {
        // SAFETY: every pointer stays inside the caller's ranges (kk < K, r < R, v < NV).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NV]; R];
            for kk in 0..k {
                let wk = w.add(kk * PANEL);
                let mut xb = [_mm256_setzero_ps(); R];
                for (r, xb) in xb.iter_mut().enumerate() {
                    *xb = _mm256_broadcast_ss(&*x.add(r * k + kk));
                }
                for v in 0..NV {
                    let wv = _mm256_loadu_ps(wk.add(v * 8));
                    for r in 0..R {
                        // Multiply, then add (no FMA): the portable kernel's rounding.
                        acc[r][v] = _mm256_add_ps(acc[r][v], _mm256_mul_ps(xb[r], wv));
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (v, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.add(r * PANEL + v * 8), *a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{reference_kn, same_on_threads, Lcg, SHAPES};

    fn weights(layout: Layout, k: usize, n: usize, g: &mut Lcg) -> (Vec<f32>, F32Weights) {
        let values: Vec<f32> = (0..k * n).map(|_| g.f32() * 0.1).collect();
        // The reference reads [K, N].
        let kn = match layout {
            Layout::KN => values.clone(),
            Layout::NK => {
                let mut t = vec![0f32; k * n];
                for nn in 0..n {
                    for kk in 0..k {
                        t[kk * n + nn] = values[nn * k + kk];
                    }
                }
                t
            }
        };
        (kn, F32Weights::new(k, n, layout, values).unwrap())
    }

    /// Each output as the one order computes it: k ascending, multiply then add.
    fn in_order(kn: &[f32], x: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                let mut acc = 0f32;
                for kk in 0..k {
                    acc += x[r * k + kk] * kn[kk * n + c];
                }
                y[r * n + c] = acc;
            }
        }
        y
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn f32_matmul_sums_every_output_in_order() {
        let odd = [
            (1, 1, 1),
            (1, 13, 77),
            (2, 17, 129),
            (4, 40, 72),
            (7, 31, 9),
        ];
        for layout in [Layout::KN, Layout::NK] {
            for (m, k, n) in SHAPES.into_iter().chain(odd) {
                let mut g = Lcg(m as u64 * 7919 + k as u64 * 31 + n as u64);
                let (kn, w) = weights(layout, k, n, &mut g);
                let x: Vec<f32> = (0..m * k).map(|_| g.f32()).collect();
                let mut y = vec![f32::NAN; m * n];
                w.matmul(&x, m, &mut y);
                // Bit for bit: the order is the contract, not only the value.
                assert_eq!(
                    bits(&y),
                    bits(&in_order(&kn, &x, m, k, n)),
                    "{layout:?} m={m} k={k} n={n}"
                );
                let reference = reference_kn(&kn, &x, m, k, n);
                for (a, b) in y.iter().zip(&reference) {
                    assert!((*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()));
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_kernel_gives_the_portable_kernels_bits() {
        if !crate::kernels::cpu::avx2_fma() {
            return;
        }
        for (m, k, n, n0, n1) in [
            (1, 64, 128, 0, 128),
            (5, 200, 96, 0, 96),
            (4, 576, 200, 16, 176),
            (9, 31, 64, 32, 64),
        ] {
            let mut g = Lcg(k as u64 * 31 + n as u64);
            let (_, w) = weights(Layout::KN, k, n, &mut g);
            let x: Vec<f32> = (0..m * k).map(|_| g.f32()).collect();
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            // SAFETY: a and b hold m * N floats, x holds m * K; the CPU has AVX2.
            unsafe {
                avx2_panels(&w, &x, m, a.as_mut_ptr(), n0, n1);
                panels(&w, &x, m, b.as_mut_ptr(), n0, n1);
            }
            assert_eq!(bits(&a), bits(&b), "m={m} k={k} n={n} columns {n0}..{n1}");
        }
    }

    #[test]
    fn f32_columns_of_a_tied_table_read_back() {
        let mut g = Lcg(3);
        let (kn, w) = weights(Layout::NK, 37, 150, &mut g);
        let mut col = vec![0f32; 37];
        for c in [0, 63, 64, 149] {
            w.copy_column(c, &mut col);
            let expected: Vec<f32> = (0..37).map(|kk| kn[kk * 150 + c]).collect();
            assert_eq!(col, expected);
        }
    }

    #[test]
    fn f32_matmul_is_the_same_on_threads() {
        let (m, k, n) = (6, 800, 1000);
        let mut g = Lcg(11);
        let (_, w) = weights(Layout::KN, k, n, &mut g);
        let x: Vec<f32> = (0..m * k).map(|_| g.f32()).collect();
        same_on_threads(m * n, |y| w.matmul(&x, m, y));
    }
}
