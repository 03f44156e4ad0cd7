//! `SlmAttention`: fused scaled-dot-product attention. Run node by node, the chain an ONNX
//! export spells out ([`crate::onnx::attention`]) spends most of a decode step's attention time
//! outside the arithmetic: the transposed K is repacked for the matrix product, the score and
//! probability tensors are allocated and reshaped, every layer, every token. This op reads K and
//! V where they are (the `present.*` KV tensors) and computes each query row in one pass
//! ([`crate::kernels::attention`]): scores, softmax, weighted sum of V. Same arithmetic in f32.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use super::{Inferred, Io, Rules, ATTENTION, SCALE};
use crate::kernels::attention::{
    attend_block, block_exps, block_scores, block_values, Block, Contiguous, KeyValues, Mask,
    Stored, BLOCK_ROWS, KEY_CHUNK,
};
use crate::kernels::{parallel_ranges, OutPtr};
use crate::onnx::graph::attr;

pub(super) fn build(
    _ctx: &ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let scale = attr(node, SCALE)
        .map(|a| a.f)
        .context("SlmAttention without a scale")?;
    Ok((expand(Inferred(Attention { scale })), vec![]))
}

/// `out = softmax(q @ k^T * scale + mask) @ v` over the last axis: q `[.., M, D]`, k `[.., T, D]`,
/// v `[.., T, Dv]`, mask broadcast to `[.., M, T]`; the leading axes of k, v and mask broadcast
/// to q's.
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    pub scale: f32,
}

impl Eq for Attention {}

impl Rules for Attention {
    const INPUTS: usize = 4;

    fn rules<'r>(&'r self, s: &mut Solver<'r>, io: Io<'r>) -> InferenceResult {
        let Io { inputs, outputs } = io;
        for input in inputs {
            s.equals(&input.datum_type, f32::datum_type())?;
        }
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].rank, &inputs[0].rank)?;
        s.equals(&inputs[1].rank, &inputs[0].rank)?;
        s.equals(&inputs[2].rank, &inputs[0].rank)?;
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            for ax in 0..rank - 1 {
                s.equals(&outputs[0].shape[ax], &inputs[0].shape[ax])?;
            }
            s.equals(&inputs[1].shape[rank - 1], &inputs[0].shape[rank - 1])?;
            s.equals(&inputs[2].shape[rank - 2], &inputs[1].shape[rank - 2])?;
            s.equals(&outputs[0].shape[rank - 1], &inputs[2].shape[rank - 1])
        })?;
        Ok(())
    }
}

impl Op for Attention {
    fn name(&self) -> StaticName {
        ATTENTION.into()
    }

    op_as_typed_op!();
}

/// Element strides of `shape` seen as `target` (right-aligned, numpy broadcasting): 0 on an
/// axis of size 1 that `target` repeats.
pub(crate) fn broadcast_strides(shape: &[usize], target: &[usize]) -> TractResult<Vec<usize>> {
    ensure!(
        shape.len() <= target.len(),
        "cannot broadcast {shape:?} to {target:?}"
    );
    let mut strides = vec![0; target.len()];
    let mut stride = 1;
    for (i, &d) in shape.iter().enumerate().rev() {
        let t = target[target.len() - shape.len() + i];
        ensure!(d == t || d == 1, "cannot broadcast {shape:?} to {target:?}");
        strides[target.len() - shape.len() + i] = if d == 1 { 0 } else { stride };
        stride *= d;
    }
    Ok(strides)
}

/// Offset of the leading-axes index `lead` (row-major over `dims`) under `strides`.
pub(crate) fn offset(mut lead: usize, dims: &[usize], strides: &[usize]) -> usize {
    let mut off = 0;
    for (d, s) in dims.iter().zip(strides).rev() {
        off += (lead % d) * s;
        lead /= d;
    }
    off
}

/// An attention over `heads * m` query rows (`q` is `[heads, m, d]`): each against the `t` keys
/// and values of its head, `chunks(h, c)` its chunks ([`KvChunks`]), with the mask of row i of
/// head h at `mask[mask_head(h) + i * mask_row + j * mask_col]`.
pub(crate) struct Heads<'a> {
    pub(crate) q: &'a [f32],
    pub(crate) heads: usize,
    pub(crate) m: usize,
    pub(crate) d: usize,
    pub(crate) chunks: &'a dyn KvChunks,
    pub(crate) t: usize,
    pub(crate) dv: usize,
    pub(crate) mask: &'a [f32],
    pub(crate) mask_head: &'a (dyn Fn(usize) -> usize + Sync),
    pub(crate) mask_row: usize,
    pub(crate) mask_col: usize,
    pub(crate) scale: f32,
}

