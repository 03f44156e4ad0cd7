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
fn attend_rows_body<D: Dot>(rows: &Rows, scores: &mut [f32], out: &mut [f32]) {
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
                    D::dot(rows[r].q, kj) * scale + m
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
    for r in 0..n {
        let o = &mut out[r * dv..(r + 1) * dv];
        D::weighted_sum(o, &scores[r * t..r * t + keys[r]], v);
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

/// A dot product: lane i (of 8) sums `a[c + i] * b[c + i]` over c in order, then the lanes are
/// added in order and the products past the last multiple of 8 after them. Every path below does
/// exactly these operations (multiplications and additions, never fused), so every build gets the
/// same bits. The compiler did not keep the lanes in one vector register by itself (3x slower).
pub(crate) trait Dot {
    fn dot(a: &[f32], b: &[f32]) -> f32;

    /// `out` = the sum over j of `p[j] * v[j]` (`v` rows of `out.len()`), each element added in
    /// the order of j, zero weights skipped: the same on every path (no reduction across lanes).
    fn weighted_sum(out: &mut [f32], p: &[f32], v: &[f32]) {
        let dv = out.len();
        out.fill(0.0);
        for (j, &pj) in p.iter().enumerate() {
            if pj != 0.0 {
                for (o, &x) in out.iter_mut().zip(&v[j * dv..(j + 1) * dv]) {
                    *o += pj * x;
                }
            }
        }
    }
}

/// What the lanes and the tail add up to.
#[inline(always)]
fn finish(lanes: [f32; 8], a: &[f32], b: &[f32]) -> f32 {
    let n8 = a.len() / 8 * 8;
    let mut sum = lanes[0];
    for l in &lanes[1..] {
        sum += l;
    }
    for (x, y) in a[n8..].iter().zip(&b[n8..]) {
        sum += x * y;
    }
    sum
}

/// Plain Rust (also the reference of the others).
pub(crate) struct PortableDot;

impl Dot for PortableDot {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut lanes = [0f32; 8];
        for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
            for i in 0..8 {
                lanes[i] += x[i] * y[i];
            }
        }
        finish(lanes, a, b)
    }
}

/// AVX: the 8 lanes in one register. Only called from code compiled with AVX2 enabled.
#[cfg(target_arch = "x86_64")]
struct AvxDot;

#[cfg(target_arch = "x86_64")]
impl Dot for AvxDot {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        let n = a.len().min(b.len());
        let mut lanes = [0f32; 8];
        // SAFETY: AvxDot is only used inside `attend_rows_avx2` (the CPU has AVX2); the loads
        // read a[c..c + 8] and b[c..c + 8] with c + 8 <= n, inside both slices.
        unsafe {
            let mut acc = _mm256_setzero_ps();
            let mut c = 0;
            while c + 8 <= n {
                let x = _mm256_loadu_ps(a.as_ptr().add(c));
                let y = _mm256_loadu_ps(b.as_ptr().add(c));
                acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
                c += 8;
            }
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        }
        finish(lanes, &a[..n], &b[..n])
    }

    #[inline(always)]
    fn weighted_sum(out: &mut [f32], p: &[f32], v: &[f32]) {
        use std::arch::x86_64::*;
        let dv = out.len();
        assert!(v.len() >= p.len() * dv);
        // Columns in blocks of 32 (4 registers) kept in registers over all the keys; the
        // columns past the last multiple of 8 as the default does.
        let mut c0 = 0;
        while c0 + 8 <= dv {
            let w = (dv - c0).min(32) / 8;
            // SAFETY: AVX2 as for `dot`; the loads read v[j * dv + c0..][..8 * w] with
            // c0 + 8 * w <= dv and j < p.len(), inside `v` (asserted); the stores write
            // out[c0..c0 + 8 * w].
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 4];
                for (j, &pj) in p.iter().enumerate() {
                    if pj != 0.0 {
                        let pv = _mm256_set1_ps(pj);
                        let row = v.as_ptr().add(j * dv + c0);
                        for (b, a) in acc.iter_mut().enumerate().take(w) {
                            *a = _mm256_add_ps(
                                *a,
                                _mm256_mul_ps(pv, _mm256_loadu_ps(row.add(8 * b))),
                            );
                        }
                    }
                }
                for (b, a) in acc.iter().enumerate().take(w) {
                    _mm256_storeu_ps(out.as_mut_ptr().add(c0 + 8 * b), *a);
                }
            }
            c0 += 8 * w;
        }
        if c0 < dv {
            let rest = &mut out[c0..];
            rest.fill(0.0);
            for (j, &pj) in p.iter().enumerate() {
                if pj != 0.0 {
                    for (o, &x) in rest.iter_mut().zip(&v[j * dv + c0..(j + 1) * dv]) {
                        *o += pj * x;
                    }
                }
            }
        }
    }
}

