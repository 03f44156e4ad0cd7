//! Float functions with one answer on every target: the same IEEE operations in the same order,
//! whether the code runs natively (scalar, SSE, AVX2, AVX-512 builds) or in wasm32 (simd128).
//!
//! tract's own kernels for these functions differ by target (AVX-512 and NEON approximations,
//! reductions in each vector width's order), and `f32::exp`/`sin`/`cos` are the platform's libm
//! (glibc natively, musl in wasi-libc). A last-bit difference in one activation then flips an
//! 8-bit activation rounding somewhere, and greedy texts part. Here:
//! - element-wise functions are plain f32 arithmetic (no fused multiply-add: Rust never
//!   contracts), so a compiler that vectorizes them computes each lane as the scalar code would;
//! - a reduction accumulates in [`LANES`] fixed lanes and adds them in a fixed order;
//! - sin and cos (RoPE's angles, a few per token) are the `libm` crate's: Rust, the same code
//!   everywhere.

/// Lanes of a sum: each accumulates every LANES-th element, in order.
pub const LANES: usize = 8;

/// e^x, within 2 ulp of the true value for normal results; exactly 0 below -87.5 (attention
/// relies on masked scores giving 0), +inf above 88.7; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const MIN: f32 = -87.5;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: the first has a short mantissa so that n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer (|x * LOG2E| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    let below = x < MIN;
    let x = x.clamp(MIN, 88.75);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // e^r on |r| <= ln2/2: Taylor to degree 7, Horner (truncation error < 2^-29 relative).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n in two steps, so that n down to -126 (and up to 128) stays representable.
    // n as an integer: t = ROUND + n exactly, in [2^23, 2^24), so n is t's bits less ROUND's.
    // (`n as i32` gives the same for every x but NaN, and does not vectorize: it saturates lane
    // by lane.)
    let n = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let half = n / 2;
    let e = p * pow2(half) * pow2(n - half);
    if below {
        0.0
    } else {
        e
    }
}

/// The larger of a and b, a NaN ignored (b if a is NaN, a if b is): `f32::max`'s answer (either
/// zero for a pair of zeros), as a compare and a select. wasm32 compiles `f32::max` to a call of
/// libm's `fmaxf` (its own `f32.max` propagates NaN); this is inline on every target and
/// vectorizes.
#[inline(always)]
pub fn max(a: f32, b: f32) -> f32 {
    if a >= b || b.is_nan() {
        a
    } else {
        b
    }
}

/// 2^n for -126 <= n <= 127.
#[inline(always)]
fn pow2(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// x * sigmoid(x) (SiLU), as x / (1 + e^-x).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// 1 / (1 + e^-x).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// tanh(x) = 1 - 2 / (e^2x + 1); saturates to +-1.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// GELU with the tanh approximation (gelu_pytorch_tanh: Gemma), with x^3 as x * x * x.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + 0.044715 * (x * x * x))))
}

/// `x` rounded to the nearest float16 value, ties to even, as f32: `f16::from_f32(x).to_f32()`
/// (tract's pair of casts) in operations that vectorize, bit for bit on every value but NaN's
/// payload.
#[inline(always)]
pub fn round_to_f16(x: f32) -> f32 {
    let bits = x.to_bits();
    let abs = bits & 0x7fff_ffff;
    // Normal float16 range: 10 mantissa bits kept, ties to even; a carry moves the exponent.
    let normal = (abs + 0x0fff + ((abs >> 13) & 1)) & 0xffff_e000;
    // 65520 and up round to 2^16 or more: past float16's largest value (65504), infinity.
    let normal = if normal >= 0x4780_0000 {
        0x7f80_0000
    } else {
        normal
    };
    // Below 2^-14 float16 is subnormal, a multiple of 2^-24: adding 0.5 (whose ulp is 2^-24)
    // rounds to one, ties to even, and taking it away again is exact.
    let subnormal = ((f32::from_bits(abs) + 0.5) - 0.5).to_bits();
    let rounded = if abs < 0x3880_0000 { subnormal } else { normal };
    let rounded = if abs > 0x7f80_0000 {
        abs | 0x0040_0000
    } else {
        rounded
    };
    f32::from_bits((bits & 0x8000_0000) | rounded)
}

/// GELU with the tanh approximation as llama.cpp's CPU backend computes it (Gemma's MLP, our
/// converter's graph, `host/convert`): the input rounded to float16, `0.5 x (1 + tanh(c x (1 +
/// a x x)))` in f32 in this order, the result rounded to float16, and `x` itself from
/// `threshold` up (c = sqrt(2 / pi), a = 0.044715 and threshold = 10 there).
#[inline(always)]
pub fn gelu_tanh_f16(x: f32, c: f32, a: f32, threshold: f32) -> f32 {
    let xh = round_to_f16(x);
    let poly = 1.0 + (a * xh) * xh;
    let y = (0.5 * xh) * (1.0 + tanh((c * xh) * poly));
    if x >= threshold {
        x
    } else {
        round_to_f16(y)
    }
}

pub fn sin(x: f32) -> f32 {
    libm::sinf(x)
}

pub fn cos(x: f32) -> f32 {
    libm::cosf(x)
}

