//! Products against 4-bit weights in blocks of 32 with a scale `d` and an offset `m` per block
//! and column (slm-engine's `Q4Weights`: Q4_0, Q4_1, Q4_K), on
//! `i16x8.relaxed_dot_i8x16_i7x16_s` (x86: one `pmaddubsw`).
//!
//! The instruction multiplies 8-bit x by a second operand that it defines exactly only below
//! 128: 4-bit weights (0..15) always are, so every engine gives the same pairs of products. A
//! pair's sum is at most 2 * 128 * 15 = 3,840 in magnitude, so a block's 8 pairs per 16-bit lane
//! (4 groups x low and high nibbles) stay below 32,767: the sums are exact integers, whatever
//! an engine would do on overflow.

use std::arch::wasm32::*;

/// Weights per block along K.
pub const BLOCK: usize = 32;
/// Columns per panel.
pub const PANEL: usize = 32;
/// Bytes of one (panel, block): 32 columns x 32 values x 4 bits.
const BLOCK_BYTES: usize = PANEL * BLOCK / 2;

/// One product's operands, as slm-engine's `Q4Weights` and `QuantRows` hold them. `S` is how
/// the scales are stored: float16 bits (`u16`) or f32.
pub struct Q4Product<'a, S> {
    pub k: usize,
    pub n: usize,
    /// Nibbles by (panel, block): 4 groups of 8 K values; in a group, 4 bytes per column; byte
    /// t of a column holds K values 8g + t (low nibble) and 8g + 4 + t (high nibble).
    pub q: &'a [u8],
    /// `d` and `m` by (panel, block, column).
    pub d: &'a [S],
    pub m: &'a [S],
    /// The rows of x quantized to 8 bits (row stride k), and per row and block their scale
    /// and the sum of their f32 values.
    pub xq: &'a [i8],
    pub x_scale: &'a [f32],
    pub x_sum: &'a [f32],
}

/// [`q4_panels_f16`] or [`q4_panels_f32`].
pub type Q4Kernel<S> = unsafe fn(&Q4Product<S>, usize, *mut f32, usize, usize);

/// `y[r][p * 32 ..] = x[r] . w[:, panel p]` for rows `r < rows` and panels `p0 .. p1`.
///
/// # Safety
/// The slices hold what `Q4Product` says for k x n weights (k a multiple of 32) and `rows`
/// rows; `y` has `rows` rows of n floats, and columns `p0 * 32 .. min(p1 * 32, n)` of each are
/// this call's to write. The engine runs relaxed SIMD (the module would not validate
/// otherwise).
#[target_feature(enable = "relaxed-simd")]
pub unsafe fn q4_panels_f16(w: &Q4Product<u16>, rows: usize, y: *mut f32, p0: usize, p1: usize) {
    // SAFETY: the caller's contract.
    unsafe { panels(w, rows, y, p0, p1) }
}

/// As [`q4_panels_f16`], scales as f32.
///
/// # Safety
/// As [`q4_panels_f16`].
#[target_feature(enable = "relaxed-simd")]
pub unsafe fn q4_panels_f32(w: &Q4Product<f32>, rows: usize, y: *mut f32, p0: usize, p1: usize) {
    // SAFETY: the caller's contract.
    unsafe { panels(w, rows, y, p0, p1) }
}

/// How a block's scales are read: four at a time, as f32.
trait Scale: Copy {
    /// # Safety
    /// `p` points at 4 readable values.
    unsafe fn load4(p: *const Self) -> v128;
}

impl Scale for f32 {
    #[inline(always)]
    unsafe fn load4(p: *const f32) -> v128 {
        // SAFETY: the caller's 16 bytes.
        unsafe { v128_load(p as *const v128) }
    }
}

impl Scale for u16 {
    /// Float16 bits (finite values: the exponent is rebased by a multiply, which also handles
    /// zeros and subnormals; exact, as slm-engine's widening).
    #[inline(always)]
    unsafe fn load4(p: *const u16) -> v128 {
        // SAFETY: the caller's 8 bytes (an unaligned load).
        let h = u32x4_extend_low_u16x8(unsafe { v128_load64_zero(p as *const u64) });
        let magnitude = f32x4_mul(
            u32x4_shl(v128_and(h, u32x4_splat(0x7fff)), 13),
            f32x4_splat(f32::from_bits(0x7780_0000)), // 2^112
        );
        v128_or(magnitude, u32x4_shl(v128_and(h, u32x4_splat(0x8000)), 16))
    }
}

/// Rows computed together: each row needs one accumulator (its x values are splat from
/// memory), so 8 rows fit the registers (prefill 10-15% faster than 4; 12 and 16 slower).
const TILE: usize = 8;

