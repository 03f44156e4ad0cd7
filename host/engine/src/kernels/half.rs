//! IEEE binary16 (float16) conversions in plain integer and float arithmetic: the same bits on
//! every target (wasm has no conversion instruction; x86's F16C rounds the same way).

/// `x` rounded to the nearest float16, ties to even (overflow to infinity, NaN kept a NaN).
#[inline(always)]
pub fn f16_from_f32(x: f32) -> u16 {
    const F16_OVERFLOW: u32 = (127 + 16) << 23; // 65536: at or above rounds to infinity
    const F16_NORMAL: u32 = (127 - 14) << 23; // 2^-14, the least normal float16
                                              // Adding 0.5 puts a subnormal's float16 bits, rounded to even, in the low mantissa bits.
    const SUBNORMAL_MAGIC: u32 = 126 << 23;
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let a = bits & 0x7fff_ffff;
    let magnitude = if a >= F16_OVERFLOW {
        if a > 0x7f80_0000 {
            0x7e00
        } else {
            0x7c00
        }
    } else if a < F16_NORMAL {
        let f = f32::from_bits(a) + f32::from_bits(SUBNORMAL_MAGIC);
        f.to_bits().wrapping_sub(SUBNORMAL_MAGIC)
    } else {
        // Rebias the exponent, add half an ulp less one, plus one when the kept bit is odd.
        let odd = (a >> 13) & 1;
        a.wrapping_add(((15u32.wrapping_sub(127)) << 23).wrapping_add(0xfff) + odd) >> 13
    };
    sign | magnitude as u16
}

/// The float16 `h` as f32 (exact).
#[inline(always)]
pub fn f32_from_f16(h: u16) -> f32 {
    let m = ((h & 0x7fff) as u32) << 13;
    // Finite: rebase the exponent by a multiply by 2^112 (zeros and subnormals included).
    let finite = (f32::from_bits(m) * f32::from_bits(0x7780_0000)).to_bits();
    let special = m | 0x7f80_0000; // infinities and NaNs
    let magnitude = if h & 0x7c00 == 0x7c00 {
        special
    } else {
        finite
    };
    f32::from_bits(magnitude | ((h & 0x8000) as u32) << 16)
}

/// `out[i] = f32_from_f16(h[i])`.
#[inline(always)]
pub fn widen(h: &[u16], out: &mut [f32]) {
    for (o, &h) in out.iter_mut().zip(h) {
        *o = f32_from_f16(h);
    }
}

/// `out[i] = f16_from_f32(x[i])`.
pub fn narrow(x: &[f32], out: &mut [u16]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = f16_from_f32(x);
    }
}

/// `x`, each value rounded to float16 (and kept as f32).
pub fn rounded(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&x| f32_from_f16(f16_from_f32(x))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every float16 widens exactly and narrows back to itself; f32 values between two float16s
    /// round to the nearer, ties to the even one.
    #[test]
    fn conversions_are_exact_and_round_to_nearest_even() {
        for h in 0..=u16::MAX {
            let x = f32_from_f16(h);
            if x.is_nan() {
                assert!(f32_from_f16(f16_from_f32(x)).is_nan());
                continue;
            }
            assert_eq!(f16_from_f32(x), h, "{h:#06x} -> {x}");
        }
        assert_eq!(f32_from_f16(0x3c00), 1.0);
        assert_eq!(f32_from_f16(0x0001), 2f32.powi(-24));
        assert_eq!(f32_from_f16(0xfc00), f32::NEG_INFINITY);
        // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: to even (1).
        assert_eq!(f16_from_f32(1.0 + 2f32.powi(-11)), 0x3c00);
        assert_eq!(f16_from_f32(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert_eq!(f16_from_f32(1.0 + 2f32.powi(-11) + 2f32.powi(-20)), 0x3c01);
        assert_eq!(f16_from_f32(65504.0), 0x7bff);
        assert_eq!(f16_from_f32(65520.0), 0x7c00);
        assert_eq!(f16_from_f32(-1e9), 0xfc00);
        assert_eq!(
            f16_from_f32(2f32.powi(-25)),
            0x0000,
            "halfway to the least subnormal"
        );
        assert_eq!(f16_from_f32(3.0 * 2f32.powi(-25)), 0x0002);
        assert_eq!(f16_from_f32(-0.0), 0x8000);
    }
}