/// Sum of squares of `xs`, in [`LANES`] lanes added pairwise in a fixed order, then the tail.
#[inline(always)]
pub fn sum_of_squares(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            lanes[i] += c[i] * c[i];
        }
    }
    let mut sum = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
        + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
    for &x in tail {
        sum += x * x;
    }
    sum
}

/// RMS normalization of one row, in place: x / sqrt(mean(x^2) + eps).
#[inline(always)]
pub fn rms_norm(row: &mut [f32], eps: f32) {
    if row.is_empty() {
        return;
    }
    let inv = rms_factor(row, eps);
    for x in row {
        *x *= inv;
    }
}

/// [`rms_norm`], then each value times its weight (`weight` as long as the row): the two
/// products of the norm and the weight's `Mul`, in their order, in one pass.
#[inline(always)]
pub fn rms_norm_weighted(row: &mut [f32], eps: f32, weight: &[f32]) {
    if row.is_empty() {
        return;
    }
    let inv = rms_factor(row, eps);
    for (x, w) in row.iter_mut().zip(weight) {
        *x = (*x * inv) * w;
    }
}

/// 1 / sqrt(mean(x^2) + eps).
#[inline(always)]
fn rms_factor(row: &[f32], eps: f32) -> f32 {
    let mean = sum_of_squares(row) / row.len() as f32;
    1.0 / (mean + eps).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn max_is_f32_max() {
        let values = [
            f32::NAN,
            f32::NEG_INFINITY,
            -3.5,
            -1e-40,
            -0.0,
            0.0,
            1e-40,
            2.0,
            f32::MAX,
            f32::INFINITY,
        ];
        for a in values {
            for b in values {
                let (got, want) = (max(a, b), a.max(b));
                if want == 0.0 {
                    // Either zero, as f32::max allows.
                    assert_eq!(got, 0.0, "max({a}, {b})");
                } else {
                    assert_eq!(got.to_bits(), want.to_bits(), "max({a}, {b})");
                }
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.5 {
            let want = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp(x), want));
            x += 0.0137;
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(-1e9), 0.0);
        assert!(exp(100.0) > 1e38);
        assert!(exp(f32::NAN).is_nan());
    }

    /// The integer part read from the float's bits is `as i32`'s, for every finite input: exp
    /// gives the bits it gave when it converted with `as i32`.
    #[test]
    fn exp_reads_its_exponent_as_a_cast_would() {
        const ROUND: f32 = 12_582_912.0;
        let mut x = -90.0f32;
        while x < 90.0 {
            let t = x.clamp(-87.5, 88.75) * std::f32::consts::LOG2_E + ROUND;
            let n = t - ROUND;
            assert_eq!(
                t.to_bits() as i32 - ROUND.to_bits() as i32,
                n as i32,
                "x = {x}"
            );
            x += 1e-4;
        }
    }

    #[test]
    fn activations_match_their_definitions() {
        for i in -400..400 {
            let x = i as f32 * 0.05;
            let (xd, sig) = (x as f64, 1.0 / (1.0 + (-(x as f64)).exp()));
            assert!(
                (silu(x) as f64 - xd * sig).abs() <= 1e-6 * (1.0 + (xd * sig).abs()),
                "{x}"
            );
            assert!((sigmoid(x) as f64 - sig).abs() <= 1e-6, "{x}");
            assert!((tanh(x) as f64 - xd.tanh()).abs() <= 1e-6, "{x}");
            let g = 0.5
                * xd
                * (1.0
                    + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3))).tanh());
            assert!(
                (gelu_tanh(x) as f64 - g).abs() <= 1e-5 * (1.0 + g.abs()),
                "{x}"
            );
        }
        assert_eq!(silu(-200.0), -0.0);
        assert_eq!(tanh(50.0), 1.0);
        assert_eq!(tanh(-50.0), -1.0);
    }

    #[test]
    fn rms_norm_matches_f64() {
        let mut row: Vec<f32> = (0..579)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.031)
            .collect();
        let want: Vec<f64> = {
            let ms = row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / row.len() as f64;
            row.iter().map(|&x| x as f64 / (ms + 1e-5).sqrt()).collect()
        };
        rms_norm(&mut row, 1e-5);
        for (a, b) in row.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()));
        }
    }

    #[test]
    fn rounding_to_f16_is_the_casts() {
        let check = |x: f32| {
            let want = half::f16::from_f32(x).to_f32();
            let got = round_to_f16(x);
            if want.is_nan() {
                assert!(got.is_nan(), "{x:e} ({:#x})", x.to_bits());
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{x:e} ({:#x})", x.to_bits());
            }
        };
        // Every 4099th bit pattern, and every pattern near the boundaries: the subnormal range's
        // top, the largest float16, ties, infinities and NaNs.
        for bits in (0..=u32::MAX).step_by(4099) {
            check(f32::from_bits(bits));
        }
        for edge in [
            0x3880_0000u32,
            0x477f_e000,
            0x477f_f000,
            0x4780_0000,
            0x7f80_0000,
            0x3300_0000,
            0,
        ] {
            for bits in edge.saturating_sub(1 << 14)..=edge.saturating_add(1 << 14) {
                check(f32::from_bits(bits));
                check(f32::from_bits(bits | 0x8000_0000));
            }
        }
    }
}
