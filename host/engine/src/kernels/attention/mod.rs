//! Fused attention on a block of query rows of one head: each row's scores against every key,
//! their softmax and the weighted sum of the values, the rows sharing each chunk of keys and
//! values while it is in cache (AVX2 when the CPU has it, simd128 in wasm).
//!
//! Every row's arithmetic is fixed, whatever the target, the grouping of rows or the chunking of
//! keys: a score is [`dot`]'s sum (8 lanes, added in lane order); exponentials are
//! [`detmath::exp`](super::detmath::exp), summed key by key; each output is summed key by key.
//! The vector code computes exactly those operations, several keys or columns at a time.

mod dots;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::detmath;

/// A mask value at or below this is taken as is for the score: whatever the dot product, the
/// exponential of such a score underflows to exactly 0 (the export's "minus infinity" is -1e9).
const MASKED: f32 = -1e8;

/// Keys per chunk: a chunk's keys and values (64 x 64 floats each for a 64-wide head, 16 KiB)
/// stay in L1 while every row of the block reads them. (A session's KV cache is paged in chunks.)
pub const KEY_CHUNK: usize = 64;

/// Output columns a row accumulates in registers while it runs through a chunk of values: 64 on
/// x86_64 (8 AVX2 registers: 8 independent sums per key keep both adders busy; with 4, each
/// key waited for the last one's additions), 32 elsewhere (8 of simd128's 16 registers). Each
/// column is summed key by key either way: the same bits.
#[cfg(target_arch = "x86_64")]
const COLUMNS: usize = 64;
#[cfg(not(target_arch = "x86_64"))]
const COLUMNS: usize = 32;

/// The mask of a block's rows: row i, key j at `data[base + i * row + j * col]`.
#[derive(Clone, Copy)]
pub struct Mask<'a> {
    pub data: &'a [f32],
    pub base: usize,
    pub row: usize,
    pub col: usize,
}

impl Mask<'_> {
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[self.base + i * self.row + j * self.col]
    }

    /// 1 + row i's last key (of t) that is not masked out; t when every key is. A causal
    /// prompt row scans its whole future: a contiguous row is scanned with one branch per 8 keys.
    #[inline(always)]
    fn keys_of_row(&self, i: usize, t: usize) -> usize {
        let unmasked = |m: &f32| *m > MASKED;
        let last = if self.col == 1 {
            let row = &self.data[self.base + i * self.row..][..t];
            let whole = t / 8 * 8;
            row[whole..]
                .iter()
                .rposition(unmasked)
                .map(|j| whole + j)
                .or_else(|| {
                    let c = row[..whole]
                        .chunks_exact(8)
                        .rposition(|c| c.iter().fold(false, |any, m| any | unmasked(m)))?;
                    Some(c * 8 + row[c * 8..][..8].iter().rposition(unmasked)?)
                })
        } else {
            (0..t).rposition(|j| unmasked(&self.at(i, j)))
        };
        last.map_or(t, |j| j + 1)
    }
}

/// A chunk of keys or values as they are stored: f32, or float16 bits (a session's KV cache),
/// which the kernel widens (exactly) into a scratch chunk of f32 before it reads them.
#[derive(Clone, Copy)]
pub enum Stored<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// One head's keys and values, chunk by chunk.
pub trait KeyValues {
    /// Keys `c * KEY_CHUNK..` (`[n, D]`), n = [`KEY_CHUNK`] or what is left of the keys.
    fn keys(&self, c: usize) -> Stored<'_>;
    /// Their values (`[n, Dv]`).
    fn values(&self, c: usize) -> Stored<'_>;
}

/// Contiguous keys `k` (`[t, D]`) and values `v` (`[t, Dv]`).
#[derive(Clone, Copy)]
pub struct Contiguous<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub t: usize,
}

impl KeyValues for Contiguous<'_> {
    fn keys(&self, c: usize) -> Stored<'_> {
        Stored::F32(self.at(c).0)
    }
    fn values(&self, c: usize) -> Stored<'_> {
        Stored::F32(self.at(c).1)
    }
}