/// simd128: lanes 0-3 and 4-7 in two registers.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
struct Simd128Dot;

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
impl Dot for Simd128Dot {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        use std::arch::wasm32::*;
        let n = a.len().min(b.len());
        let mut lanes = [0f32; 8];
        // SAFETY: the loads read a[c..c + 8] and b[c..c + 8] with c + 8 <= n, inside both
        // slices (unaligned loads are allowed); the stores write the 8 lanes of `lanes`.
        unsafe {
            let (mut lo, mut hi) = (f32x4_splat(0.0), f32x4_splat(0.0));
            let mut c = 0;
            while c + 8 <= n {
                let (pa, pb) = (
                    a.as_ptr().add(c) as *const v128,
                    b.as_ptr().add(c) as *const v128,
                );
                lo = f32x4_add(lo, f32x4_mul(v128_load(pa), v128_load(pb)));
                hi = f32x4_add(hi, f32x4_mul(v128_load(pa.add(1)), v128_load(pb.add(1))));
                c += 8;
            }
            v128_store(lanes.as_mut_ptr() as *mut v128, lo);
            v128_store(lanes.as_mut_ptr().add(4) as *mut v128, hi);
        }
        finish(lanes, &a[..n], &b[..n])
    }

    #[inline(always)]
    fn weighted_sum(out: &mut [f32], p: &[f32], v: &[f32]) {
        use std::arch::wasm32::*;
        let dv = out.len();
        assert!(v.len() >= p.len() * dv);
        // As AvxDot's: columns in blocks of 32 (8 registers of 4) over all the keys.
        let mut c0 = 0;
        while c0 + 4 <= dv {
            let w = (dv - c0).min(32) / 4;
            // SAFETY: the loads read v[j * dv + c0..][..4 * w] with c0 + 4 * w <= dv and
            // j < p.len(), inside `v` (asserted); the stores write out[c0..c0 + 4 * w].
            unsafe {
                let mut acc = [f32x4_splat(0.0); 8];
                for (j, &pj) in p.iter().enumerate() {
                    if pj != 0.0 {
                        let pv = f32x4_splat(pj);
                        let row = v.as_ptr().add(j * dv + c0);
                        for (b, a) in acc.iter_mut().enumerate().take(w) {
                            let x = v128_load(row.add(4 * b) as *const v128);
                            *a = f32x4_add(*a, f32x4_mul(pv, x));
                        }
                    }
                }
                for (b, a) in acc.iter().enumerate().take(w) {
                    v128_store(out.as_mut_ptr().add(c0 + 4 * b) as *mut v128, *a);
                }
            }
            c0 += 4 * w;
        }
        if c0 < dv {
            let rest = &mut out[c0..];
            rest.fill(0.0);
            for (j, &pj) in p.iter().enumerate() {
                if pj != 0.0 {
                    for (o, &x) in rest.iter_mut().zip(&v[j * dv + c0..(j + 1) * dv]) {
                        *o += pj * x;
                    }
                }
            }
        }
    }
}

/// [`attend_rows_body`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_rows_avx2(rows: &Rows, scores: &mut [f32], out: &mut [f32]) {
    attend_rows_body::<AvxDot>(rows, scores, out)
}

