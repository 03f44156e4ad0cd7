//! The Q4_1 kernel for wasm32 with simd128 (`i32x4.dot_i16x8_s`).

use std::arch::wasm32::*;

use super::*;
use crate::kernels::quantize::wasm::i8x4_twice;

/// Four float16 at `p` as f32 (finite values: the exponent is rebased by a multiply, which
/// also handles zeros and subnormals).
///
/// # Safety
/// `p` points at 4 readable float16.
#[inline(always)]
unsafe fn f16x4(p: *const f16) -> v128 {
    // SAFETY: the caller's 8 bytes (an unaligned load).
    let h = u32x4_extend_low_u16x8(unsafe { v128_load64_zero(p as *const u64) });
    let magnitude = f32x4_mul(
        u32x4_shl(v128_and(h, u32x4_splat(0x7fff)), 13),
        f32x4_splat(f32::from_bits(0x7780_0000)),
    ); // 2^112
    v128_or(magnitude, u32x4_shl(v128_and(h, u32x4_splat(0x8000)), 16))
}

/// # Safety
/// As `dispatch::PanelKernels`.
pub unsafe fn panels(w: &Q4Weights, x: &QuantRows, m: usize, y: *mut f32, p0: usize, p1: usize) {
    let (k, n, kb) = (w.k, w.n, w.k / QBLOCK);
    let nib = u8x16_splat(15);
    let mut out = [0f32; Q4_PANEL];
    // SAFETY: for p < p1 <= N/32 (rounded up), b < K/32 and row < m, the block's 512 bytes,
    // its 32 scales and offsets, and the row's 32 quantized values are inside `w` and `x`;
    // the row's columns p * 32 .. p * 32 + cols are inside y, in a panel this call owns.
    unsafe {
        for p in p0..p1 {
            let cols = Q4_PANEL.min(n - p * Q4_PANEL);
            for row in 0..m {
                let mut facc = [f32x4_splat(0.0); Q4_PANEL / 4];
                for b in 0..kb {
                    let blk = w.q.as_ptr().add((p * kb + b) * BLOCK_BYTES);
                    let xq = x.q.as_ptr().add(row * k + b * QBLOCK);
                    // Per 4 columns: two lanes per column (pairs of K values), added at the
                    // end.
                    let mut acc = [[i32x4_splat(0); 2]; Q4_PANEL / 4];
                    for g in 0..4 {
                        let xg = xq.add(8 * g);
                        let (xa, xb) = (i8x4_twice(xg), i8x4_twice(xg.add(4)));
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
