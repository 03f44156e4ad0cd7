//! The tied LM head of a Q4_1 model: int8 weights with one scale per output channel (the int8
//! export's table), multiplied by activations rounded to 8 bits per block of 32 as the Q4_1
//! products round them ([`super::quantize`]), so that a block's sum is one integer dot product.
//!
//! The head reads 28 MB per token (49152 x 576): with f32 activations, widening every weight to
//! f32 made it compute-bound (1.5 ms of a 8 ms token at 2 threads); byte dot products are not.
//!
//! Layout: panels of 32 columns; per (panel, block of 32 K values), 8 groups of 4 K values, in a
//! group 4 bytes per column (one 32-bit lane), each value stored as `w + 128` (a u8, the operand
//! `vpdpbusd` wants unsigned). The table is repacked in place, as it is also the embedding:
//! [`Q8Weights::copy_column`] reads a token's row back.

use super::dispatch::panel_kernels;
use super::q4_1::QBLOCK;
use super::quantize::{int_sum, Activations, QuantRows};

/// Columns per panel.
pub const Q8_PANEL: usize = 32;
const BLOCK_BYTES: usize = Q8_PANEL * QBLOCK;

/// An int8 table `[N][K]` with a scale per row, packed for products with 8-bit activations:
/// `y = x @ W^T * scale` (`PanelKernels::matmul`).
pub struct Q8Weights {
    pub k: usize,
    pub n: usize,
    q: Vec<u8>,
    /// One per output channel, padded with zeros to whole panels.
    scale: Vec<f32>,
    /// How its products round activations (as the Q4_1 products of our own layout).
    activations: Activations,
}

impl std::fmt::Debug for Q8Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Weights {{ k: {}, n: {} }}", self.k, self.n)
    }
}

/// Byte offset of value (column j of a panel, k) within the panel.
fn offset(j: usize, kk: usize) -> usize {
    let (b, r) = (kk / QBLOCK, kk % QBLOCK);
    b * BLOCK_BYTES + (r / 4) * (Q8_PANEL * 4) + j * 4 + r % 4
}

impl Q8Weights {
    /// `rows` holds the int8 table `[N][K]` (as bytes, two's complement), `scale` one value per
    /// row (output channel). K must be a multiple of 32, and the values in -127..=127, as a
    /// symmetric export writes them (the AVX2 kernel negates weights). Else the table is handed
    /// back, for the f32-activation kernels.
    pub fn from_rows(
        k: usize,
        n: usize,
        rows: Vec<u8>,
        scale: Vec<f32>,
    ) -> Result<Q8Weights, (Vec<u8>, Vec<f32>)> {
        if k == 0
            || n == 0
            || k % QBLOCK != 0
            || rows.len() != k * n
            || scale.len() != n
            || rows.contains(&0x80)
        {
            return Err((rows, scale));
        }
        let panels = n.div_ceil(Q8_PANEL);
        // Panel p holds rows p*32.. of the table, which are exactly the bytes it replaces:
        // repacked in place through a one-panel buffer (the table is the largest weight).
        let mut q = rows;
        q.resize(panels * Q8_PANEL * k, 0);
        let mut buf = vec![0u8; Q8_PANEL * k];
        for p in 0..panels {
            let panel = &mut q[p * Q8_PANEL * k..(p + 1) * Q8_PANEL * k];
            buf.copy_from_slice(panel);
            for j in 0..Q8_PANEL {
                for kk in 0..k {
                    panel[offset(j, kk)] = buf[j * k + kk] ^ 0x80;
                }
            }
        }
        let mut scale = scale;
        scale.resize(panels * Q8_PANEL, 0.0);
        Ok(Q8Weights {
            k,
            n,
            q,
            scale,
            activations: Activations::F32Scale,
        })
    }

    /// Output channel `c` (K values) into `out`: a token's row of the tied embedding table.
    pub fn copy_column(&self, c: usize, out: &mut [i8]) {
        assert!(c < self.n && out.len() == self.k);
        let panel = &self.q[(c / Q8_PANEL) * Q8_PANEL * self.k..];
        for (kk, o) in out.iter_mut().enumerate() {
            *o = (panel[offset(c % Q8_PANEL, kk)] ^ 0x80) as i8;
        }
    }
}