/// Head `h` of `kv`, for the kernel.
struct Head<'a> {
    kv: &'a dyn KvChunks,
    h: usize,
}

impl KeyValues for Head<'_> {
    fn keys(&self, c: usize) -> Stored<'_> {
        self.kv.keys(self.h, c)
    }
    fn values(&self, c: usize) -> Stored<'_> {
        self.kv.values(self.h, c)
    }
}

/// Where an attention's keys and values are, chunk by chunk ([`KeyValues`] of every head).
pub(crate) trait KvChunks: Sync {
    /// Keys `c * KEY_CHUNK..` of head `h` (`[n, d]`), n =
    /// [`KEY_CHUNK`](crate::kernels::attention::KEY_CHUNK) or what is left of the `t` keys.
    fn keys(&self, h: usize, c: usize) -> Stored<'_>;
    /// Their values (`[n, dv]`).
    fn values(&self, h: usize, c: usize) -> Stored<'_>;
}

/// Keys and values laid out head by head, `t` tokens each: head h's keys `[t, d]` at
/// `keys[key_head(h)..]`, its values `[t, dv]` at `values[value_head(h)..]`.
pub(crate) struct ContiguousHeads<'a> {
    pub(crate) keys: &'a [f32],
    pub(crate) key_head: &'a (dyn Fn(usize) -> usize + Sync),
    pub(crate) values: &'a [f32],
    pub(crate) value_head: &'a (dyn Fn(usize) -> usize + Sync),
    pub(crate) t: usize,
    pub(crate) d: usize,
    pub(crate) dv: usize,
}

impl ContiguousHeads<'_> {
    fn head(&self, h: usize) -> Contiguous<'_> {
        let (t, d, dv) = (self.t, self.d, self.dv);
        Contiguous {
            k: &self.keys[(self.key_head)(h)..][..t * d],
            v: &self.values[(self.value_head)(h)..][..t * dv],
            t,
        }
    }
}

impl KvChunks for ContiguousHeads<'_> {
    fn keys(&self, h: usize, c: usize) -> Stored<'_> {
        Stored::F32(self.head(h).at(c).0)
    }
    fn values(&self, h: usize, c: usize) -> Stored<'_> {
        Stored::F32(self.head(h).at(c).1)
    }
}

/// The `[heads, m, dv]` result of `a`: each head's rows in blocks of up to [`BLOCK_ROWS`]
/// ([`attend_block`]), whole blocks split across threads, so that the rows which share a
/// head's keys and values read them once between them.
pub(crate) fn attend_heads(a: &Heads) -> Vec<f32> {
    attend_all(std::slice::from_ref(a))
        .pop()
        .expect("one result per attention")
}

/// The results of several attentions at once (the sequences of a packed run), each as
/// [`attend_heads`] computes it: their blocks are split across the threads together, so that
/// many small attentions keep both threads busy with one split instead of one each. Too few
/// blocks to share evenly, over many keys (a decode step at a long context: one block per KV
/// head), are split inside ([`attend_split`]).
pub(crate) fn attend_all(all: &[Heads]) -> Vec<Vec<f32>> {
    let blocks = Blocks::of(all);
    let mut outs: Vec<Vec<f32>> = all
        .iter()
        .map(|a| vec![0f32; a.heads * a.m * a.dv])
        .collect();
    let dsts: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
    let threads = crate::kernels::threads();
    if threads > 1
        && blocks.count < SPLIT_BELOW_BLOCKS_PER_THREAD * threads
        && all.iter().all(|a| a.t >= SPLIT_MIN_KEYS)
    {
        attend_split(all, &blocks, threads, &dsts);
        return outs;
    }
    let scratch = all
        .iter()
        .map(|a| BLOCK_ROWS.min(a.m) * a.t)
        .max()
        .unwrap_or(0);
    let run = |b0: usize, b1: usize| {
        // Scratch for the largest block: a decode step's 3 rows, not BLOCK_ROWS, zeroed per call.
        let mut scores = vec![0f32; scratch];
        for b in b0..b1 {
            blocks.with(all, b, |j, row, block| {
                let (n, dv) = (block.q.len() / block.d, all[j].dv);
                // SAFETY: row + n <= heads * m, so the rows row..row + n of attention j's output
                // (heads * m * dv long, alive until the calls return) are inside it; each row is
                // written by exactly one call, so the slice aliases nothing.
                let o = unsafe { std::slice::from_raw_parts_mut(dsts[j].at(row * dv), n * dv) };
                attend_block(block, &mut scores[..n * block.t], o);
            });
        }
    };
    parallel_ranges(blocks.count, blocks.macs, &run);
    outs
}

