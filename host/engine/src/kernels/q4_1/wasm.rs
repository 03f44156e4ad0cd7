//! The Q4_1 kernel for wasm32 with simd128 (`i32x4.dot_i16x8_s`); with the `relaxed-simd`
//! feature, the one on relaxed SIMD's 8-bit dot product instead (crate slm-wasm-relaxed,
//! [`relaxed`]).

use std::arch::wasm32::*;

use super::*;
use crate::kernels::quantize::wasm::i8x4_twice;

/// Four float16 at `p` as f32 (finite values: the exponent is rebased by a multiply, which
/// also handles zeros and subnormals).
///
/// # Safety
/// `p` points at 4 readable float16.
#[inline(always)]
pub(super) unsafe fn f16x4(p: *const f16) -> v128 {
    // SAFETY: the caller's 8 bytes (an unaligned load).
    let h = u32x4_extend_low_u16x8(unsafe { v128_load64_zero(p as *const u64) });
    let magnitude = f32x4_mul(
        u32x4_shl(v128_and(h, u32x4_splat(0x7fff)), 13),
        f32x4_splat(f32::from_bits(0x7780_0000)),
    ); // 2^112
    v128_or(magnitude, u32x4_shl(v128_and(h, u32x4_splat(0x8000)), 16))
}

/// Rows computed together: the weight block is loaded and unpacked once for all of them.
const TILE: usize = 4;

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
    #[cfg(feature = "relaxed-simd")]
    // SAFETY: the caller's contract; the feature's promise that the engine runs relaxed SIMD.
    return unsafe { (S::RELAXED_PANELS)(&relaxed::product(w, x), m, y, p0, p1) };
    // SAFETY: the caller's contract, passed on; every tile's rows are below m.
    #[allow(unreachable_code)]
    unsafe {
        for p in p0..p1 {
            let mut row = 0;
            while row + TILE <= m {
                tile_rows::<S, TILE>(w, x, p, row, y);
                row += TILE;
            }
            while row < m {
                tile::<S, 1>(w, x, p, row, y);
                row += 1;
            }
        }
    }
}