impl<'a> Contiguous<'a> {
    /// Chunk `c`'s keys and values, borrowing them rather than `self`.
    pub fn at(self, c: usize) -> (&'a [f32], &'a [f32]) {
        let t = self.t;
        let (d, dv) = (self.k.len() / t.max(1), self.v.len() / t.max(1));
        let (j0, j1) = (c * KEY_CHUNK, t.min((c + 1) * KEY_CHUNK));
        (&self.k[j0 * d..j1 * d], &self.v[j0 * dv..j1 * dv])
    }
}

/// Query rows of one head, at most [`BLOCK_ROWS`], that share what they attend to: `q`
/// (`[rows, D]`), `t` keys and values `kv`, the rows' `mask` and `scale`, the factor of
/// the scores.
pub struct Block<'a> {
    pub q: &'a [f32],
    pub d: usize,
    pub kv: &'a dyn KeyValues,
    pub t: usize,
    pub mask: Mask<'a>,
    pub scale: f32,
}

/// The most query rows one [`attend_block`] takes: the rows of a block read each key and value
/// chunk once between them (a decode step's query heads that share a KV head; a prefill's rows),
/// so the cache streams from memory once per block, not once per row.
pub const BLOCK_ROWS: usize = 16;

/// Dot products of one query row with consecutive keys, each summed as [`dot`] sums it.
trait KeyDots {
    /// `out[j]` = `dot(q, keys[j * d..][..d])`.
    fn dots(q: &[f32], keys: &[f32], d: usize, out: &mut [f32]);

    /// `out[i]` = `h[i]` as f32.
    #[inline(always)]
    fn widen(h: &[f16], out: &mut [f32]) {
        h.convert_to_f32_slice(out)
    }
}

/// `chunk` as f32: itself, or widened into `buf`.
#[inline(always)]
fn as_f32<'a, D: KeyDots>(chunk: Stored<'a>, buf: &'a mut Vec<f32>) -> &'a [f32] {
    match chunk {
        Stored::F32(x) => x,
        Stored::F16(h) => {
            // Allocated on the first float16 chunk only: f32 keys never need it.
            buf.resize(buf.len().max(h.len()), 0.0);
            D::widen(h, &mut buf[..h.len()]);
            &buf[..h.len()]
        }
    }
}

/// Row `i`'s scores against the keys `j0..j0 + row.len()` of `chunk` (the chunk of keys from
/// `j0`, as f32): its dot products, scaled, plus the mask (a mask at or below [`MASKED`] taken
/// as is). `dots` is scratch.
#[inline(always)]
fn chunk_scores<D: KeyDots>(
    block: &Block,
    i: usize,
    j0: usize,
    chunk: &[f32],
    dots: &mut [f32; KEY_CHUNK],
    row: &mut [f32],
) {
    let (d, mask, scale) = (block.d, block.mask, block.scale);
    let dots = &mut dots[..row.len()];
    D::dots(&block.q[i * d..][..d], &chunk[..row.len() * d], d, dots);
    let score = |m: f32, x: f32| if m <= MASKED { m } else { x * scale + m };
    if mask.col == 1 {
        let m = &mask.data[mask.base + i * mask.row + j0..][..row.len()];
        for ((s, &x), &m) in row.iter_mut().zip(dots.iter()).zip(m) {
            *s = score(m, x);
        }
    } else {
        for (jj, (s, &x)) in row.iter_mut().zip(dots.iter()).enumerate() {
            *s = score(mask.at(i, j0 + jj), x);
        }
    }
}