/// Split a block inside when there are fewer blocks than this many per thread.
const SPLIT_BELOW_BLOCKS_PER_THREAD: usize = 4;

/// ... and every attention has at least this many keys. Below, the split's two extra hand-overs
/// between threads per layer cost more than the balance gains: on the default model at 2
/// threads, decode at a 400-token context was 0.94x without the split, at 1,000 tokens 1.08x.
const SPLIT_MIN_KEYS: usize = 16 * KEY_CHUNK;

/// The blocks of several attentions, numbered across all of them.
struct Blocks {
    /// Row blocks per head, per attention.
    per_head: Vec<usize>,
    /// The number of each attention's first block.
    first: Vec<usize>,
    count: usize,
    macs: usize,
}

impl Blocks {
    fn of(all: &[Heads]) -> Blocks {
        let per_head: Vec<usize> = all.iter().map(|a| a.m.div_ceil(BLOCK_ROWS)).collect();
        let mut first = Vec::with_capacity(all.len());
        let (mut count, mut macs) = (0, 0);
        for (a, &per_head) in all.iter().zip(&per_head) {
            first.push(count);
            count += a.heads * per_head;
            macs += a.heads * a.m * a.t * (a.d + a.dv);
        }
        Blocks {
            per_head,
            first,
            count,
            macs,
        }
    }

    /// Calls `f(j, row, block)` with block `b`: attention j's rows `row..` (of its `heads * m`)
    /// as a kernel [`Block`].
    fn with<R>(&self, all: &[Heads], b: usize, f: impl FnOnce(usize, usize, &Block) -> R) -> R {
        let j = self.first.partition_point(|&f| f <= b) - 1;
        let (a, b) = (&all[j], b - self.first[j]);
        let (m, d) = (a.m, a.d);
        let (h, i) = (b / self.per_head[j], b % self.per_head[j] * BLOCK_ROWS);
        let (row, n) = (h * m + i, BLOCK_ROWS.min(m - i));
        let kv = Head { kv: a.chunks, h };
        let block = Block {
            q: &a.q[row * d..(row + n) * d],
            d,
            kv: &kv,
            t: a.t,
            mask: Mask {
                data: a.mask,
                base: (a.mask_head)(h) + i * a.mask_row,
                row: a.mask_row,
                col: a.mask_col,
            },
            scale: a.scale,
        };
        f(j, row, &block)
    }
}