/// Panel `p` for rows `row0 .. row0 + R` (decode's single rows). Loop order: per block, the
/// rows' 8-bit values are widened once and arranged to meet the weights; then per 4 columns,
/// one accumulator per row stays in a register while the 4 groups of weight bytes are split
/// once and multiplied with every row. (One row at a time with the 32 columns' accumulators
/// live spilled them to memory on every update.) Each row's block sums are the portable
/// kernel's integers, and its float arithmetic is the portable kernel's, operation for
/// operation.
///
/// The split: a group's 16 bytes (4 columns x 4 bytes, byte t of a column holding K values t
/// and 4 + t as nibbles) read as eight 16-bit lanes, two per column, give four vectors of
/// weights by mask and shift alone (no widening): the low and high nibbles of the even bytes
/// (K 0, 2 and 4, 6 of each column) and of the odd bytes (K 1, 3 and 5, 7). Each meets x
/// values in the same pattern, so `i32x4.dot_i16x8_s` adds a column's two products per lane:
/// the lanes are the 4 columns.
///
/// # Safety
/// As `dispatch::PanelKernels`, for panel p < p1 and rows `row0 .. row0 + R` < m.
#[inline(always)]
unsafe fn tile<S: BlockScale, const R: usize>(
    w: &Q4Weights<S>,
    x: &QuantRows,
    p: usize,
    row0: usize,
    y: *mut f32,
) {
    let (k, n, kb) = (w.k, w.n, w.k / QBLOCK);
    let cols = Q4_PANEL.min(n - p * Q4_PANEL);
    let nib = u16x8_splat(15);
    let mut facc = [[f32x4_splat(0.0); Q4_PANEL / 4]; R];
    // SAFETY: for b < K/32 the block's 512 bytes and its 32 scales and offsets are inside `w`;
    // for the tile's rows, their 32 quantized values, scale and sum are inside `x`, and columns
    // p * 32 .. p * 32 + cols of their outputs are inside y, in a panel this call owns.
    unsafe {
        for b in 0..kb {
            let blk = w.q.as_ptr().add((p * kb + b) * BLOCK_BYTES);
            // Per row and group of 8 K values (x0..x7): [x0 x2] [x4 x6] [x1 x3] [x5 x7], each
            // pair four times, as 16-bit lanes.
            let mut xws = [[[i16x8_splat(0); 4]; 4]; R];
            for (r, xw) in xws.iter_mut().enumerate() {
                let xq = x.q.as_ptr().add((row0 + r) * k + b * QBLOCK);
                for (g, xw) in xw.iter_mut().enumerate() {
                    let v = i16x8_extend_low_i8x16(v128_load64_zero(xq.add(8 * g) as *const u64));
                    *xw = [
                        i16x8_shuffle::<0, 2, 0, 2, 0, 2, 0, 2>(v, v),
                        i16x8_shuffle::<4, 6, 4, 6, 4, 6, 4, 6>(v, v),
                        i16x8_shuffle::<1, 3, 1, 3, 1, 3, 1, 3>(v, v),
                        i16x8_shuffle::<5, 7, 5, 7, 5, 7, 5, 7>(v, v),
                    ];
                }
            }
            let sm = (p * kb + b) * Q4_PANEL;
            for c4 in 0..Q4_PANEL / 4 {
                // Per row: the block sums of the 4 columns.
                let mut acc = [i32x4_splat(0); R];
                for g in 0..4 {
                    let v = v128_load(blk.add(g * 128 + c4 * 16) as *const v128);
                    let q = [
                        v128_and(v, nib),
                        v128_and(u16x8_shr(v, 4), nib),
                        v128_and(u16x8_shr(v, 8), nib),
                        u16x8_shr(v, 12),
                    ];
                    for (acc, xw) in acc.iter_mut().zip(&xws) {
                        let xg = &xw[g];
                        let even =
                            i32x4_add(i32x4_dot_i16x8(q[0], xg[0]), i32x4_dot_i16x8(q[1], xg[1]));
                        let odd =
                            i32x4_add(i32x4_dot_i16x8(q[2], xg[2]), i32x4_dot_i16x8(q[3], xg[3]));
                        *acc = i32x4_add(*acc, i32x4_add(even, odd));
                    }
                }
                let d = S::load4(w.d.as_ptr().add(sm + c4 * 4));
                let mo = S::load4(w.m.as_ptr().add(sm + c4 * 4));
                for (r, sums) in acc.iter().enumerate() {
                    let i = (row0 + r) * kb + b;
                    let (xs, sx) = (f32x4_splat(x.scale[i]), f32x4_splat(x.sum[i]));
                    let f = f32x4_add(
                        facc[r][c4],
                        f32x4_mul(f32x4_convert_i32x4(*sums), f32x4_mul(d, xs)),
                    );
                    facc[r][c4] = f32x4_add(f, f32x4_mul(mo, sx));
                }
            }
        }
        store(&facc, y.add(row0 * n + p * Q4_PANEL), n, cols);
    }
}

