//! A query row's dot products with consecutive keys, several keys at a time, each summed exactly
//! as [`super::dot`] sums it: lane l of a key accumulates elements l, l + 8, ... in order; the
//! 8 lanes are added in lane order. The vector code keeps one register of 8 lanes per key,
//! transposes 8 (AVX2) or 4 (simd128) keys' registers so that a register holds one lane of each
//! key, and adds those registers in lane order: every key's sum in the scalar order.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::{dot, dot_tail, KeyDots};

/// Scalar, or simd128 in wasm32.
pub(super) struct Portable;

impl KeyDots for Portable {
    #[inline(always)]
    fn dots(q: &[f32], keys: &[f32], d: usize, out: &mut [f32]) {
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        simd128(q, keys, d, out);
        #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
        for (j, o) in out.iter_mut().enumerate() {
            *o = dot(q, &keys[j * d..][..d]);
        }
    }

    #[inline(always)]
    fn widen(h: &[f16], out: &mut [f32]) {
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        widen_simd128(h, out);
        #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
        h.convert_to_f32_slice(out);
    }
}

/// `out[i]` = `h[i]` as f32, 8 at a time (the `half` crate converts one by one in wasm): each
/// value moved to the top 16 bits of a 32-bit lane, its exponent and mantissa shifted into
/// place and rebased by a multiply by 2^112 (as the Q4_1 kernel's `f16x4` does for its finite
/// scales; exact for zeros and subnormals too), its sign put back. Eight values with an
/// infinity or a NaN among them (rare in a KV cache: checked per 8, on the float16 bits) take a
/// slower path that keeps infinities and makes NaNs quiet, as the `half` crate and F16C do.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
fn widen_simd128(h: &[f16], out: &mut [f32]) {
    use std::arch::wasm32::*;
    assert_eq!(h.len(), out.len());
    let whole = h.len() / 8 * 8;
    let exponent16 = u16x8_splat(0x7c00);
    let (magnitude, sign) = (u32x4_splat(0x7fff_0000), u32x4_splat(0x8000_0000));
    let scale = f32x4_splat(f32::from_bits(0x7780_0000));
    let zero = u16x8_splat(0);
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 <= whole <= h.len(); wasm loads need no alignment.
        let x = unsafe { v128_load(h.as_ptr().add(i) as *const v128) };
        if v128_any_true(i16x8_eq(v128_and(x, exponent16), exponent16)) {
            widen_special(x, &mut out[i..i + 8]);
            continue;
        }
        // Lane j of each half: value j << 16.
        // (x86: `punpcklwd` / `punpckhwd` with zero.)
        let halves = [
            i16x8_shuffle::<0, 8, 1, 9, 2, 10, 3, 11>(zero, x),
            i16x8_shuffle::<4, 12, 5, 13, 6, 14, 7, 15>(zero, x),
        ];
        for (k, s) in halves.into_iter().enumerate() {
            let finite = f32x4_mul(u32x4_shr(v128_and(s, magnitude), 3), scale);
            let value = v128_or(finite, v128_and(s, sign));
            // SAFETY: i + 4 * k + 4 <= whole <= out.len().
            unsafe { v128_store(out.as_mut_ptr().add(i + 4 * k) as *mut v128, value) };
        }
    }
    h[whole..].convert_to_f32_slice(&mut out[whole..]);
}

/// [`widen_simd128`] for 8 float16 values `x` with an infinity or a NaN among them, into `out`.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(never)]
fn widen_special(x: std::arch::wasm32::v128, out: &mut [f32]) {
    use std::arch::wasm32::*;
    let (magnitude, exponent, mantissa, sign) = (
        u32x4_splat(0x7fff),
        u32x4_splat(0x7c00),
        u32x4_splat(0x03ff),
        u32x4_splat(0x8000),
    );
    let quiet = u32x4_splat(0x0040_0000);
    let (scale, infinity) = (
        f32x4_splat(f32::from_bits(0x7780_0000)),
        u32x4_splat(0x7f80_0000),
    );
    for (k, w) in [u32x4_extend_low_u16x8(x), u32x4_extend_high_u16x8(x)]
        .into_iter()
        .enumerate()
    {
        let m = u32x4_shl(v128_and(w, magnitude), 13);
        let finite = f32x4_mul(m, scale);
        let special = i32x4_eq(v128_and(w, exponent), exponent);
        let nan = v128_not(i32x4_eq(v128_and(w, mantissa), u32x4_splat(0)));
        let special_value = v128_or(v128_or(m, infinity), v128_and(nan, quiet));
        let value = v128_bitselect(special_value, finite, special);
        let value = v128_or(value, u32x4_shl(v128_and(w, sign), 16));
        // SAFETY: `out` holds 8 floats.
        unsafe { v128_store(out.as_mut_ptr().add(4 * k) as *mut v128, value) };
    }
}

/// AVX2 and F16C (x86_64); only inside functions compiled for them on a CPU that has them.
#[cfg(target_arch = "x86_64")]
pub(super) struct Avx2;

#[cfg(target_arch = "x86_64")]
impl KeyDots for Avx2 {
    #[inline(always)]
    fn dots(q: &[f32], keys: &[f32], d: usize, out: &mut [f32]) {
        // SAFETY: `Avx2` is used only by code that runs after checking that the CPU has AVX2
        // (`attend_block`), and by tests that check it first.
        unsafe { avx2(q, keys, d, out) }
    }

    #[inline(always)]
    fn widen(h: &[f16], out: &mut [f32]) {
        // SAFETY: as for `dots`: the CPU has F16C.
        unsafe { widen_f16c(h, out) }
    }
}