/// [`attend_all`] for a few blocks over many keys, each block in three passes that the threads
/// share: the scores of a part of its key chunks each ([`block_scores`]); once all are in (and
/// each row's largest), their exponentials, by the same parts ([`block_exps`]); then a range of
/// its output columns each ([`block_values`], which sums the exponentials). The same bits as
/// [`attend_block`]; a 2,000-token decode step's three blocks no longer split 2:1 over two
/// threads.
fn attend_split(all: &[Heads], blocks: &Blocks, threads: usize, dsts: &[OutPtr]) {
    // Per block: its rows, key chunks, where its scores start, its output width.
    struct Split {
        rows: usize,
        chunks: usize,
        scores_at: usize,
        dv: usize,
    }
    let mut splits = Vec::with_capacity(blocks.count);
    let mut floats = 0;
    for b in 0..blocks.count {
        let (rows, t, dv) = blocks.with(all, b, |j, _, block| {
            (block.q.len() / block.d, block.t, all[j].dv)
        });
        let chunks = t.div_ceil(KEY_CHUNK);
        splits.push(Split {
            rows,
            chunks,
            scores_at: floats,
            dv,
        });
        floats += chunks * rows * KEY_CHUNK;
    }
    // Enough parts in all to share evenly: key-chunk ranges, then column ranges.
    let parts = (SPLIT_BELOW_BLOCKS_PER_THREAD * threads).div_ceil(blocks.count.max(1));
    let key_parts: Vec<(usize, usize, usize)> = splits
        .iter()
        .enumerate()
        .flat_map(|(b, s)| {
            let n = parts.min(s.chunks);
            (0..n).map(move |p| (b, s.chunks * p / n, s.chunks * (p + 1) / n))
        })
        .collect();
    let mut scores = vec![0f32; floats];
    let mut maxes = vec![f32::NEG_INFINITY; key_parts.len() * BLOCK_ROWS];
    let (scores_ptr, maxes_ptr) = (OutPtr(scores.as_mut_ptr()), OutPtr(maxes.as_mut_ptr()));
    let score_parts = |p0: usize, p1: usize| {
        for (p, &(b, c0, c1)) in key_parts.iter().enumerate().take(p1).skip(p0) {
            let s = &splits[b];
            let len = (c1 - c0) * s.rows * KEY_CHUNK;
            // SAFETY: part p writes chunks c0..c1 of block b's scores and its own BLOCK_ROWS
            // maxima: inside `scores` and `maxes`, and no other part's.
            let (sc, mx) = unsafe {
                (
                    std::slice::from_raw_parts_mut(
                        scores_ptr.at(s.scores_at + c0 * s.rows * KEY_CHUNK),
                        len,
                    ),
                    std::slice::from_raw_parts_mut(maxes_ptr.at(p * BLOCK_ROWS), BLOCK_ROWS),
                )
            };
            blocks.with(all, b, |_, _, block| block_scores(block, c0, sc, mx));
        }
    };
    parallel_ranges(key_parts.len(), blocks.macs / 2, &score_parts);

    // Each row's largest score over all its block's parts (the order does not matter).
    let mut max = vec![f32::NEG_INFINITY; blocks.count * BLOCK_ROWS];
    for (p, &(b, ..)) in key_parts.iter().enumerate() {
        for (m, &x) in max[b * BLOCK_ROWS..][..BLOCK_ROWS]
            .iter_mut()
            .zip(&maxes[p * BLOCK_ROWS..][..BLOCK_ROWS])
        {
            *m = m.max(x);
        }
    }
    let exp_parts = |p0: usize, p1: usize| {
        for &(b, c0, c1) in key_parts.iter().take(p1).skip(p0) {
            let s = &splits[b];
            // SAFETY: as in `score_parts`: chunks c0..c1 of block b's scores are this part's.
            let sc = unsafe {
                std::slice::from_raw_parts_mut(
                    scores_ptr.at(s.scores_at + c0 * s.rows * KEY_CHUNK),
                    (c1 - c0) * s.rows * KEY_CHUNK,
                )
            };
            let max = &max[b * BLOCK_ROWS..][..BLOCK_ROWS];
            blocks.with(all, b, |_, _, block| block_exps(block, c0, sc, max));
        }
    };
    let exps: usize = splits.iter().map(|s| s.rows * s.chunks * KEY_CHUNK).sum();
    parallel_ranges(key_parts.len(), exps * 16, &exp_parts);

    let column_parts: Vec<(usize, usize, usize)> = splits
        .iter()
        .enumerate()
        .flat_map(|(b, s)| {
            // Whole 32-column groups, which the kernel keeps in registers.
            let n = parts.min(s.dv / 32).max(1);
            (0..n).map(move |p| {
                let end = if p + 1 == n { s.dv } else { 32 * (p + 1) };
                (b, 32 * p, end)
            })
        })
        .collect();
    let value_parts = |p0: usize, p1: usize| {
        let mut out = vec![];
        for &(b, c0, c1) in column_parts.iter().take(p1).skip(p0) {
            let s = &splits[b];
            let scores = &scores[s.scores_at..][..s.chunks * s.rows * KEY_CHUNK];
            out.resize(s.rows * (c1 - c0), 0.0);
            blocks.with(all, b, |j, row, block| {
                block_values(block, scores, c0..c1, &mut out);
                for (i, o) in out.chunks_exact(c1 - c0).enumerate() {
                    // SAFETY: row + i < heads * m and c1 <= dv: inside attention j's output;
                    // each (row, column range) is written by exactly one part.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(dsts[j].at((row + i) * s.dv + c0), c1 - c0)
                    };
                    dst.copy_from_slice(o);
                }
            });
        }
    };
    parallel_ranges(column_parts.len(), blocks.macs / 2, &value_parts);
}