/// # Safety
/// As [`q4_panels_f16`].
#[inline(always)]
unsafe fn panels<S: Scale>(w: &Q4Product<S>, rows: usize, y: *mut f32, p0: usize, p1: usize) {
    // SAFETY: the caller's contract, passed on; every tile's rows are below `rows`.
    unsafe {
        for p in p0..p1 {
            let mut row = 0;
            while row + TILE <= rows {
                tile::<S, TILE>(w, p, row, y);
                row += TILE;
            }
            while row < rows {
                tile::<S, 1>(w, p, row, y);
                row += 1;
            }
        }
    }
}

/// Panel `p` for rows `row0 .. row0 + R`. Per block, each row's groups of 4 x values are splat
/// to the 4 columns of a weight load; per 4 columns, the low and high nibbles of each group's 16
/// bytes meet x values 0..4 and 4..8 of the group, adding a column's products in pairs into two
/// 16-bit lanes; one pairwise widening per block gives the column sums. The float arithmetic
/// is the portable kernel's, operation for operation.
///
/// # Safety
/// As [`q4_panels_f16`], for panel p < p1 and rows `row0 .. row0 + R` below `rows`.
#[inline(always)]
unsafe fn tile<S: Scale, const R: usize>(w: &Q4Product<S>, p: usize, row0: usize, y: *mut f32) {
    let (k, n, kb) = (w.k, w.n, w.k / BLOCK);
    let cols = PANEL.min(n - p * PANEL);
    let nib = u8x16_splat(15);
    let mut facc = [[f32x4_splat(0.0); PANEL / 4]; R];
    // SAFETY: for b < K/32 the block's 512 bytes and its 32 scales and offsets are inside `w`;
    // for the tile's rows, their 32 quantized values, scale and sum are inside `w`'s x, and
    // columns p * 32 .. p * 32 + cols of their outputs are inside y, in a panel this call owns.
    unsafe {
        for b in 0..kb {
            let blk = w.q.as_ptr().add((p * kb + b) * BLOCK_BYTES);
            // Per row and group of 8 K values: x0..x3 and x4..x7, each four times.
            let mut xs = [[[i32x4_splat(0); 2]; 4]; R];
            for (r, xs) in xs.iter_mut().enumerate() {
                let xq = w.xq.as_ptr().add((row0 + r) * k + b * BLOCK);
                for (g, xs) in xs.iter_mut().enumerate() {
                    *xs = [
                        v128_load32_splat(xq.add(8 * g) as *const u32),
                        v128_load32_splat(xq.add(8 * g + 4) as *const u32),
                    ];
                }
            }
            // Per row: the block's scale and sum of x, splat once for the 8 groups of columns.
            let mut xsc = [f32x4_splat(0.0); R];
            let mut sx = [f32x4_splat(0.0); R];
            for r in 0..R {
                let i = (row0 + r) * kb + b;
                (xsc[r], sx[r]) = (f32x4_splat(w.x_scale[i]), f32x4_splat(w.x_sum[i]));
            }
            let sm = (p * kb + b) * PANEL;
            for c4 in 0..PANEL / 4 {
                // Per row: two 16-bit lanes per column.
                let mut acc = [i16x8_splat(0); R];
                for g in 0..4 {
                    let v = v128_load(blk.add(g * 128 + c4 * 16) as *const v128);
                    let (lo, hi) = (v128_and(v, nib), u8x16_shr(v, 4));
                    for (acc, xs) in acc.iter_mut().zip(&xs) {
                        let [x0, x1] = xs[g];
                        *acc = i16x8_add(*acc, i16x8_relaxed_dot_i8x16_i7x16(x0, lo));
                        *acc = i16x8_add(*acc, i16x8_relaxed_dot_i8x16_i7x16(x1, hi));
                    }
                }
                let d = S::load4(w.d.as_ptr().add(sm + c4 * 4));
                let mo = S::load4(w.m.as_ptr().add(sm + c4 * 4));
                for (r, acc) in acc.iter().enumerate() {
                    let sums = i32x4_extadd_pairwise_i16x8(*acc);
                    let f = f32x4_add(
                        facc[r][c4],
                        f32x4_mul(f32x4_convert_i32x4(sums), f32x4_mul(d, xsc[r])),
                    );
                    facc[r][c4] = f32x4_add(f, f32x4_mul(mo, sx[r]));
                }
            }
        }
        // The 32 columns of each row, the first `cols` written.
        let mut out = [0f32; PANEL];
        for (r, facc) in facc.iter().enumerate() {
            for (c4, f) in facc.iter().enumerate() {
                v128_store(out.as_mut_ptr().add(c4 * 4) as *mut v128, *f);
            }
            std::ptr::copy_nonoverlapping(out.as_ptr(), y.add((row0 + r) * n + p * PANEL), cols);
        }
    }
}