panel_kernels!(Q8Weights, Q8_PANEL);

mod portable {
    use super::*;

    /// # Safety
    /// As `dispatch::PanelKernels`.
    pub unsafe fn panels(
        w: &Q8Weights,
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        let (k, n, kb) = (w.k, w.n, w.k / QBLOCK);
        for p in p0..p1 {
            let panel = &w.q[p * Q8_PANEL * k..(p + 1) * Q8_PANEL * k];
            for row in 0..m {
                for j in 0..Q8_PANEL.min(n - p * Q8_PANEL) {
                    let mut acc = 0f32;
                    for b in 0..kb {
                        let mut isum = 0i32;
                        for r in 0..QBLOCK {
                            let kk = b * QBLOCK + r;
                            isum += (panel[offset(j, kk)] as i32 - 128) * x.q[row * k + kk] as i32;
                        }
                        acc += isum as f32 * x.scale[row * kb + b];
                    }
                    // SAFETY: row < m and column p * 32 + j < N, of a panel this call owns.
                    unsafe { *y.add(row * n + p * Q8_PANEL + j) = acc * w.scale[p * Q8_PANEL + j] };
                }
            }
        }
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm {
    use std::arch::wasm32::*;

    use super::*;

    /// A group's 16 bytes (4 columns x 4 K values, stored as `w + 128`) read as eight 16-bit
    /// lanes, two per column, split by mask and shift alone (no widening, no subtraction): the
    /// even bytes (K 0 and 2 of each column) and the odd bytes (K 1 and 3), still `w + 128`.
    /// Each meets x values in the same pattern, so `i32x4.dot_i16x8_s` adds a column's two
    /// products per lane: the lanes are the 4 columns. The block's `128 * sum(x)` is taken off
    /// once per block: the integer sums are the portable kernel's, exactly.
    ///
    /// # Safety
    /// As `dispatch::PanelKernels`.
    pub unsafe fn panels(
        w: &Q8Weights,
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        let (k, n, kb) = (w.k, w.n, w.k / QBLOCK);
        let low_byte = u16x8_splat(0x00ff);
        let mut out = [0f32; Q8_PANEL];
        // Per row and block: 128 times the sum of its quantized values.
        let offsets: Vec<i32> = x.q[..m * k]
            .chunks_exact(QBLOCK)
            .map(|b| 128 * int_sum(b))
            .collect();
        // SAFETY: for p < p1 <= N/32 (rounded up), b < K/32 and row < m, the block's 1 KiB,
        // the panel's 32 scales and the row's 32 quantized values are inside `w` and `x`; the
        // row's columns p * 32 .. p * 32 + cols are inside y, in a panel this call owns.
        unsafe {
            for p in p0..p1 {
                for row in 0..m {
                    let mut facc = [f32x4_splat(0.0); Q8_PANEL / 4];
                    for b in 0..kb {
                        let blk = w.q.as_ptr().add(p * Q8_PANEL * k + b * BLOCK_BYTES);
                        let xq = x.q.as_ptr().add(row * k + b * QBLOCK);
                        let mut acc = [i32x4_splat(0); Q8_PANEL / 4];
                        for g in 0..8 {
                            // x0..x3 of the group as [x0 x2] and [x1 x3], four times each.
                            let v = i16x8_extend_low_i8x16(v128_load32_zero(
                                xq.add(4 * g) as *const u32
                            ));
                            let xe = i16x8_shuffle::<0, 2, 0, 2, 0, 2, 0, 2>(v, v);
                            let xo = i16x8_shuffle::<1, 3, 1, 3, 1, 3, 1, 3>(v, v);
                            for (c4, acc) in acc.iter_mut().enumerate() {
                                let v =
                                    v128_load(blk.add(g * Q8_PANEL * 4 + c4 * 16) as *const v128);
                                let even = i32x4_dot_i16x8(v128_and(v, low_byte), xe);
                                let odd = i32x4_dot_i16x8(u16x8_shr(v, 8), xo);
                                *acc = i32x4_add(*acc, i32x4_add(even, odd));
                            }
                        }
                        let xs = f32x4_splat(x.scale[row * kb + b]);
                        let offset = i32x4_splat(offsets[row * kb + b]);
                        for (c4, acc) in acc.iter().enumerate() {
                            let sums = i32x4_sub(*acc, offset);
                            facc[c4] =
                                f32x4_add(facc[c4], f32x4_mul(f32x4_convert_i32x4(sums), xs));
                        }
                    }
                    for (c4, f) in facc.iter().enumerate() {
                        let s =
                            v128_load(w.scale.as_ptr().add(p * Q8_PANEL + c4 * 4) as *const v128);
                        v128_store(out.as_mut_ptr().add(c4 * 4) as *mut v128, f32x4_mul(*f, s));
                    }
                    let cols = Q8_PANEL.min(n - p * Q8_PANEL);
                    std::ptr::copy_nonoverlapping(
                        out.as_ptr(),
                        y.add(row * n + p * Q8_PANEL),
                        cols,
                    );
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// `acc + sum of 4 products (w - 128) * x` per 32-bit lane, for w stored as u8 and
    /// `x_abs` = |x|: AVX2 has no unsigned-by-signed 4-byte dot, so |x| (u8) multiplies w with
    /// x's sign (i8), and pairs stay within i16 (2 * 127 * 128).
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[inline(always)]
    pub(crate) unsafe fn dot_avx2(acc: __m256i, w: __m256i, x: __m256i, x_abs: __m256i) -> __m256i {
        // SAFETY: the caller runs on a CPU with AVX2.
        unsafe {
            let signed = _mm256_sign_epi8(_mm256_xor_si256(w, _mm256_set1_epi8(-128)), x);
            _mm256_add_epi32(
                acc,
                _mm256_madd_epi16(_mm256_maddubs_epi16(x_abs, signed), _mm256_set1_epi16(1)),
            )
        }
    }

    /// On 512-bit vectors: rows four at a time (several sequences' last positions, batched),
    /// each lane doing what a lane of [`panels`] does, in the same order (the same bits).
    ///
    /// # Safety
    /// As `dispatch::PanelKernels`, on a CPU with AVX2, FMA and AVX-512 F, BW and VNNI.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
    pub unsafe fn panels_vnni(
        w: &Q8Weights,
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        let n = w.n;
        let mut out = [0f32; 4 * Q8_PANEL];
        let o = out.as_mut_ptr();
        // SAFETY: panels p < p1 <= N/32 (rounded up) and rows < m are inside `w`, `x` and
        // `out` (4 rows of 32); the copies write `cols` columns of panel p of rows < m: inside
        // y, in a panel this call owns. This function has the features `tile512` needs.
        unsafe {
            for p in p0..p1 {
                let cols = Q8_PANEL.min(n - p * Q8_PANEL);
                let mut row = 0;
                while row + 4 <= m {
                    tile512::<4>(w, p, x, row, o);
                    for r in 0..4 {
                        let to = y.add((row + r) * n + p * Q8_PANEL);
                        std::ptr::copy_nonoverlapping(o.add(r * Q8_PANEL), to, cols);
                    }
                    row += 4;
                }
                while row < m {
                    tile512::<1>(w, p, x, row, o);
                    std::ptr::copy_nonoverlapping(o, y.add(row * n + p * Q8_PANEL), cols);
                    row += 1;
                }
            }
        }
    }

    /// Rows `row..row + MR` by the whole panel `p` (two vectors of 16 columns), into `out`
    /// (`[MR][Q8_PANEL]`).
    ///
    /// # Safety
    /// Panel `p` and rows `row..row + MR` are inside `w`, `x` and `out`; the CPU has AVX-512 F,
    /// BW and VNNI.
    #[inline(always)]
    unsafe fn tile512<const MR: usize>(
        w: &Q8Weights,
        p: usize,
        x: &QuantRows,
        row: usize,
        out: *mut f32,
    ) {
        let (k, kb) = (w.k, w.k / QBLOCK);
        // SAFETY: the block's 1 KiB (b < K/32), the panel's 32 scales and the rows' quantized
        // values and block scales are inside `w` and `x`: the caller's ranges.
        unsafe {
            let mut facc = [[_mm512_setzero_ps(); 2]; MR];
            for b in 0..kb {
                let blk = w.q.as_ptr().add(p * Q8_PANEL * k + b * BLOCK_BYTES);
                let mut acc = [[_mm512_setzero_si512(); 2]; MR];
                // One row sums odd groups apart: four chains of dependent `vpdpbusd` rather
                // than two, each half as long (integer sums: the same bits in any order).
                let mut acc_odd = [[_mm512_setzero_si512(); 2]; MR];
                for g in 0..8 {
                    let mut xa = [_mm512_setzero_si512(); MR];
                    for (r, xa) in xa.iter_mut().enumerate() {
                        let xq = x.q.as_ptr().add((row + r) * k + b * QBLOCK + 4 * g);
                        *xa = _mm512_set1_epi32((xq as *const i32).read_unaligned());
                    }
                    for v in 0..2 {
                        let wv = _mm512_loadu_si512(
                            blk.add(g * Q8_PANEL * 4 + v * 64) as *const __m512i
                        );
                        for r in 0..MR {
                            if MR == 1 && g % 2 == 1 {
                                acc_odd[r][v] = _mm512_dpbusd_epi32(acc_odd[r][v], wv, xa[r]);
                            } else {
                                acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], wv, xa[r]);
                            }
                        }
                    }
                }
                if MR == 1 {
                    for v in 0..2 {
                        acc[0][v] = _mm512_add_epi32(acc[0][v], acc_odd[0][v]);
                    }
                }
                for r in 0..MR {
                    let i = (row + r) * kb + b;
                    let xq = x.q.as_ptr().add((row + r) * k + b * QBLOCK);
                    let xs = _mm512_set1_ps(*x.scale.get_unchecked(i));
                    let correction =
                        _mm512_set1_epi32(128 * int_sum(std::slice::from_raw_parts(xq, QBLOCK)));
                    for v in 0..2 {
                        let sums = _mm512_sub_epi32(acc[r][v], correction);
                        // Multiply, then add (no FMA), as the wasm kernel: the same logits.
                        facc[r][v] =
                            _mm512_add_ps(facc[r][v], _mm512_mul_ps(_mm512_cvtepi32_ps(sums), xs));
                    }
                }
            }
            for r in 0..MR {
                for v in 0..2 {
                    let s = _mm512_loadu_ps(w.scale.as_ptr().add(p * Q8_PANEL + v * 16));
                    _mm512_storeu_ps(out.add(r * Q8_PANEL + v * 16), _mm512_mul_ps(facc[r][v], s));
                }
            }
        }
    }

    /// # Safety
    /// As `dispatch::PanelKernels`, on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panels_avx2(
        w: &Q8Weights,
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        // SAFETY: the caller's contract; this function has the features `panels` needs.
        unsafe { panels(w, x, m, y, p0, p1) }
    }

    /// One row at a time (the head runs on the last position only), a whole panel per step.
    ///
    /// # Safety
    /// As `dispatch::PanelKernels`, on a CPU with AVX2 and FMA.
    #[inline(always)]
    unsafe fn panels(w: &Q8Weights, x: &QuantRows, m: usize, y: *mut f32, p0: usize, p1: usize) {
        let (k, n, kb) = (w.k, w.n, w.k / QBLOCK);
        let mut out = [0f32; Q8_PANEL];
        // SAFETY: for p < p1 <= N/32 (rounded up), b < K/32 and row < m, the block's 1 KiB,
        // the panel's 32 scales and the row's 32 quantized values (and its block's scale) are
        // inside `w` and `x`; the row's columns p * 32 .. p * 32 + cols are inside y, in a
        // panel this call owns.
        unsafe {
            for p in p0..p1 {
                for row in 0..m {
                    let mut facc = [_mm256_setzero_ps(); 4];
                    for b in 0..kb {
                        let blk = w.q.as_ptr().add(p * Q8_PANEL * k + b * BLOCK_BYTES);
                        let xq = x.q.as_ptr().add(row * k + b * QBLOCK);
                        let mut acc = [_mm256_setzero_si256(); 4];
                        for g in 0..8 {
                            let xa =
                                _mm256_set1_epi32((xq.add(4 * g) as *const i32).read_unaligned());
                            let xa_abs = _mm256_abs_epi8(xa);
                            for (v, a) in acc.iter_mut().enumerate() {
                                let wv = _mm256_loadu_si256(
                                    blk.add(g * Q8_PANEL * 4 + v * 32) as *const __m256i
                                );
                                *a = dot_avx2(*a, wv, xa, xa_abs);
                            }
                        }
                        let i = row * kb + b;
                        let xs = _mm256_set1_ps(*x.scale.get_unchecked(i));
                        for v in 0..4 {
                            // Multiply, then add (no FMA), as the wasm kernel: the same logits.
                            facc[v] = _mm256_add_ps(
                                facc[v],
                                _mm256_mul_ps(_mm256_cvtepi32_ps(acc[v]), xs),
                            );
                        }
                    }
                    for v in 0..4 {
                        let s = _mm256_loadu_ps(w.scale.as_ptr().add(p * Q8_PANEL + v * 8));
                        _mm256_storeu_ps(out.as_mut_ptr().add(v * 8), _mm256_mul_ps(facc[v], s));
                    }
                    let cols = Q8_PANEL.min(n - p * Q8_PANEL);
                    std::ptr::copy_nonoverlapping(
                        out.as_ptr(),
                        y.add(row * n + p * Q8_PANEL),
                        cols,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dispatch::kernels;
    use crate::kernels::dispatch::PanelKernels;
    use crate::kernels::testing::{Lcg, SHAPES};

    #[test]
    fn q8_head_matches_reference_and_keeps_its_rows() {
        for (m, k, n) in SHAPES {
            let mut g = Lcg((m * 1000 + k * 10 + n) as u64);
            // The symmetric int8 range, -127..=127.
            let rows: Vec<u8> = (0..k * n)
                .map(|_| (g.next() % 255) as u8 ^ 0x80)
                .map(|b| if b == 0x80 { 0x81 } else { b })
                .collect();
            let scale: Vec<f32> = (0..n)
                .map(|_| 0.001 + (g.next() % 100) as f32 * 1e-4)
                .collect();
            let x: Vec<f32> = (0..m * k)
                .map(|_| (g.next() % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let w = Q8Weights::from_rows(k, n, rows.clone(), scale.clone()).unwrap();
            let mut with_min = rows.clone();
            with_min[0] = 0x80;
            assert!(
                Q8Weights::from_rows(k, n, with_min, scale.clone()).is_err(),
                "-128 is refused"
            );
            let mut col = vec![0i8; k];
            for c in 0..n {
                w.copy_column(c, &mut col);
                assert!(
                    col.iter()
                        .zip(&rows[c * k..(c + 1) * k])
                        .all(|(a, b)| *a as u8 == *b),
                    "row {c}"
                );
            }
            let xr = QuantRows::new(&x, m, k);
            let reference: Vec<f32> = (0..m * n)
                .map(|i| {
                    let (r, c) = (i / n, i % n);
                    let dot: f64 = (0..k)
                        .map(|kk| {
                            rows[c * k + kk] as i8 as f64
                                * xr.q[r * k + kk] as f64
                                * xr.scale[r * k / QBLOCK + kk / QBLOCK] as f64
                        })
                        .sum();
                    (dot * scale[c] as f64) as f32
                })
                .collect();
            let mut portable: Option<Vec<u32>> = None;
            for (name, kernel) in kernels::<Q8Weights>() {
                let mut y = vec![f32::NAN; m * n];
                // SAFETY: the kernel's CPU features were detected; x holds m rows, y m x n.
                unsafe { kernel(&w, &xr, m, y.as_mut_ptr(), 0, n.div_ceil(Q8_PANEL)) };
                for (i, (a, b)) in y.iter().zip(&reference).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{name} m={m} k={k} n={n} at {i}: {a} vs {b}"
                    );
                }
                // Every kernel gives the portable kernel's bits (listed first).
                let bits: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                match &portable {
                    None => portable = Some(bits),
                    Some(p) => {
                        assert!(*p == bits, "{name} differs from portable m={m} k={k} n={n}")
                    }
                }
            }
            let mut y = vec![f32::NAN; m * n];
            w.matmul(&x, m, &mut y);
            for (a, b) in y.iter().zip(&reference) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "matmul: {a} vs {b}"
                );
            }
        }
    }
}
