//! Fused attention for a few query rows that share keys and values: their scores against every
//! key, their softmax and the weighted sums of the values (AVX2 when the CPU has it), with our
//! own `exp`.

/// A mask value at or below this is taken as is for the score: whatever the dot product, the
/// exponential of such a score underflows to exactly 0 (the export's "minus infinity" is -1e9).
const MASKED: f32 = -1e8;

/// Query rows that share their keys `k` (`[T, D]`) and values `v` (`[T, Dv]`): the query heads
/// of one KV head (grouped-query attention), or one head's prompt positions.
pub struct Rows<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub scale: f32,
    /// Each row's query (D) and mask: the mask of key j at `mask[j * mask_stride]`.
    pub rows: &'a [Row<'a>],
}

pub struct Row<'a> {
    pub q: &'a [f32],
    pub mask: &'a [f32],
    pub mask_stride: usize,
}

/// The most rows one pass over the keys serves.
pub const MAX_ROWS: usize = 4;

/// Each row's attention: `scores` is scratch (rows x T), `out` receives the rows' Dv-wide
/// results one after the other. One pass over the keys computes every row's score of a key, one
/// over the values their weighted sums: a key and a value are read once for all the rows (the
/// reads are what a decode step's attention waits for at a long context). Each row's arithmetic,
/// and its order, is that of the row alone.
#[inline(always)]
fn attend_rows_body(rows: &Rows, scores: &mut [f32], out: &mut [f32]) {
    let Rows { k, v, scale, rows } = *rows;
    let n = rows.len();
    assert!(n <= MAX_ROWS && n > 0);
    let (t, dv) = (scores.len() / n, out.len() / n);
    let d = rows[0].q.len();
    let mask = |r: usize, j: usize| rows[r].mask[j * rows[r].mask_stride];
    // Keys after a row's last unmasked one (a causal mask's future) would add exact zeros to
    // its sums: leave them out (the same result, bit for bit; half the work of a whole prompt).
    let mut keys = [0usize; MAX_ROWS];
    for (r, keys) in keys.iter_mut().enumerate().take(n) {
        *keys = (0..t)
            .rposition(|j| mask(r, j) > MASKED)
            .map_or(t, |j| j + 1);
    }
    let all_keys = keys[..n].iter().copied().max().unwrap_or(0);
    let mut max = [f32::NEG_INFINITY; MAX_ROWS];
    for j in 0..all_keys {
        let kj = &k[j * d..(j + 1) * d];
        for r in 0..n {
            if j < keys[r] {
                let m = mask(r, j);
                let s = if m <= MASKED {
                    m
                } else {
                    dot(rows[r].q, kj) * scale + m
                };
                scores[r * t + j] = s;
                max[r] = max[r].max(s);
            }
        }
    }
    let mut inv = [0f32; MAX_ROWS];
    for r in 0..n {
        let row = &mut scores[r * t..r * t + keys[r]];
        for s in row.iter_mut() {
            *s = exp(*s - max[r]);
        }
        inv[r] = 1.0 / lane_sum(row);
    }
    out.fill(0.0);
    for j in 0..all_keys {
        let vj = &v[j * dv..(j + 1) * dv];
        for r in 0..n {
            let p = scores[r * t + j];
            if j < keys[r] && p != 0.0 {
                for (o, &x) in out[r * dv..(r + 1) * dv].iter_mut().zip(vj) {
                    *o += p * x;
                }
            }
        }
    }
    for r in 0..n {
        for o in out[r * dv..(r + 1) * dv].iter_mut() {
            *o *= inv[r];
        }
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

/// [`attend_rows_body`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_rows_avx2(rows: &Rows, scores: &mut [f32], out: &mut [f32]) {
    attend_rows_body(rows, scores, out)
}

/// `out` (rows x Dv) = softmax(q k^T * scale + mask) v for each row, `scores` (rows x T) scratch.
pub fn attend_rows(rows: &Rows, scores: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { attend_rows_avx2(rows, scores, out) };
    }
    attend_rows_body(rows, scores, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_together_equal_rows_alone_bit_for_bit() {
        let (t, d) = (37, 16);
        let val = |i: usize| (i * 7919 % 113) as f32 / 56.0 - 1.0;
        let k: Vec<f32> = (0..t * d).map(|i| val(i + 5)).collect();
        let v: Vec<f32> = (0..t * d).map(|i| val(i + 11)).collect();
        let q: Vec<f32> = (0..MAX_ROWS * d).map(val).collect();
        // Row r sees keys 0..=30 + r (a causal mask), row 0 also misses key 3 (padding).
        let mask: Vec<f32> = (0..MAX_ROWS * t)
            .map(|x| {
                let (r, j) = (x / t, x % t);
                if j > 30 + r || (r == 0 && j == 3) {
                    -1e9
                } else {
                    0.0
                }
            })
            .collect();
        let row = |r: usize| Row {
            q: &q[r * d..(r + 1) * d],
            mask: &mask[r * t..],
            mask_stride: 1,
        };
        let all: Vec<Row> = (0..MAX_ROWS).map(row).collect();
        let mut together = vec![0f32; MAX_ROWS * d];
        let mut scores = vec![0f32; MAX_ROWS * t];
        let rows = |rows| Rows {
            k: &k,
            v: &v,
            scale: 0.25,
            rows,
        };
        attend_rows(&rows(&all), &mut scores, &mut together);
        for r in 0..MAX_ROWS {
            let mut alone = vec![0f32; d];
            attend_rows(&rows(&all[r..r + 1]), &mut scores[..t], &mut alone);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&alone), bits(&together[r * d..(r + 1) * d]), "row {r}");
        }
    }

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
