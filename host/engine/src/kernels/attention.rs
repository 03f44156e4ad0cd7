//! One row of fused attention: a query's scores against every key, their softmax and the
//! weighted sum of the values, in one pass (AVX2 when the CPU has it).

/// A mask value at or below this is taken as is for the score: whatever the dot product, the
/// exponential of such a score underflows to exactly 0 (the export's "minus infinity" is -1e9).
const MASKED: f32 = -1e8;

/// One query row `q` (D) and what it attends to: keys `k` (`[T, D]`) and values `v` (`[T, Dv]`),
/// `mask(j)` the mask of key j, `scale` the factor of the scores.
pub struct Query<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub mask: &'a dyn Fn(usize) -> f32,
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
        scale,
    } = *query;
    let (d, dv) = (q.len(), out.len());
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
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
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
