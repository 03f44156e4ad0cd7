//! One row of fused attention: a query's scores against every key, their softmax and the
//! weighted sum of the values, in one pass (AVX2 when the CPU has it), with our own `exp`.

/// A mask value at or below this is taken as is for the score: whatever the dot product, the
/// exponential of such a score underflows to exactly 0 (the export's "minus infinity" is -1e9).
const MASKED: f32 = -1e8;

/// One query row `q` (D) and what it attends to: keys `k` (`[T, D]`) and values `v` (`[T, Dv]`),
/// the mask of key j at `mask[j * mask_stride]`, `scale` the factor of the scores.
pub struct Query<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub mask: &'a [f32],
    pub mask_stride: usize,
    pub scale: f32,
}

/// One query row: `scores` (T long) is scratch, `out` receives the Dv-wide result.
#[inline(always)]
fn attend_row_body(query: &Query, scores: &mut [f32], out: &mut [f32]) {
    let Query {
        q,
        k,
        v,
        mask,
        mask_stride,
        scale,
    } = *query;
    let (d, dv) = (q.len(), out.len());
    let mask = |j: usize| mask[j * mask_stride];
    // Keys after the last unmasked one (a causal mask's future) would add exact zeros to every
    // sum below: leave them out (the same result, bit for bit; half the work of a whole prompt).
    let keys = (0..scores.len())
        .rposition(|j| mask(j) > MASKED)
        .map_or(scores.len(), |j| j + 1);
    let scores = &mut scores[..keys];
    let mut max = f32::NEG_INFINITY;
    for (j, s) in scores.iter_mut().enumerate() {
        let m = mask(j);
        *s = if m <= MASKED {
            m
        } else {
            dot(q, &k[j * d..(j + 1) * d]) * scale + m
        };
        max = max.max(*s);
    }
    for s in scores.iter_mut() {
        *s = exp(*s - max);
    }
    let sum = lane_sum(scores);
    out.fill(0.0);
    for (j, &p) in scores.iter().enumerate() {
        if p != 0.0 {
            for (o, &x) in out.iter_mut().zip(&v[j * dv..(j + 1) * dv]) {
                *o += p * x;
            }
        }
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// e^x for x <= 0 (a score minus the row's maximum), in plain f32 additions and multiplications,
/// so that every build computes the same bits (a libm's `expf` differs between targets) and the
/// loop over a row vectorizes. Cephes' `expf`: x = n ln 2 + r with |r| <= ln 2 / 2, e^r by its
/// degree-7 minimax polynomial (within 2 ulp), times 2^n. Below -87 (e^x < 2^-125, nothing next
/// to the maximum's e^0 = 1) it is 0.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (|x log2 e| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.max(-87.0);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let er = (p * r) * r + r + 1.0;
    // 2^n from its exponent bits (n in -126..=0 here).
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        er * two_n
    }
}

/// The sum of `x` in 8 independent lanes, then the lanes in order: one fixed order on every
/// build, and a vector register's worth of additions at a time.
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            lanes[i] += c[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// A dot product in 8 independent lanes (the compiler keeps them in one vector register).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// [`attend_row_body`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_row_avx2(query: &Query, scores: &mut [f32], out: &mut [f32]) {
    attend_row_body(query, scores, out)
}

/// One query row: `out` (Dv) = softmax(q k^T * scale + mask) v, `scores` (T) scratch.
pub fn attend_row(query: &Query, scores: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { attend_row_avx2(query, scores, out) };
    }
    attend_row_body(query, scores, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_2_ulp_of_f64_and_0_far_below() {
        let mut x = 0f32;
        while x > -87.0 {
            let (got, want) = (exp(x), (x as f64).exp());
            let ulp = (want as f32).to_bits().abs_diff(got.to_bits());
            assert!(ulp <= 2, "exp({x}) = {got}, f64 says {want} ({ulp} ulp)");
            x -= 0.000_37;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-87.5), 0.0);
        assert_eq!(exp(-1e9), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }
}