/// The rows of `block`: `scores` (rows * T) is scratch, `out` (rows * Dv) receives the results.
#[inline(always)]
fn attend_block_body<D: KeyDots>(block: &Block, scores: &mut [f32], out: &mut [f32]) {
    let Block { q, d, kv, t, .. } = *block;
    let rows = q.len() / d;
    debug_assert!(rows <= BLOCK_ROWS && scores.len() == rows * t);
    let dv = out.len() / rows;
    // Keys after a row's last unmasked one (a causal mask's future) would add exact zeros to
    // every sum below: leave them out (the same result, bit for bit; half the work of a prompt).
    let keys = keys_of_rows(block, rows);
    let keys = &keys[..rows];
    let last = keys.iter().copied().max().unwrap_or(0);

    let mut max = [f32::NEG_INFINITY; BLOCK_ROWS];
    let mut dots = [0f32; KEY_CHUNK];
    let mut buf = Vec::new();
    for j0 in (0..last).step_by(KEY_CHUNK) {
        let chunk = as_f32::<D>(kv.keys(j0 / KEY_CHUNK), &mut buf);
        for (i, &n) in keys.iter().enumerate() {
            if j0 >= n {
                continue;
            }
            let row = &mut scores[i * t + j0..i * t + n.min(j0 + KEY_CHUNK)];
            chunk_scores::<D>(block, i, j0, chunk, &mut dots, row);
            max[i] = max_of(max[i], row);
        }
    }

    for (i, &n) in keys.iter().enumerate() {
        for s in scores[i * t..][..n].iter_mut() {
            *s = detmath::exp(*s - max[i]);
        }
    }
    let mut sum = [0f32; BLOCK_ROWS];
    row_sums(scores, t, keys, &mut sum);

    out.fill(0.0);
    for j0 in (0..last).step_by(KEY_CHUNK) {
        let chunk = as_f32::<D>(kv.values(j0 / KEY_CHUNK), &mut buf);
        for (i, &n) in keys.iter().enumerate() {
            if j0 < n {
                let j1 = n.min(j0 + KEY_CHUNK);
                weighted_sum(
                    &scores[i * t + j0..i * t + j1],
                    &chunk[..(j1 - j0) * dv],
                    dv,
                    &mut out[i * dv..][..dv],
                );
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

/// The first of three steps that compute [`attend_block`] for a block split across threads (few
/// blocks, many keys: a decode step at a long context): the rows' scores against key chunks `c0..c0 + n`, into
/// `scores` (`[n][rows][KEY_CHUNK]`, keys past a row's last unmasked one left as they are), and
/// each row's largest among them into `max` (minus infinity for none). Every score is
/// [`attend_block`]'s, bit for bit.
pub fn block_scores(block: &Block, c0: usize, scores: &mut [f32], max: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::avx2_f16c() {
        // SAFETY: the CPU has AVX2 and F16C.
        return unsafe { block_scores_avx2(block, c0, scores, max) };
    }
    block_scores_body::<dots::Portable>(block, c0, scores, max)
}

/// The second step: chunks `c0..` of the rows' scores (as [`block_scores`] wrote them, in
/// `scores`) replaced by their exponentials, `exp(score - max)`, `max` the rows' largest scores
/// over all chunks: [`attend_block`]'s, bit for bit.
pub fn block_exps(block: &Block, c0: usize, scores: &mut [f32], max: &[f32]) {
    let rows = block.q.len() / block.d;
    let keys = keys_of_rows(block, rows);
    for (n, part) in scores.chunks_exact_mut(rows * KEY_CHUNK).enumerate() {
        let j0 = (c0 + n) * KEY_CHUNK;
        for (i, &k) in keys[..rows].iter().enumerate() {
            if j0 < k {
                for s in &mut part[i * KEY_CHUNK..][..k.min(j0 + KEY_CHUNK) - j0] {
                    *s = detmath::exp(*s - max[i]);
                }
            }
        }
    }
}

/// The last step: output columns `cols` of every row of the block, from every chunk's
/// exponentials ([`block_exps`]), into `out` (`[rows, cols.len()]`). Each column is
/// [`attend_block`]'s, bit for bit: the rows' sums key by key, the column's weighted sum key by
/// key.
pub fn block_values(block: &Block, scores: &[f32], cols: std::ops::Range<usize>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::avx2_f16c() {
        // SAFETY: the CPU has AVX2 and F16C.
        return unsafe { block_values_avx2(block, scores, cols, out) };
    }
    block_values_body::<dots::Portable>(block, scores, cols, out)
}

/// The keys each row of `block` reads (see [`Mask::keys_of_row`]).
#[inline(always)]
fn keys_of_rows(block: &Block, rows: usize) -> [usize; BLOCK_ROWS] {
    let mut keys = [0usize; BLOCK_ROWS];
    for (i, n) in keys[..rows].iter_mut().enumerate() {
        *n = block.mask.keys_of_row(i, block.t);
    }
    keys
}

#[inline(always)]
fn block_scores_body<D: KeyDots>(block: &Block, c0: usize, scores: &mut [f32], max: &mut [f32]) {
    let Block { q, d, kv, .. } = *block;
    let rows = q.len() / d;
    let keys = keys_of_rows(block, rows);
    let keys = &keys[..rows];
    max[..rows].fill(f32::NEG_INFINITY);
    let mut dots = [0f32; KEY_CHUNK];
    let mut buf = Vec::new();
    for (n, part) in scores.chunks_exact_mut(rows * KEY_CHUNK).enumerate() {
        let j0 = (c0 + n) * KEY_CHUNK;
        if keys.iter().all(|&k| j0 >= k) {
            continue;
        }
        let chunk = as_f32::<D>(kv.keys(c0 + n), &mut buf);
        for (i, &k) in keys.iter().enumerate() {
            if j0 >= k {
                continue;
            }
            let row = &mut part[i * KEY_CHUNK..][..k.min(j0 + KEY_CHUNK) - j0];
            chunk_scores::<D>(block, i, j0, chunk, &mut dots, row);
            max[i] = max_of(max[i], row);
        }
    }
}

#[inline(always)]
fn block_values_body<D: KeyDots>(
    block: &Block,
    scores: &[f32],
    cols: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let Block { q, d, kv, t, .. } = *block;
    let rows = q.len() / d;
    let keys = keys_of_rows(block, rows);
    let keys = &keys[..rows];
    let last = keys.iter().copied().max().unwrap_or(0);
    let width = cols.len();
    // Row i of chunk c: its exponentials.
    let row = |c: usize, i: usize| &scores[(c * rows + i) * KEY_CHUNK..][..KEY_CHUNK];
    // Each row's sum key by key from 0, as `row_sums` adds them.
    let mut sum = [0f32; BLOCK_ROWS];
    for (i, &n) in keys.iter().enumerate() {
        for j0 in (0..n).step_by(KEY_CHUNK) {
            let e = &row(j0 / KEY_CHUNK, i)[..(n - j0).min(KEY_CHUNK)];
            sum[i] = e.iter().fold(sum[i], |a, &x| a + x);
        }
    }
    out.fill(0.0);
    let mut buf = Vec::new();
    for j0 in (0..last).step_by(KEY_CHUNK) {
        let n = KEY_CHUNK.min(t - j0);
        let (values, stride) = match kv.values(j0 / KEY_CHUNK) {
            Stored::F32(v) => (&v[cols.start..], v.len() / n),
            Stored::F16(h) => {
                // Only these columns, widened into rows of `width`.
                let dv = h.len() / n;
                buf.resize(n * width, 0.0);
                for j in 0..n {
                    D::widen(
                        &h[j * dv + cols.start..][..width],
                        &mut buf[j * width..][..width],
                    );
                }
                (&buf[..], width)
            }
        };
        for (i, &k) in keys.iter().enumerate() {
            if j0 < k {
                let j1 = k.min(j0 + KEY_CHUNK);
                weighted_sum(
                    &row(j0 / KEY_CHUNK, i)[..j1 - j0],
                    values,
                    stride,
                    &mut out[i * width..][..width],
                );
            }
        }
    }
    for (i, o) in out.chunks_exact_mut(width.max(1)).enumerate().take(rows) {
        let inv = 1.0 / sum[i];
        for x in o {
            *x *= inv;
        }
    }
}

/// `sum[i]` = the sum of row i's first `keys[i]` scores (rows of `t`), key by key: the one
/// order on every target. Up to 8 rows run side by side, so that their additions overlap
/// instead of each waiting for the one before (a row alone is one chain of dependent adds).
#[inline(always)]
fn row_sums(scores: &[f32], t: usize, keys: &[usize], sum: &mut [f32]) {
    const SIDE: usize = 8;
    for (g, ks) in keys.chunks(SIDE).enumerate() {
        let first = g * SIDE;
        // The keys every row of the group has, summed together; then each row's own rest.
        let common = ks.iter().copied().min().unwrap_or(0);
        let mut acc = [0f32; SIDE];
        if ks.len() == SIDE {
            let rows: [&[f32]; SIDE] =
                std::array::from_fn(|r| &scores[(first + r) * t..][..common]);
            for j in 0..common {
                for r in 0..SIDE {
                    acc[r] += rows[r][j];
                }
            }
        } else {
            for j in 0..common {
                for (r, a) in acc[..ks.len()].iter_mut().enumerate() {
                    *a += scores[(first + r) * t + j];
                }
            }
        }
        for (r, &n) in ks.iter().enumerate() {
            let rest = &scores[(first + r) * t..][common..n];
            sum[first + r] = rest.iter().fold(acc[r], |a, &x| a + x);
        }
    }
}

/// `o += sum over j of p[j] * v[j]` (row j of `v` at `j * stride`, its first `o.len()` values),
/// key by key for every column; keys of weight 0 are skipped. [`COLUMNS`] columns at a time stay
/// in registers (how many does not change a column's sum).
#[inline(always)]
fn weighted_sum(p: &[f32], v: &[f32], stride: usize, o: &mut [f32]) {
    let dv = o.len();
    let mut c = 0;
    while c + COLUMNS <= dv {
        weighted_columns::<COLUMNS>(p, v, stride, o, c);
        c += COLUMNS;
    }
    while c + 32 <= dv {
        weighted_columns::<32>(p, v, stride, o, c);
        c += 32;
    }
    if c < dv {
        for (j, &pj) in p.iter().enumerate() {
            if pj != 0.0 {
                for (x, &y) in o[c..].iter_mut().zip(&v[j * stride + c..j * stride + dv]) {
                    *x += pj * y;
                }
            }
        }
    }
}

/// [`weighted_sum`] for columns `c..c + W`, held in registers.
#[inline(always)]
fn weighted_columns<const W: usize>(p: &[f32], v: &[f32], stride: usize, o: &mut [f32], c: usize) {
    let mut acc = [0f32; W];
    acc.copy_from_slice(&o[c..c + W]);
    for (j, &pj) in p.iter().enumerate() {
        if pj != 0.0 {
            let vj = &v[j * stride + c..][..W];
            for x in 0..W {
                acc[x] += pj * vj[x];
            }
        }
    }
    o[c..c + W].copy_from_slice(&acc);
}

/// The largest of `m` and `xs` (NaNs ignored, as `f32::max` does; the order of comparisons
/// does not change the result), in 8 lanes.
#[inline(always)]
fn max_of(m: f32, xs: &[f32]) -> f32 {
    let mut lanes = [m; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(m, |a, &x| detmath::max(a, x));
    for c in chunks {
        for l in 0..8 {
            lanes[l] = detmath::max(lanes[l], c[l]);
        }
    }
    lanes.iter().fold(tail, |a, &x| detmath::max(a, x))
}

/// A dot product in 8 independent lanes, added in lane order, then the products past the last
/// whole 8 in order: the one summation order of a score on every target.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = dot_tail(ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The products of [`dot`] past its last whole 8, summed in order.
#[inline(always)]
fn dot_tail(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// [`attend_block_body`] compiled for AVX2 and F16C.
///
/// # Safety
/// The CPU has AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn attend_block_avx2(block: &Block, scores: &mut [f32], out: &mut [f32]) {
    attend_block_body::<dots::Avx2>(block, scores, out)
}

/// [`block_scores_body`] compiled for AVX2 and F16C.
///
/// # Safety
/// The CPU has AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn block_scores_avx2(block: &Block, c0: usize, scores: &mut [f32], max: &mut [f32]) {
    block_scores_body::<dots::Avx2>(block, c0, scores, max)
}

/// [`block_values_body`] compiled for AVX2 and F16C.
///
/// # Safety
/// The CPU has AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn block_values_avx2(
    block: &Block,
    scores: &[f32],
    cols: std::ops::Range<usize>,
    out: &mut [f32],
) {
    block_values_body::<dots::Avx2>(block, scores, cols, out)
}

/// The rows of `block`: each row of `out` (`[rows, Dv]`) = softmax(q k^T * scale + mask) v;
/// `scores` (`rows * T`) is scratch.
pub fn attend_block(block: &Block, scores: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::avx2_f16c() {
        // SAFETY: the CPU has AVX2 and F16C.
        return unsafe { attend_block_avx2(block, scores, out) };
    }
    attend_block_body::<dots::Portable>(block, scores, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel as it was before key chunks and vector dot products: row by row inside each
    /// key, with [`dot`] per score. The new one must give its results bit for bit.
    fn key_by_key(block: &Block, k: &[f32], v: &[f32], scores: &mut [f32], out: &mut [f32]) {
        let Block {
            q, d, mask, scale, ..
        } = *block;
        let rows = q.len() / d;
        let t = scores.len() / rows;
        let dv = out.len() / rows;
        let keys: Vec<usize> = (0..rows)
            .map(|i| {
                (0..t)
                    .rposition(|j| mask.at(i, j) > MASKED)
                    .map_or(t, |j| j + 1)
            })
            .collect();
        let last = keys.iter().copied().max().unwrap_or(0);
        let mut max = vec![f32::NEG_INFINITY; rows];
        for j in 0..last {
            for (i, &n) in keys.iter().enumerate() {
                if j < n {
                    let m = mask.at(i, j);
                    let s = if m <= MASKED {
                        m
                    } else {
                        dot(&q[i * d..][..d], &k[j * d..][..d]) * scale + m
                    };
                    scores[i * t + j] = s;
                    max[i] = max[i].max(s);
                }
            }
        }
        let mut sum = vec![0f32; rows];
        for (i, &n) in keys.iter().enumerate() {
            for s in &mut scores[i * t..][..n] {
                *s = detmath::exp(*s - max[i]);
                sum[i] += *s;
            }
        }
        out.fill(0.0);
        for j in 0..last {
            for (i, &n) in keys.iter().enumerate() {
                let p = scores[i * t + j];
                if j < n && p != 0.0 {
                    for (o, &x) in out[i * dv..][..dv].iter_mut().zip(&v[j * dv..][..dv]) {
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

    /// A deterministic pseudo-random value in [-2, 2).
    fn val(i: usize) -> f32 {
        let x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    }

    /// A row's key count, scanned 8 at a time, is the key-by-key scan's: every length around
    /// the 8s, the last unmasked key anywhere, rows masked out entirely, strided masks.
    #[test]
    fn rows_end_at_their_last_unmasked_key() {
        for t in [0, 1, 7, 8, 9, 16, 17, 63, 64, 65] {
            for last in (0..t).map(Some).chain([None]) {
                let row: Vec<f32> = (0..t)
                    .map(|j| match last {
                        Some(l) if j == l || j * 3 < l => 0.5,
                        _ if j % 2 == 1 => f32::NEG_INFINITY,
                        _ => -1e9,
                    })
                    .collect();
                let want = last.map_or(t, |l| l + 1);
                let contiguous = Mask {
                    data: &row,
                    base: 0,
                    row: t,
                    col: 1,
                };
                assert_eq!(contiguous.keys_of_row(0, t), want, "t {t} last {last:?}");
                let spread: Vec<f32> = row.iter().flat_map(|&m| [m, 0.0]).collect();
                let strided = Mask {
                    data: &spread,
                    base: 0,
                    row: 2 * t,
                    col: 2,
                };
                assert_eq!(
                    strided.keys_of_row(0, t),
                    want,
                    "t {t} last {last:?} strided"
                );
            }
        }
    }

    #[test]
    fn same_bits_as_key_by_key_for_every_shape() {
        // (rows, keys, head width, value width): decode's grouped rows, a prefill block, chunk
        // edges (63..65, 129 keys), widths with a tail past the last 8 and past COLUMNS.
        let shapes = [
            (3, 2000, 64, 64),
            (16, 129, 64, 64),
            (1, 1, 64, 64),
            (5, 63, 32, 32),
            (7, 65, 20, 20),
            (2, 70, 256, 256),
            (4, 64, 12, 40),
            (16, 300, 9, 33),
            (12, 200, 64, 96),
        ];
        for (case, &(rows, t, d, dv)) in shapes.iter().enumerate() {
            let q: Vec<f32> = (0..rows * d).map(|i| val(i + case * 7)).collect();
            let k: Vec<f32> = (0..t * d).map(|i| val(i * 3 + 1)).collect();
            let v: Vec<f32> = (0..t * dv).map(|i| val(i * 5 + 2)).collect();
            // Row i sits at position t - rows + i (causal), one key masked out by a window,
            // every 11th key of row 0 masked by a large negative that is not -1e9, and every
            // 13th key of row 1 masked out.
            let mask: Vec<f32> = (0..rows * t)
                .map(|x| {
                    let (i, j) = (x / t, x % t);
                    if j + rows > t + i {
                        -1e9
                    } else if j == 0 && t > 2 {
                        f32::NEG_INFINITY
                    } else if i == 0 && j % 11 == 5 {
                        -30.0
                    } else if i == 1 && j % 13 == 7 {
                        // Weight 0 for row 1 alone, inside the keys its neighbours read.
                        -1e9
                    } else {
                        0.0
                    }
                })
                .collect();
            let kv = Contiguous { k: &k, v: &v, t };
            let block = Block {
                q: &q,
                d,
                kv: &kv,
                t,
                mask: Mask {
                    data: &mask,
                    base: 0,
                    row: t,
                    col: 1,
                },
                scale: 0.125,
            };
            let (mut s1, mut s2) = (vec![0f32; rows * t], vec![0f32; rows * t]);
            let (mut o1, mut o2) = (vec![0f32; rows * dv], vec![0f32; rows * dv]);
            key_by_key(&block, &k, &v, &mut s1, &mut o1);
            attend_block(&block, &mut s2, &mut o2);
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&o1), bits(&o2), "shape {:?}", shapes[case]);
            for parts in [1, 2, 3, 5] {
                let split = in_parts(&block, parts, dv);
                assert_eq!(
                    bits(&o1),
                    bits(&split),
                    "in {parts} parts, {:?}",
                    shapes[case]
                );
            }
            // The portable path too, where the machine has AVX2.
            attend_block_body::<dots::Portable>(&block, &mut s2, &mut o2);
            assert_eq!(bits(&o1), bits(&o2), "portable, shape {:?}", shapes[case]);

            // Stored as float16: the same results as those float16 values stored as f32.
            let (kh, vh): (Vec<f16>, Vec<f16>) = (
                k.iter().map(|&x| f16::from_f32(x)).collect(),
                v.iter().map(|&x| f16::from_f32(x)).collect(),
            );
            let widen = |h: &[f16]| h.iter().map(|h| h.to_f32()).collect::<Vec<_>>();
            let (kw, vw) = (widen(&kh), widen(&vh));
            let as_f32 = Contiguous { k: &kw, v: &vw, t };
            let as_f16 = HalfChunks { k: &kh, v: &vh, t };
            key_by_key(
                &Block {
                    kv: &as_f32,
                    ..block
                },
                &kw,
                &vw,
                &mut s1,
                &mut o1,
            );
            let half_block = Block {
                kv: &as_f16,
                ..block
            };
            attend_block(&half_block, &mut s2, &mut o2);
            assert_eq!(bits(&o1), bits(&o2), "f16, shape {:?}", shapes[case]);
            for parts in [1, 2, 3, 5] {
                let split = in_parts(&half_block, parts, dv);
                assert_eq!(
                    bits(&o1),
                    bits(&split),
                    "f16 in {parts} parts, {:?}",
                    shapes[case]
                );
            }
            attend_block_body::<dots::Portable>(&half_block, &mut s2, &mut o2);
            assert_eq!(
                bits(&o1),
                bits(&o2),
                "f16 portable, shape {:?}",
                shapes[case]
            );
        }
    }

    /// `block` as a split block runs ([`block_scores`], [`block_exps`], [`block_values`]): its
    /// key chunks in `parts` ranges (uneven), then its columns in `parts` ranges (uneven; one 1 wide where
    /// there are enough), on the dispatched kernels and on the portable ones (which must agree).
    fn in_parts(block: &Block, parts: usize, dv: usize) -> Vec<f32> {
        let rows = block.q.len() / block.d;
        let chunks = block.t.div_ceil(KEY_CHUNK);
        let cuts = |n: usize| -> Vec<usize> {
            let mut c: Vec<usize> = (0..=parts).map(|p| n * p * p / (parts * parts)).collect();
            if parts > 1 && n > parts {
                c[1] = c[1].max(1);
            }
            c.dedup();
            c
        };
        let mut results = vec![];
        for portable in [false, true] {
            let mut scores = vec![f32::NAN; chunks * rows * KEY_CHUNK];
            let mut max = [f32::NEG_INFINITY; BLOCK_ROWS];
            for w in cuts(chunks).windows(2) {
                let mut part_max = [0f32; BLOCK_ROWS];
                let sc = &mut scores[w[0] * rows * KEY_CHUNK..w[1] * rows * KEY_CHUNK];
                if portable {
                    block_scores_body::<dots::Portable>(block, w[0], sc, &mut part_max);
                } else {
                    block_scores(block, w[0], sc, &mut part_max);
                }
                for (m, x) in max.iter_mut().zip(part_max) {
                    *m = m.max(x);
                }
            }
            for w in cuts(chunks).windows(2) {
                let sc = &mut scores[w[0] * rows * KEY_CHUNK..w[1] * rows * KEY_CHUNK];
                block_exps(block, w[0], sc, &max);
            }
            let mut out = vec![0f32; rows * dv];
            for w in cuts(dv).windows(2) {
                let mut o = vec![0f32; rows * (w[1] - w[0])];
                if portable {
                    block_values_body::<dots::Portable>(block, &scores, w[0]..w[1], &mut o);
                } else {
                    block_values(block, &scores, w[0]..w[1], &mut o);
                }
                for (i, r) in o.chunks_exact(w[1] - w[0]).enumerate() {
                    out[i * dv + w[0]..i * dv + w[1]].copy_from_slice(r);
                }
            }
            results.push(out);
        }
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&results[0]), bits(&results[1]), "portable halves");
        results.pop().expect("two")
    }

    /// Contiguous float16 keys (`[t, D]`) and values (`[t, Dv]`).
    struct HalfChunks<'a> {
        k: &'a [f16],
        v: &'a [f16],
        t: usize,
    }

    impl KeyValues for HalfChunks<'_> {
        fn keys(&self, c: usize) -> Stored<'_> {
            let (j0, j1) = (c * KEY_CHUNK, self.t.min((c + 1) * KEY_CHUNK));
            let d = self.k.len() / self.t;
            Stored::F16(&self.k[j0 * d..j1 * d])
        }
        fn values(&self, c: usize) -> Stored<'_> {
            let (j0, j1) = (c * KEY_CHUNK, self.t.min((c + 1) * KEY_CHUNK));
            let dv = self.v.len() / self.t;
            Stored::F16(&self.v[j0 * dv..j1 * dv])
        }
    }

    /// Every float16 (infinities, NaNs, subnormals included) widens to the `half` crate's f32.
    #[test]
    fn vector_widening_equals_the_half_crate_for_every_float16() {
        let h: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let expected: Vec<u32> = h.iter().map(|h| h.to_f32().to_bits()).collect();
        let mut out = vec![0f32; h.len()];
        // 3 values short of a whole 8: the scalar tail too.
        let n = h.len() - 3;
        <dots::Portable as KeyDots>::widen(&h[..n], &mut out[..n]);
        let got: Vec<u32> = out[..n].iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, expected[..n], "portable");
        #[cfg(target_arch = "x86_64")]
        if super::super::cpu::avx2_f16c() {
            <dots::Avx2 as KeyDots>::widen(&h[..n], &mut out[..n]);
            let got: Vec<u32> = out[..n].iter().map(|x| x.to_bits()).collect();
            assert_eq!(got, expected[..n], "f16c");
        }
    }

    #[test]
    fn vector_dots_equal_dot_bit_for_bit() {
        for d in [8, 12, 64, 72, 256] {
            let n = 37;
            let q: Vec<f32> = (0..d).map(|i| val(i + d)).collect();
            let keys: Vec<f32> = (0..n * d).map(|i| val(i * 7 + 3)).collect();
            let expected: Vec<u32> = (0..n)
                .map(|j| dot(&q, &keys[j * d..][..d]).to_bits())
                .collect();
            let mut out = vec![0f32; n];
            <dots::Portable as KeyDots>::dots(&q, &keys, d, &mut out);
            let got: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
            assert_eq!(got, expected, "portable, d = {d}");
            #[cfg(target_arch = "x86_64")]
            if super::super::cpu::avx2_f16c() {
                <dots::Avx2 as KeyDots>::dots(&q, &keys, d, &mut out);
                let got: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
                assert_eq!(got, expected, "avx2, d = {d}");
            }
        }
    }
}
