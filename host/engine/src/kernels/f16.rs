//! IEEE half precision, the KV cache's storage type: half the bytes of f32, and a decode step at a
//! long context reads the whole cache (llama.cpp keeps its cache in f16 too). Both conversions
//! are plain integer and f32 arithmetic, so every target gives the same bits; widening is exact.

/// An IEEE 754 binary16 value, by its bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16(pub u16);

impl F16 {
    /// The nearest half (ties to even); beyond the half range, infinity; NaN stays NaN.
    pub fn from_f32(x: f32) -> F16 {
        const F32_INF: u32 = 255 << 23;
        // 2^16: from here on the result is infinite (65520 rounds up to it, ties to even).
        const F16_OVERFLOW: u32 = (127 + 16) << 23;
        // 2^-14, the smallest normal half.
        const F16_MIN_NORMAL: u32 = 113 << 23;
        // 0.5: adding it aligns a subnormal half's bits at the bottom of the f32 mantissa,
        // rounded to nearest even by the addition itself.
        const DENORM_MAGIC: u32 = ((127 - 15) + (23 - 10) + 1) << 23;
        let bits = x.to_bits();
        let sign = (bits >> 16) & 0x8000;
        let a = bits & 0x7fff_ffff;
        let h = if a >= F16_OVERFLOW {
            if a > F32_INF {
                0x7e00
            } else {
                0x7c00
            }
        } else if a < F16_MIN_NORMAL {
            (f32::from_bits(a) + f32::from_bits(DENORM_MAGIC)).to_bits() - DENORM_MAGIC
        } else {
            // Rebias the exponent, add half an ulp of the half (minus one unless the kept
            // mantissa is odd: ties to even), and cut.
            let odd = (a >> 13) & 1;
            a.wrapping_add(((15u32.wrapping_sub(127)) << 23).wrapping_add(0xfff) + odd) >> 13
        };
        F16((h | sign) as u16)
    }

    /// The exact f32 value. Branch-free (but for the select), so a loop over a row vectorizes.
    #[inline(always)]
    pub fn to_f32(self) -> f32 {
        let h = self.0 as u32;
        let magnitude = h & 0x7fff;
        // The half's exponent and mantissa in an f32's places, scaled by 2^(127 - 15): exact for
        // normal and subnormal halves alike.
        let finite = f32::from_bits(magnitude << 13) * f32::from_bits((127 + 127 - 15) << 23);
        let bits = if magnitude >= 0x7c00 {
            (magnitude << 13) | (255 << 23)
        } else {
            finite.to_bits()
        };
        f32::from_bits(bits | ((h & 0x8000) << 16))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of half `h`, computed in f64 from its fields.
    fn reference(h: u16) -> f64 {
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let (e, m) = (((h >> 10) & 0x1f) as i32, (h & 0x3ff) as f64);
        sign * match e {
            0 => m * 2f64.powi(-24),
            31 if m == 0.0 => f64::INFINITY,
            31 => f64::NAN,
            _ => (1.0 + m / 1024.0) * 2f64.powi(e - 15),
        }
    }

    #[test]
    fn every_half_widens_exactly_and_narrows_back() {
        for h in 0..=u16::MAX {
            let want = reference(h);
            let got = F16(h).to_f32();
            if want.is_nan() {
                assert!(got.is_nan(), "{h:#06x}");
                assert!(F16::from_f32(got).to_f32().is_nan());
            } else {
                assert_eq!(got as f64, want, "{h:#06x}");
                assert_eq!(F16::from_f32(got), F16(h), "{h:#06x}");
            }
        }
    }

    #[test]
    fn narrowing_rounds_to_nearest_even() {
        // Between two neighbouring halves: below the midpoint, at it, above it.
        for h in (0..0x7bffu16)
            .step_by(7)
            .chain([0x0000, 0x03ff, 0x0400, 0x7bfe])
        {
            let (lo, hi) = (F16(h).to_f32() as f64, F16(h + 1).to_f32() as f64);
            let mid = (lo + hi) / 2.0;
            let even = if h % 2 == 0 { h } else { h + 1 };
            assert_eq!(F16::from_f32(mid as f32), F16(even), "{h:#06x} midpoint");
            let below = (lo + (hi - lo) * 0.4) as f32;
            let above = (lo + (hi - lo) * 0.6) as f32;
            assert_eq!(F16::from_f32(below), F16(h), "{h:#06x} below");
            assert_eq!(F16::from_f32(above), F16(h + 1), "{h:#06x} above");
        }
        assert_eq!(F16::from_f32(65504.0), F16(0x7bff));
        assert_eq!(F16::from_f32(65519.0), F16(0x7bff));
        assert_eq!(F16::from_f32(65520.0), F16(0x7c00));
        assert_eq!(F16::from_f32(1e9), F16(0x7c00));
        assert_eq!(F16::from_f32(-1e-9), F16(0x8000));
    }
}