impl EvalOp for Attention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, k, v, mask) = (&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
        let rank = q.rank();
        ensure!(
            rank >= 2 && k.rank() == rank && v.rank() == rank,
            "{ATTENTION}: q, k and v need one rank >= 2"
        );
        let (m, d) = (q.shape()[rank - 2], q.shape()[rank - 1]);
        let (t, dv) = (k.shape()[rank - 2], v.shape()[rank - 1]);
        ensure!(
            k.shape()[rank - 1] == d && v.shape()[rank - 2] == t,
            "{ATTENTION}: q {:?} k {:?} v {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        );
        let lead = &q.shape()[..rank - 2];
        let heads: usize = lead.iter().product();
        // Strides of the leading axes, and of the mask's last two, all in elements.
        let lead_strides = |x: &TValue, inner: usize| -> TractResult<Vec<usize>> {
            let s = broadcast_strides(&x.shape()[..rank - 2], lead)?;
            Ok(s.into_iter().map(|s| s * inner).collect())
        };
        let (ks, vs) = (lead_strides(k, t * d)?, lead_strides(v, t * dv)?);
        let mut mask_target: Vec<usize> = lead.to_vec();
        mask_target.extend([m, t]);
        let mask_strides = broadcast_strides(mask.shape(), &mask_target)?;
        let (mask_row, mask_col) = (mask_strides[rank - 2], mask_strides[rank - 1]);
        let views = [
            q.try_as_plain_ram()?,
            k.try_as_plain_ram()?,
            v.try_as_plain_ram()?,
            mask.try_as_plain_ram()?,
        ];
        let mut out_shape: TVec<usize> = q.shape().into();
        out_shape[rank - 1] = dv;
        let kv = ContiguousHeads {
            keys: views[1].as_slice()?,
            key_head: &|h| offset(h, lead, &ks),
            values: views[2].as_slice()?,
            value_head: &|h| offset(h, lead, &vs),
            t,
            d,
            dv,
        };
        let out = attend_heads(&Heads {
            q: views[0].as_slice()?,
            heads,
            m,
            d,
            chunks: &kv,
            t,
            dv,
            mask: views[3].as_slice()?,
            mask_head: &|h| offset(h, lead, &mask_strides[..rank - 2]),
            mask_row,
            mask_col,
            scale: self.scale,
        });
        Ok(tvec!(Tensor::from_shape(&out_shape, &out)?.into_tvalue()))
    }
}

