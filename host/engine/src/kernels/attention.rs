//! Fused attention on a block of query rows of one head: each row's scores against every key,
//! their softmax and the weighted sum of the values, the rows sharing each key and value read
//! (AVX2 when the CPU has it).

/// A mask value at or below this is taken as is for the score: whatever the dot product, the
/// exponential of such a score underflows to exactly 0 (the export's "minus infinity" is -1e9).
const MASKED: f32 = -1e8;

/// Query rows of one head, at most [`BLOCK_ROWS`], that share what they attend to: `q`
/// (`[rows, D]`), keys `k` (`[T, D]`) and values `v` (`[T, Dv]`); `mask(i, j)` the mask of row i
/// and key j, `scale` the factor of the scores.
pub struct Block<'a> {
    pub q: &'a [f32],
    pub d: usize,
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub mask: &'a dyn Fn(usize, usize) -> f32,
    pub scale: f32,
}

/// The most query rows one [`attend_block`] takes: the rows of a block read each key and value
/// once between them (a decode step's query heads that share a KV head; a prefill's rows), so
/// the cache streams from memory once per block, not once per row.
pub const BLOCK_ROWS: usize = 16;

/// The rows of `block`: `scores` (rows * T) is scratch, `out` (rows * Dv) receives the results.
/// Each row's arithmetic is that of the row alone, in the same order (key by key): results do
/// not depend on how rows are grouped.
#[inline(always)]
fn attend_block_body(block: &Block, scores: &mut [f32], out: &mut [f32]) {
    let Block {
        q,
        d,
        k,
        v,
        mask,
        scale,
    } = *block;
    let rows = q.len() / d;
    debug_assert!(rows <= BLOCK_ROWS);
    let t = scores.len() / rows;
    let dv = out.len() / rows;
    // Keys after a row's last unmasked one (a causal mask's future) would add exact zeros to
    // every sum below: leave them out (the same result, bit for bit; half the work of a prompt).
    let mut keys = [0usize; BLOCK_ROWS];
    for (i, n) in keys[..rows].iter_mut().enumerate() {
        *n = (0..t)
            .rposition(|j| mask(i, j) > MASKED)
            .map_or(t, |j| j + 1);
    }
    let keys = &keys[..rows];
    let last = keys.iter().copied().max().unwrap_or(0);
    let mut max = [f32::NEG_INFINITY; BLOCK_ROWS];
    for j in 0..last {
        let kj = &k[j * d..][..d];
        for (i, &n) in keys.iter().enumerate() {
            if j < n {
                let m = mask(i, j);
                let s = if m <= MASKED {
                    m
                } else {
                    dot(&q[i * d..][..d], kj) * scale + m
                };
                scores[i * t + j] = s;
                max[i] = max[i].max(s);
            }
        }
    }
    let mut sum = [0f32; BLOCK_ROWS];
    for (i, &n) in keys.iter().enumerate() {
        for s in &mut scores[i * t..][..n] {
            *s = super::detmath::exp(*s - max[i]);
            sum[i] += *s;
        }
    }
    out.fill(0.0);
    for j in 0..last {
        let vj = &v[j * dv..][..dv];
        for (i, &n) in keys.iter().enumerate() {
            let p = scores[i * t + j];
            if j < n && p != 0.0 {
                for (o, &x) in out[i * dv..][..dv].iter_mut().zip(vj) {
                    *o += p * x;
                }
            }
        }
    }
    for (i, o) in out.chunks_exact_mut(dv).enumerate() {
        let inv = 1.0 / sum[i];
        for x in o {
            *x *= inv;
        }
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

/// [`attend_block_body`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_block_avx2(block: &Block, scores: &mut [f32], out: &mut [f32]) {
    attend_block_body(block, scores, out)
}

/// The rows of `block`: each row of `out` (`[rows, Dv]`) = softmax(q k^T * scale + mask) v;
/// `scores` (`rows * T`) is scratch.
pub fn attend_block(block: &Block, scores: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { attend_block_avx2(block, scores, out) };
    }
    attend_block_body(block, scores, out)
}