/// `out` (rows x Dv) = softmax(q k^T * scale + mask) v for each row, `scores` (rows x T) scratch.
pub fn attend_rows(rows: &Rows, scores: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { attend_rows_avx2(rows, scores, out) };
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return attend_rows_body::<Simd128Dot>(rows, scores, out);
    #[allow(unreachable_code)]
    attend_rows_body::<PortableDot>(rows, scores, out)
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
    fn every_dot_gives_the_portable_bits() {
        let val = |i: usize| ((i * 7919 % 113) as f32 / 56.0 - 1.0) * 1.37;
        for n in [0, 1, 7, 8, 9, 64, 67, 128] {
            let a: Vec<f32> = (0..n).map(val).collect();
            let b: Vec<f32> = (0..n).map(|i| val(i + 31)).collect();
            let want = PortableDot::dot(&a, &b);
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!(
                (want as f64 - exact).abs() < 1e-4,
                "n {n}: {want} vs {exact}"
            );
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::cpu::avx2() {
                assert_eq!(AvxDot::dot(&a, &b).to_bits(), want.to_bits(), "n {n}");
            }
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            assert_eq!(Simd128Dot::dot(&a, &b).to_bits(), want.to_bits(), "n {n}");
        }
    }

    #[test]
    fn every_weighted_sum_gives_the_portable_bits() {
        let val = |i: usize| ((i * 7919 % 113) as f32 / 56.0 - 1.0) * 1.37;
        for dv in [1, 8, 12, 40, 64, 72] {
            let keys = 19;
            let v: Vec<f32> = (0..keys * dv).map(val).collect();
            // Some weights exactly 0 (masked keys).
            let p: Vec<f32> = (0..keys)
                .map(|j| if j % 5 == 2 { 0.0 } else { val(j + 3).abs() })
                .collect();
            let mut want = vec![0f32; dv];
            PortableDot::weighted_sum(&mut want, &p, &v);
            for (c, w) in want.iter().enumerate() {
                let exact: f64 = (0..keys).map(|j| p[j] as f64 * v[j * dv + c] as f64).sum();
                assert!((*w as f64 - exact).abs() < 1e-4);
            }
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::cpu::avx2() {
                let mut got = vec![1f32; dv];
                AvxDot::weighted_sum(&mut got, &p, &v);
                assert_eq!(bits(&got), bits(&want), "dv {dv}");
            }
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            {
                let mut got = vec![1f32; dv];
                Simd128Dot::weighted_sum(&mut got, &p, &v);
                assert_eq!(bits(&got), bits(&want), "dv {dv}");
            }
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

/// Speed of one KV head's attention at a 2,049-token context (a decode step's), for comparing
/// changes: `cargo test --release -p slm-engine --lib attention_speed -- --ignored --nocapture`.
#[cfg(test)]
mod attention_speed {
    use super::*;

    #[test]
    #[ignore]
    fn rows_at_a_long_context() {
        let (t, d, runs) = (2049, 64, 2000);
        let k: Vec<f32> = (0..t * d).map(|i| (i % 17) as f32 * 0.01).collect();
        let q: Vec<f32> = (0..MAX_ROWS * d).map(|i| (i % 5) as f32 * 0.1).collect();
        let mask = vec![0f32; t];
        let all: Vec<Row> = (0..3)
            .map(|r| Row {
                q: &q[r * d..(r + 1) * d],
                mask: &mask,
                mask_stride: 1,
            })
            .collect();
        let (mut scores, mut out) = (vec![0f32; 3 * t], vec![0f32; 3 * d]);
        let rows = Rows {
            k: &k,
            v: &k,
            scale: 0.125,
            rows: &all,
        };
        let t0 = std::time::Instant::now();
        for _ in 0..runs {
            attend_rows(&rows, &mut scores, &mut out);
        }
        let per_call = t0.elapsed().as_secs_f64() / runs as f64;
        eprintln!(
            "3 rows x {t} keys: {:.1} us, {:.2} ns per row and key",
            per_call * 1e6,
            per_call * 1e9 / (3 * t) as f64
        );
    }
}
