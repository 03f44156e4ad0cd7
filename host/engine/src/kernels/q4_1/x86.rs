//! The Q4_1 kernels for x86_64: AVX-512 VNNI (`vpdpbusd` on 512-bit vectors) or AVX2
//! (`vpmaddubsw`).

use std::arch::x86_64::*;

use super::*;

/// `acc + sum of 4 products u8 * i8` per 32-bit lane, for u8 <= 15: pairs sum to at most
/// 2 * 15 * 128, no i16 saturation.
///
/// # Safety
/// The CPU has AVX2.
#[inline(always)]
unsafe fn dot_avx2(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    // SAFETY: the caller runs on a CPU with AVX2.
    unsafe {
        _mm256_add_epi32(
            acc,
            _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)),
        )
    }
}

/// # Safety
/// As `dispatch::PanelKernels`, on a CPU with AVX2, FMA, F16C and AVX-512 F, BW and VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
pub unsafe fn panels_vnni<S: BlockScale>(
    w: &Q4Weights<S>,
    x: &QuantRows,
    m: usize,
    y: *mut f32,
    p0: usize,
    p1: usize,
) {
    let n = w.n;
    let mut out = [0f32; 4 * Q4_PANEL];
    let o = out.as_mut_ptr();
    // SAFETY: panels p < p1 <= N/32 (rounded up) and rows < m are inside `w`, `x` and `out`
    // (4 rows of 32); the copies write `cols` columns of panel p of rows < m: inside y, in a
    // panel this call owns. This function has the features `tile512` needs.
    unsafe {
        for p in p0..p1 {
            let cols = Q4_PANEL.min(n - p * Q4_PANEL);
            let mut row = 0;
            while row + 4 <= m {
                tile512::<S, 4>(w, p, x, row, o);
                for r in 0..4 {
                    std::ptr::copy_nonoverlapping(
                        o.add(r * Q4_PANEL),
                        y.add((row + r) * n + p * Q4_PANEL),
                        cols,
                    );
                }
                row += 4;
            }
            while row < m {
                tile512::<S, 1>(w, p, x, row, o);
                std::ptr::copy_nonoverlapping(o, y.add(row * n + p * Q4_PANEL), cols);
                row += 1;
            }
        }
    }
}

/// [`tile`] on 512-bit vectors, for AVX-512 VNNI: rows `row..row + MR` by the whole panel
/// `p` (two vectors of 16 columns), over all of K, into `out` (`[MR][Q4_PANEL]`). Each lane
/// does what a lane of [`tile`] does, in the same order: the same bits, with half the
/// instructions (the dot products and the float work per block are what bound the products
/// of several rows).
///
/// # Safety
/// Panel `p` and rows `row..row + MR` are inside `w`, `x` and `out`; the CPU has AVX-512 F,
/// BW and VNNI, and F16C.
#[inline(always)]
unsafe fn tile512<S: BlockScale, const MR: usize>(
    w: &Q4Weights<S>,
    p: usize,
    x: &QuantRows,
    row: usize,
    out: *mut f32,
) {
    let (k, kb) = (w.k, w.k / QBLOCK);
    // SAFETY: every offset below stays in panel p's blocks (b < K/32), in rows row..row + MR
    // of x, and in out's MR rows: the caller's ranges.
    unsafe {
        let nib = _mm512_set1_epi8(0x0F);
        let mut facc = [[_mm512_setzero_ps(); 2]; MR];
        for b in 0..kb {
            let blk = w.q.as_ptr().add((p * kb + b) * BLOCK_BYTES);
            let mut acc = [[_mm512_setzero_si512(); 2]; MR];
            // One row sums its high nibbles apart: four chains of dependent `vpdpbusd` rather
            // than two, each half as long (integer sums: the same bits in any order).
            let mut acc_hi = [[_mm512_setzero_si512(); 2]; MR];
            for g in 0..4 {
                let mut xa = [_mm512_setzero_si512(); MR];
                let mut xb = [_mm512_setzero_si512(); MR];
                for r in 0..MR {
                    let xp = x.q.as_ptr().add((row + r) * k + b * QBLOCK + 8 * g);
                    xa[r] = _mm512_set1_epi32((xp as *const i32).read_unaligned());
                    xb[r] = _mm512_set1_epi32((xp.add(4) as *const i32).read_unaligned());
                }
                for v in 0..2 {
                    let bytes = _mm512_loadu_si512(blk.add(g * 128 + v * 64) as *const __m512i);
                    let lo = _mm512_and_si512(bytes, nib);
                    let hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nib);
                    for r in 0..MR {
                        acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], lo, xa[r]);
                        if MR == 1 {
                            acc_hi[r][v] = _mm512_dpbusd_epi32(acc_hi[r][v], hi, xb[r]);
                        } else {
                            acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], hi, xb[r]);
                        }
                    }
                }
            }
            if MR == 1 {
                for v in 0..2 {
                    acc[0][v] = _mm512_add_epi32(acc[0][v], acc_hi[0][v]);
                }
            }
            let sm = (p * kb + b) * Q4_PANEL;
            for v in 0..2 {
                let d = S::load16(w.d.as_ptr().add(sm + v * 16));
                let mo = S::load16(w.m.as_ptr().add(sm + v * 16));
                for r in 0..MR {
                    let i = (row + r) * kb + b;
                    let xs = _mm512_set1_ps(*x.scale.get_unchecked(i));
                    let sx = _mm512_set1_ps(*x.sum.get_unchecked(i));
                    // As in `tile`: multiply, then add (no FMA).
                    let f = _mm512_add_ps(
                        facc[r][v],
                        _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][v]), _mm512_mul_ps(d, xs)),
                    );
                    facc[r][v] = _mm512_add_ps(f, _mm512_mul_ps(mo, sx));
                }
            }
        }
        for r in 0..MR {
            for v in 0..2 {
                _mm512_storeu_ps(out.add(r * Q4_PANEL + v * 16), facc[r][v]);
            }
        }
    }
}