/// `out[i]` = `h[i]` as f32, 8 at a time by `vcvtph2ps`, inlined into the attention kernel (the
/// `half` crate's slice conversion checks the CPU on every call).
///
/// # Safety
/// The CPU has F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_f16c(h: &[f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert_eq!(h.len(), out.len());
    let whole = h.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 <= whole <= both lengths.
        unsafe {
            let x = _mm_loadu_si128(h.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(x));
        }
    }
    h[whole..].convert_to_f32_slice(&mut out[whole..]);
}

/// The keys' products past their last whole 8 (`d % 8` of them), added to `out`'s lane sums.
#[inline(always)]
fn add_tails(q: &[f32], keys: &[f32], d: usize, out: &mut [f32]) {
    let whole = d / 8 * 8;
    if whole < d {
        for (j, o) in out.iter_mut().enumerate() {
            *o += dot_tail(&q[whole..d], &keys[j * d + whole..(j + 1) * d]);
        }
    }
}

/// # Safety
/// The CPU has AVX2; `q` holds `d` values, `keys` `out.len() * d`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2(q: &[f32], keys: &[f32], d: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(q.len() >= d && keys.len() >= out.len() * d);
    let (n, chunks) = (out.len(), d / 8);
    let mut j = 0;
    while j + 8 <= n {
        // One register of 8 lanes per key; the keys' sums interleave (independent chains), each
        // adding its products chunk by chunk, in order.
        let mut r = [_mm256_setzero_ps(); 8];
        let block = &keys[j * d..(j + 8) * d];
        for c in 0..chunks {
            // SAFETY: c * 8 + 8 <= d: inside q, and inside each of the 8 keys of `block`.
            unsafe {
                let x = _mm256_loadu_ps(q.as_ptr().add(c * 8));
                for (kk, lanes) in r.iter_mut().enumerate() {
                    let y = _mm256_loadu_ps(block.as_ptr().add(kk * d + c * 8));
                    *lanes = _mm256_add_ps(*lanes, _mm256_mul_ps(x, y));
                }
            }
        }
        // 8x8 transpose: c[l] holds lane l of keys j..j + 8.
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let c = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        let mut sum = _mm256_add_ps(c[0], c[1]);
        for &lane in &c[2..] {
            sum = _mm256_add_ps(sum, lane);
        }
        let o = &mut out[j..j + 8];
        // SAFETY: `o` holds 8 floats.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), sum) };
        add_tails(q, &keys[j * d..], d, o);
        j += 8;
    }
    for (jj, o) in out.iter_mut().enumerate().skip(j) {
        *o = dot(q, &keys[jj * d..][..d]);
    }
}

/// simd128: a key's 8 lanes are two registers (lanes 0-3, 4-7); 4 keys at a time.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
fn simd128(q: &[f32], keys: &[f32], d: usize, out: &mut [f32]) {
    use std::arch::wasm32::*;
    /// Row r of the result holds lane r of a, b, c, e.
    #[inline(always)]
    fn transpose(a: v128, b: v128, c: v128, e: v128) -> [v128; 4] {
        let t0 = i32x4_shuffle::<0, 4, 1, 5>(a, b);
        let t1 = i32x4_shuffle::<2, 6, 3, 7>(a, b);
        let t2 = i32x4_shuffle::<0, 4, 1, 5>(c, e);
        let t3 = i32x4_shuffle::<2, 6, 3, 7>(c, e);
        [
            i32x4_shuffle::<0, 1, 4, 5>(t0, t2),
            i32x4_shuffle::<2, 3, 6, 7>(t0, t2),
            i32x4_shuffle::<0, 1, 4, 5>(t1, t3),
            i32x4_shuffle::<2, 3, 6, 7>(t1, t3),
        ]
    }
    assert!(q.len() >= d && keys.len() >= out.len() * d);
    let (n, chunks) = (out.len(), d / 8);
    let mut j = 0;
    while j + 4 <= n {
        let mut lo = [f32x4_splat(0.0); 4];
        let mut hi = [f32x4_splat(0.0); 4];
        let block = &keys[j * d..(j + 4) * d];
        for c in 0..chunks {
            // SAFETY: c * 8 + 8 <= d: inside q, and inside each of the 4 keys of `block`; wasm
            // loads need no alignment.
            unsafe {
                let qp = q.as_ptr().add(c * 8) as *const v128;
                let (x0, x1) = (v128_load(qp), v128_load(qp.add(1)));
                for kk in 0..4 {
                    let kp = block.as_ptr().add(kk * d + c * 8) as *const v128;
                    lo[kk] = f32x4_add(lo[kk], f32x4_mul(x0, v128_load(kp)));
                    hi[kk] = f32x4_add(hi[kk], f32x4_mul(x1, v128_load(kp.add(1))));
                }
            }
        }
        let [l0, l1, l2, l3] = transpose(lo[0], lo[1], lo[2], lo[3]);
        let [l4, l5, l6, l7] = transpose(hi[0], hi[1], hi[2], hi[3]);
        let mut sum = f32x4_add(l0, l1);
        for lane in [l2, l3, l4, l5, l6, l7] {
            sum = f32x4_add(sum, lane);
        }
        let o = &mut out[j..j + 4];
        // SAFETY: `o` holds 4 floats.
        unsafe { v128_store(o.as_mut_ptr() as *mut v128, sum) };
        add_tails(q, &keys[j * d..], d, o);
        j += 4;
    }
    for (jj, o) in out.iter_mut().enumerate().skip(j) {
        *o = dot(q, &keys[jj * d..][..d]);
    }
}