/// Panel `p` for rows `row0 .. row0 + R` (a prefill's tiles). Loop order: per block, the
/// rows' 8-bit values are widened once; then per 4 columns, two accumulators per row stay in
/// registers while the 4 groups of weight bytes are unpacked once and multiplied with every
/// row. Each row's arithmetic is that of the portable kernel, operation for operation. (The
/// split of [`tile`] needs twice the widened x values per row: for 4 rows they no longer fit
/// the registers, and prefill ran 15% slower.)
///
/// # Safety
/// As `dispatch::PanelKernels`, for panel p < p1 and rows `row0 .. row0 + R` < m.
#[inline(always)]
unsafe fn tile_rows<S: BlockScale, const R: usize>(
    w: &Q4Weights<S>,
    x: &QuantRows,
    p: usize,
    row0: usize,
    y: *mut f32,
) {
    let (k, n, kb) = (w.k, w.n, w.k / QBLOCK);
    let cols = Q4_PANEL.min(n - p * Q4_PANEL);
    let nib = u8x16_splat(15);
    let mut facc = [[f32x4_splat(0.0); Q4_PANEL / 4]; R];
    // SAFETY: for b < K/32 the block's 512 bytes and its 32 scales and offsets are inside `w`;
    // for the tile's rows, their 32 quantized values, scale and sum are inside `x`, and columns
    // p * 32 .. p * 32 + cols of their outputs are inside y, in a panel this call owns.
    unsafe {
        for b in 0..kb {
            let blk = w.q.as_ptr().add((p * kb + b) * BLOCK_BYTES);
            // Per row and group of 8 K values: its first and last 4 values, widened, twice.
            let mut xw = [[[i32x4_splat(0); 2]; 4]; R];
            for (r, xw) in xw.iter_mut().enumerate() {
                let xq = x.q.as_ptr().add((row0 + r) * k + b * QBLOCK);
                for (g, xw) in xw.iter_mut().enumerate() {
                    *xw = [i8x4_twice(xq.add(8 * g)), i8x4_twice(xq.add(8 * g + 4))];
                }
            }
            let sm = (p * kb + b) * Q4_PANEL;
            for c4 in 0..Q4_PANEL / 4 {
                // Per row: two lanes per column (pairs of K values), added at the end.
                let mut acc = [[i32x4_splat(0); 2]; R];
                for g in 0..4 {
                    let v = v128_load(blk.add(g * 128 + c4 * 16) as *const v128);
                    let (lo, hi) = (v128_and(v, nib), u8x16_shr(v, 4));
                    let (lo0, lo1) = (u16x8_extend_low_u8x16(lo), u16x8_extend_high_u8x16(lo));
                    let (hi0, hi1) = (u16x8_extend_low_u8x16(hi), u16x8_extend_high_u8x16(hi));
                    for (acc, xw) in acc.iter_mut().zip(&xw) {
                        let [xa, xb] = xw[g];
                        acc[0] = i32x4_add(acc[0], i32x4_dot_i16x8(lo0, xa));
                        acc[0] = i32x4_add(acc[0], i32x4_dot_i16x8(hi0, xb));
                        acc[1] = i32x4_add(acc[1], i32x4_dot_i16x8(lo1, xa));
                        acc[1] = i32x4_add(acc[1], i32x4_dot_i16x8(hi1, xb));
                    }
                }
                let d = S::load4(w.d.as_ptr().add(sm + c4 * 4));
                let mo = S::load4(w.m.as_ptr().add(sm + c4 * 4));
                for (r, acc) in acc.iter().enumerate() {
                    let i = (row0 + r) * kb + b;
                    let (xs, sx) = (f32x4_splat(x.scale[i]), f32x4_splat(x.sum[i]));
                    // [c0 c0 c1 c1] and [c2 c2 c3 c3] -> [c0 c1 c2 c3]
                    let sums = i32x4_add(
                        i32x4_shuffle::<0, 2, 4, 6>(acc[0], acc[1]),
                        i32x4_shuffle::<1, 3, 5, 7>(acc[0], acc[1]),
                    );
                    let f = f32x4_add(
                        facc[r][c4],
                        f32x4_mul(f32x4_convert_i32x4(sums), f32x4_mul(d, xs)),
                    );
                    facc[r][c4] = f32x4_add(f, f32x4_mul(mo, sx));
                }
            }
        }
        store(&facc, y.add(row0 * n + p * Q4_PANEL), n, cols);
    }
}

/// A tile's R rows of 32 column sums, the first `cols` of each written to `y` (row r at
/// `y + r * n`).
///
/// # Safety
/// `y` has R rows of `n` floats with `cols` writable from the start of each.
#[inline(always)]
unsafe fn store<const R: usize>(
    facc: &[[v128; Q4_PANEL / 4]; R],
    y: *mut f32,
    n: usize,
    cols: usize,
) {
    let mut out = [0f32; Q4_PANEL];
    // SAFETY: `out` holds the 32 columns; y the caller's rows.
    unsafe {
        for (r, facc) in facc.iter().enumerate() {
            for (c4, f) in facc.iter().enumerate() {
                v128_store(out.as_mut_ptr().add(c4 * 4) as *mut v128, *f);
            }
            std::ptr::copy_nonoverlapping(out.as_ptr(), y.add(r * n), cols);
        }
    }
}

/// The relaxed-SIMD kernel's operands ([`BlockScale::RELAXED_PANELS`]).
#[cfg(feature = "relaxed-simd")]
pub(super) mod relaxed {
    use slm_wasm_relaxed::{Q4Product, BLOCK, PANEL};

    use super::super::*;

    // The crate reads the blocks as `Q4Weights` lays them out.
    const _: () = assert!(BLOCK == QBLOCK && PANEL == Q4_PANEL);

    /// `w` and `x` as the crate takes them, the scales as `S::Bits`.
    pub(super) fn product<'a, S: BlockScale>(
        w: &'a Q4Weights<S>,
        x: &'a QuantRows,
    ) -> Q4Product<'a, S::Bits> {
        // SAFETY: `S::Bits` has the size and the bits of S (BlockScale's contract); the lengths
        // are the vectors'.
        let cast = |v: &'a [S]| unsafe {
            std::slice::from_raw_parts(v.as_ptr() as *const S::Bits, v.len())
        };
        Q4Product {
            k: w.k,
            n: w.n,
            q: &w.q,
            d: cast(&w.d),
            m: cast(&w.m),
            xq: &x.q,
            x_scale: &x.scale,
            x_sum: &x.sum,
        }
    }
}