/// # Safety
/// As `dispatch::PanelKernels`, on a CPU with AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn panels_avx2<S: BlockScale>(
    w: &Q4Weights<S>,
    x: &QuantRows,
    m: usize,
    y: *mut f32,
    p0: usize,
    p1: usize,
) {
    // 16 vector registers: 4 rows x 16 columns of accumulators at a time.
    // SAFETY: the caller's contract; this function has the features `panels` needs.
    unsafe { panels::<S, 2>(w, x, m, y, p0, p1) }
}

/// # Safety
/// As `dispatch::PanelKernels`, on a CPU with AVX2, FMA and F16C.
#[inline(always)]
unsafe fn panels<S: BlockScale, const NV4: usize>(
    w: &Q4Weights<S>,
    x: &QuantRows,
    m: usize,
    y: *mut f32,
    p0: usize,
    p1: usize,
) {
    let n = w.n;
    let mut out = [0f32; 4 * Q4_PANEL];
    let o = out.as_mut_ptr();
    // SAFETY: tiles of panels p < p1 <= N/32 (rounded up) and rows < m, columns in 0..32
    // (NV4 * 8 divides 32), are inside `w`, `x` and `out` (4 rows of 32); the copies
    // write `cols` columns of panel p of rows < m: inside y, in a panel this call owns.
    unsafe {
        for p in p0..p1 {
            let cols = Q4_PANEL.min(n - p * Q4_PANEL);
            let mut row = 0;
            // Four rows at a time (prefill): each unpacked weight vector feeds four dot
            // products.
            while row + 4 <= m {
                for c in (0..Q4_PANEL).step_by(8 * NV4) {
                    tile::<S, 4, NV4>(w, p, c, x, row, o.add(c));
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
                tile::<S, 1, 4>(w, p, 0, x, row, o);
                std::ptr::copy_nonoverlapping(o, y.add(row * n + p * Q4_PANEL), cols);
                row += 1;
            }
        }
    }
}

/// Rows `row..row + MR` by columns `c..c + 8 * NV` of panel `p`, over all of K, into `out`
/// (`[MR][Q4_PANEL]`, at column c).
///
/// # Safety
/// Panel `p`, rows `row..row + MR` and columns `c..c + 8 * NV` <= 32 are inside `w`, `x` and
/// `out`; the CPU has AVX2, FMA and F16C.
#[inline(always)]
unsafe fn tile<S: BlockScale, const MR: usize, const NV: usize>(
    w: &Q4Weights<S>,
    p: usize,
    c: usize,
    x: &QuantRows,
    row: usize,
    out: *mut f32,
) {
    let (k, kb) = (w.k, w.k / QBLOCK);
    // SAFETY: every offset below stays in panel p's blocks (b < K/32) at columns
    // c..c + 8 * NV, in rows row..row + MR of x, and in out's MR rows: the caller's ranges.
    unsafe {
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
                        acc[r][v] = dot_avx2(acc[r][v], lo, xa[r]);
                        acc[r][v] = dot_avx2(acc[r][v], hi, xb[r]);
                    }
                }
            }
            let sm = (p * kb + b) * Q4_PANEL + c;
            for v in 0..NV {
                let d = S::load8(w.d.as_ptr().add(sm + v * 8));
                let mo = S::load8(w.m.as_ptr().add(sm + v * 8));
                for r in 0..MR {
                    let i = (row + r) * kb + b;
                    let xs = _mm256_set1_ps(*x.scale.get_unchecked(i));
                    let sx = _mm256_set1_ps(*x.sum.get_unchecked(i));
                    // Multiply, then add (no FMA): the same roundings as the wasm kernel, so
                    // that native and portable builds give the same logits (and greedy text).
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