impl TypedOp for Attention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        let dv = inputs[2]
            .shape
            .last()
            .cloned()
            .context("SlmAttention: v has rank 0")?;
        *shape.last_mut().context("SlmAttention: q has rank 0")? = dv;
        Ok(tvec!(f32::fact(shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let rows: TDim = inputs[0].shape.iter().rev().skip(1).product();
        let keys = inputs[1]
            .shape
            .iter()
            .rev()
            .nth(1)
            .cloned()
            .unwrap_or(1.into());
        let width = inputs[0].shape.last().cloned().unwrap_or(1.into())
            + inputs[2].shape.last().cloned().unwrap_or(1.into());
        Ok(tvec!((Cost::FMA(f32::datum_type()), rows * keys * width)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two attentions of a packed run, long enough to split (heads sharing KV heads in blocks of
    /// 3 rows, a masked tail), as [`attend_split`] computes them at 2 and 3 threads' parts, on
    /// this thread: every output is the unsplit path's, bit for bit.
    #[test]
    fn a_split_block_gives_the_unsplit_bits() {
        let (heads, d, dv) = (2, 64, 96);
        let val = |i: usize| ((i * 7919 % 1999) as f32 / 999.5 - 1.0) * 0.5;
        let specs = [(3, SPLIT_MIN_KEYS + 70), (1, SPLIT_MIN_KEYS + 1)];
        let data: Vec<(Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>)> = specs
            .iter()
            .enumerate()
            .map(|(a, &(m, t))| {
                let q = (0..heads * m * d).map(|i| val(i + a)).collect();
                let k = (0..heads * t * d).map(|i| val(3 * i + 1)).collect();
                let v = (0..heads * t * dv).map(|i| val(5 * i + 2)).collect();
                // The last 5 keys masked out for the first row.
                let mask = (0..m * t)
                    .map(|x| {
                        if x / t == 0 && x % t >= t - 5 {
                            -1e9
                        } else {
                            0.0
                        }
                    })
                    .collect();
                (q, k, v, mask)
            })
            .collect();
        let key_heads: Vec<_> = specs
            .iter()
            .map(|&(_, t)| move |h: usize| h * t * d)
            .collect();
        let value_heads: Vec<_> = specs
            .iter()
            .map(|&(_, t)| move |h: usize| h * t * dv)
            .collect();
        let kvs: Vec<ContiguousHeads> = specs
            .iter()
            .zip(&data)
            .zip(key_heads.iter().zip(&value_heads))
            .map(|((&(_, t), (_, k, v, _)), (kh, vh))| ContiguousHeads {
                keys: k,
                key_head: kh,
                values: v,
                value_head: vh,
                t,
                d,
                dv,
            })
            .collect();
        let shared = |_: usize| 0;
        let all: Vec<Heads> = specs
            .iter()
            .zip(&data)
            .zip(&kvs)
            .map(|((&(m, t), (q, _, _, mask)), kv)| Heads {
                q,
                heads,
                m,
                d,
                chunks: kv,
                t,
                dv,
                mask,
                mask_head: &shared,
                mask_row: t,
                mask_col: 1,
                scale: 0.125,
            })
            .collect();
        // One thread: no split.
        let whole = attend_all(&all);
        let blocks = Blocks::of(&all);
        for threads in [2, 3] {
            let mut outs: Vec<Vec<f32>> = whole.iter().map(|o| vec![f32::NAN; o.len()]).collect();
            let dsts: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
            attend_split(&all, &blocks, threads, &dsts);
            for (a, (w, o)) in whole.iter().zip(&outs).enumerate() {
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(w),
                    bits(o),
                    "attention {a}, parts for {threads} threads"
                );
            }
        }
    }

    /// softmax(q k^T * scale + mask) v, row by row, in f64.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: &[f32],
        m: usize,
        t: usize,
        d: usize,
        scale: f32,
    ) -> Vec<f32> {
        let mut out = vec![0f32; m * d];
        for i in 0..m {
            let s: Vec<f64> = (0..t)
                .map(|j| {
                    (0..d)
                        .map(|x| q[i * d + x] as f64 * k[j * d + x] as f64)
                        .sum::<f64>()
                        * scale as f64
                        + mask[i * t + j] as f64
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for x in 0..d {
                out[i * d + x] =
                    ((0..t).map(|j| e[j] * v[j * d + x] as f64).sum::<f64>() / sum) as f32;
            }
        }
        out
    }

    #[test]
    fn matches_reference_with_a_causal_mask_over_heads() {
        let (heads, m, t, d) = (3, 5, 9, 12);
        let val = |i: usize| (i * 7919 % 113) as f32 / 56.0 - 1.0;
        let q: Vec<f32> = (0..heads * m * d).map(val).collect();
        let k: Vec<f32> = (0..heads * t * d).map(|i| val(i + 5)).collect();
        let v: Vec<f32> = (0..heads * t * d).map(|i| val(i + 11)).collect();
        // Query i sits at position t - m + i: it sees keys 0..=t - m + i.
        let mask: Vec<f32> = (0..m * t)
            .map(|x| if x % t <= t - m + x / t { 0.0 } else { -1e9 })
            .collect();
        let tv =
            |data: &[f32], shape: &[usize]| Tensor::from_shape(shape, data).unwrap().into_tvalue();
        let op = Attention { scale: 0.3 };
        let out = op
            .eval(
                &EvalContext::out_of_plan(),
                tvec!(
                    tv(&q, &[1, heads, m, d]),
                    tv(&k, &[1, heads, t, d]),
                    tv(&v, &[1, heads, t, d]),
                    tv(&mask, &[m, t])
                ),
            )
            .unwrap();
        let view = out[0].try_as_plain_ram().unwrap();
        let got: &[f32] = view.as_slice().unwrap();
        for h in 0..heads {
            let expected = reference(
                &q[h * m * d..],
                &k[h * t * d..],
                &v[h * t * d..],
                &mask,
                m,
                t,
                d,
                0.3,
            );
            for (a, b) in got[h * m * d..(h + 1) * m * d].iter().zip(&expected) {
                assert!((a - b).abs() < 1e-5, "head {h}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn broadcast_strides_follow_numpy() {
        assert_eq!(
            broadcast_strides(&[5, 9], &[1, 3, 5, 9]).unwrap(),
            vec![0, 0, 9, 1]
        );
        assert_eq!(
            broadcast_strides(&[1, 1, 9], &[2, 5, 9]).unwrap(),
            vec![0, 0, 1]
        );
        assert!(broadcast_strides(&[4, 9], &[1, 3, 5, 9]).is_err());
    }
}
