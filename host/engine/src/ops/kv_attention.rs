//! `SlmKvAttention`: fused attention that keeps its layer's KV cache in place
//! ([`crate::onnx::kv_cache`] builds it from an export's `Concat`s and attention).
//!
//! In a session, the cache lives in the op's state ([`KvCache`]), in pages of [`PAGE`] tokens:
//! a step writes its keys and values where the cache ends, and attention reads them there, a page
//! holding four of the attention kernel's chunks of keys. Nothing is copied per step, where `Concat` copied
//! the whole cache, every layer, every token. A [`crate::KvSnapshot`] shares the pages; a write
//! into a page that a snapshot shares copies that page first (copy-on-write, at most one page per
//! step), so a snapshot never changes and a session continuing after one copies almost nothing.
//!
//! Inputs `q [1, H, M, D]`, `past_k [1, H, P, W]`, `k [1, H, S, D]`, `past_v [1, H, P, W]`,
//! `v [1, H, S, Dv]`, `mask` (broadcast to `[1, H, M, P + S]`); outputs the attention `[1, H, M,
//! Dv]` and `present_k`, `present_v` (`[1, H, P + S, W]`). W is 0 in a session: the past inputs
//! carry only the cached length P, and the cache is the state's. A stateless call passes the
//! whole cache (W = D) and gets it back whole, concatenated, the state untouched.

use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::LaneId;
use tract_onnx::tract_hir::internal::*;

use super::attention::{
    attend_all, attend_heads, broadcast_strides, ContiguousHeads, Heads, KvChunks,
};
use super::{KV_ATTENTION, LAYER, SCALE};
use crate::kernels::attention::{Stored, KEY_CHUNK};
use crate::onnx::graph::attr;
use half::f16;
use half::slice::HalfFloatSliceExt;

pub(super) fn build(
    _ctx: &ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let scale = attr(node, SCALE)
        .map(|a| a.f)
        .context("SlmKvAttention without a scale")?;
    let layer = attr(node, LAYER)
        .and_then(|a| usize::try_from(a.i).ok())
        .context("SlmKvAttention without a layer")?;
    Ok((expand(KvAttention { scale, layer }), vec![]))
}

#[derive(Debug, Clone, PartialEq)]
pub struct KvAttention {
    pub scale: f32,
    /// The decoder layer whose cache this is (`past_key_values.{layer}.*`).
    pub layer: usize,
}

impl Eq for KvAttention {}

/// Tokens per page of a session's KV cache: four of the attention kernel's chunks of keys. (Pages
/// of one chunk made a 2,000-token decode step's attention 17% slower than one buffer per head,
/// its keys read 16 KiB at a time; four chunks bring that to ~5%. A copy-on-write copies one page.)
pub(crate) const PAGE: usize = 4 * KEY_CHUNK;

/// [`PAGE`] tokens of every head, as float16: keys `[H, PAGE, D]`, values `[H, PAGE, Dv]`.
#[derive(Debug, Clone)]
struct Page {
    keys: Vec<f16>,
    values: Vec<f16>,
}

impl Page {
    fn new(heads: usize, d: usize, dv: usize) -> Arc<Page> {
        Arc::new(Page {
            keys: vec![f16::ZERO; heads * PAGE * d],
            values: vec![f16::ZERO; heads * PAGE * dv],
        })
    }
}

/// One layer's KV cache in a session: `len` tokens in pages, so a step writes its tokens in place
/// (a new page when the last is full) and attention reads each page's keys of a head
/// contiguously. A page that a snapshot shares is copied before it is written.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pages: Vec<Arc<Page>>,
    pub(crate) len: usize,
}

impl KvCache {
    /// Allocates the pages for `tokens` tokens of `heads` heads `d` and `dv` wide now (a prompt's,
    /// before its chunks run), so a long prompt's pages lie together rather than between its
    /// chunks' temporaries, where they would pin freed memory (a 2,000-token prompt peaked
    /// 100 MB higher).
    pub(crate) fn reserve(&mut self, tokens: usize, heads: usize, d: usize, dv: usize) {
        let pages = tokens.div_ceil(PAGE);
        if self.pages.len() < pages {
            self.pages.resize_with(pages, || Page::new(heads, d, dv));
        }
    }

    /// Keeps the first `len` tokens (and the pages that hold them).
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        self.pages.truncate(self.len.div_ceil(PAGE));
    }

    /// Bytes held by the pages (a last page's spare rows included).
    pub(crate) fn bytes(&self) -> usize {
        let floats: usize = self
            .pages
            .iter()
            .map(|p| p.keys.len() + p.values.len())
            .sum();
        floats * std::mem::size_of::<f16>()
    }

    /// Writes `keys` and `values` (`[heads, s, d]` and `[heads, s, dv]`) after the cached tokens.
    fn append(
        &mut self,
        keys: &[f32],
        values: &[f32],
        heads: usize,
        d: usize,
        dv: usize,
    ) -> TractResult<()> {
        let s = keys.len().checked_div(heads * d).unwrap_or(0);
        for i in 0..s {
            let (p, slot) = ((self.len + i) / PAGE, (self.len + i) % PAGE);
            if p == self.pages.len() {
                self.pages.push(Page::new(heads, d, dv));
            }
            // Copies the page first if a snapshot shares it.
            let page = Arc::make_mut(&mut self.pages[p]);
            ensure!(
                page.keys.len() == heads * PAGE * d && page.values.len() == heads * PAGE * dv,
                "the KV cache holds heads of another shape than {heads} x ({d}, {dv})"
            );
            for h in 0..heads {
                page.keys[(h * PAGE + slot) * d..][..d]
                    .convert_from_f32_slice(&keys[(h * s + i) * d..][..d]);
                page.values[(h * PAGE + slot) * dv..][..dv]
                    .convert_from_f32_slice(&values[(h * s + i) * dv..][..dv]);
            }
        }
        self.len += s;
        Ok(())
    }
}

/// The caches of the sequences in one packed run ([`crate::batching`]): sequence `i` is the next
/// `rows` rows of the run (after sequence `i - 1`'s) and continues `cache`.
#[derive(Debug, Clone, Default)]
pub(crate) struct PackedCaches(pub(crate) Vec<PackedSequence>);

#[derive(Debug, Clone, Default)]
pub(crate) struct PackedSequence {
    pub(crate) cache: KvCache,
    pub(crate) rows: usize,
}

/// One sequence's share of a packed run, as a run of it alone would see it.
struct SequenceRows {
    /// Its query rows, `[H, rep * rows, D]`.
    q: Vec<f32>,
    /// Its rows of the mask over its own keys, `[H or 1, rep * rows, keys]`.
    mask: Vec<f32>,
    /// The stride of `mask` between heads (0: one for all).
    mask_head: usize,
    /// Its first row in the run.
    first: usize,
    rows: usize,
    /// Its cache's tokens, its new ones included.
    keys: usize,
}

/// A cache's pages as an attention's chunks (heads `d` and `dv` wide).
struct Paged<'a> {
    cache: &'a KvCache,
    d: usize,
    dv: usize,
}

impl Paged<'_> {
    /// Tokens `c * KEY_CHUNK..` of head `h`, one chunk of a page: its page, where in the page
    /// its head's rows start and how many there are.
    fn locate(&self, h: usize, c: usize) -> (&Page, usize, usize) {
        let (page, first) = (c * KEY_CHUNK / PAGE, c * KEY_CHUNK % PAGE);
        let n = KEY_CHUNK.min(self.cache.len - c * KEY_CHUNK);
        (&self.cache.pages[page], h * PAGE + first, n)
    }
}

impl KvChunks for Paged<'_> {
    fn keys(&self, h: usize, c: usize) -> Stored<'_> {
        let (page, row, n) = self.locate(h, c);
        Stored::F16(&page.keys[row * self.d..][..n * self.d])
    }
    fn values(&self, h: usize, c: usize) -> Stored<'_> {
        let (page, row, n) = self.locate(h, c);
        Stored::F16(&page.values[row * self.dv..][..n * self.dv])
    }
}

/// The data of `xs` in memory (for [`f32_slices`]).
fn plain_views<const N: usize>(xs: [&TValue; N]) -> TractResult<[PlainView<'_>; N]> {
    let views: Vec<PlainView> = xs
        .iter()
        .map(|x| x.try_as_plain_ram())
        .collect::<TractResult<_>>()?;
    Ok(views
        .try_into()
        .unwrap_or_else(|_| unreachable!("one view per tensor")))
}

/// The f32 elements of each view.
fn f32_slices<'a, const N: usize>(views: &'a [PlainView<'_>; N]) -> TractResult<[&'a [f32]; N]> {
    let mut out: [&[f32]; N] = [&[]; N];
    for (o, v) in out.iter_mut().zip(views) {
        *o = v.as_slice()?;
    }
    Ok(out)
}

/// `[1, H, P, W]` past and `[1, H, S, W]` new, concatenated on the token axis.
fn concat(past: &[f32], new: &[f32], heads: usize, p: usize, s: usize, width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(heads * (p + s) * width);
    for h in 0..heads {
        out.extend_from_slice(&past[h * p * width..][..p * width]);
        out.extend_from_slice(&new[h * s * width..][..s * width]);
    }
    out
}

impl KvAttention {
    fn run(&self, cache: Option<&mut KvCache>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let [q, past_k, k, past_v, v, mask] = &inputs[..] else {
            bail!("{KV_ATTENTION} takes 6 inputs, got {}", inputs.len());
        };
        for (name, x) in [
            ("q", q),
            ("past_k", past_k),
            ("k", k),
            ("past_v", past_v),
            ("v", v),
        ] {
            ensure!(
                x.rank() == 4 && x.shape()[0] == 1,
                "{KV_ATTENTION}: {name} {:?} is not [1, heads, tokens, width]",
                x.shape()
            );
        }
        let (heads, m, d) = (q.shape()[1], q.shape()[2], q.shape()[3]);
        let (s, dv, p, width) = (
            k.shape()[2],
            v.shape()[3],
            past_k.shape()[2],
            past_k.shape()[3],
        );
        let t = p + s;
        let same = |x: &TValue, dims: [usize; 3]| x.shape()[1..] == dims;
        ensure!(
            same(k, [heads, s, d])
                && same(v, [heads, s, dv])
                && past_v.shape()[1..3] == [heads, p]
                && past_k.shape()[1] == heads,
            "{KV_ATTENTION}: q {:?}, past_k {:?}, k {:?}, past_v {:?}, v {:?}",
            q.shape(),
            past_k.shape(),
            k.shape(),
            past_v.shape(),
            v.shape()
        );
        let mask_strides = broadcast_strides(mask.shape(), &[1, heads, m, t])?;
        let views = plain_views([q, k, v, mask])?;
        let [qd, kd, vd, maskd] = f32_slices(&views)?;
        let attend = |chunks: &dyn KvChunks| {
            attend_heads(&Heads {
                q: qd,
                heads,
                m,
                d,
                chunks,
                t,
                dv,
                mask: maskd,
                mask_head: &|h| h * mask_strides[1],
                mask_row: mask_strides[2],
                mask_col: mask_strides[3],
                scale: self.scale,
            })
        };
        let out = |data: Vec<f32>| Tensor::from_shape(&[1, heads, m, dv], &data);

        if width == 0 && past_v.shape()[3] == 0 {
            let cache = cache.context("an in-place KV cache needs a session")?;
            ensure!(
                p == cache.len,
                "layer {}: the KV cache holds {} tokens, the step continues at {p}",
                self.layer,
                cache.len
            );
            cache.append(kd, vd, heads, d, dv)?;
            let result = attend(&Paged { cache, d, dv });
            let empty = Tensor::zero::<f32>(&[1, heads, t, 0])?.into_tvalue();
            return Ok(tvec!(out(result)?.into_tvalue(), empty.clone(), empty));
        }

        ensure!(
            width == d && past_v.shape()[3] == dv,
            "{KV_ATTENTION}: past keys and values are {width} and {} wide, the heads {d} and {dv}",
            past_v.shape()[3]
        );
        let past = [past_k.try_as_plain_ram()?, past_v.try_as_plain_ram()?];
        // The cache holds float16 values, in a session and here alike (the same results).
        let rounded =
            |x: &[f32]| -> Vec<f32> { x.iter().map(|&x| f16::from_f32(x).to_f32()).collect() };
        let (kd, vd) = (rounded(kd), rounded(vd));
        let present_k = concat(past[0].as_slice()?, &kd, heads, p, s, d);
        let present_v = concat(past[1].as_slice()?, &vd, heads, p, s, dv);
        let kv = ContiguousHeads {
            keys: &present_k,
            key_head: &|h| h * t * d,
            values: &present_v,
            value_head: &|h| h * t * dv,
            t,
            d,
            dv,
        };
        let result = attend(&kv);
        Ok(tvec!(
            out(result)?.into_tvalue(),
            Tensor::from_shape(&[1, heads, t, d], &present_k)?.into_tvalue(),
            Tensor::from_shape(&[1, heads, t, dv], &present_v)?.into_tvalue()
        ))
    }
}

impl KvAttention {
    /// A packed run: each sequence's rows of `q`, `k`, `v` and the mask, against its own cache.
    /// Each sequence's attention is the very call a run of that sequence alone makes (the same
    /// rows, keys and mask values), so it gives the same bits. The past inputs are ignored: the
    /// mask's width is the run's longest context.
    fn run_packed(
        &self,
        sequences: &mut [PackedSequence],
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        let [q, _, k, _, v, mask] = &inputs[..] else {
            bail!("{KV_ATTENTION} takes 6 inputs, got {}", inputs.len());
        };
        ensure!(
            q.rank() == 4 && k.rank() == 4 && v.rank() == 4,
            "{KV_ATTENTION}: q {:?}, k {:?}, v {:?} are not [1, heads, tokens, width]",
            q.shape(),
            k.shape(),
            v.shape()
        );
        let (heads, m, d) = (q.shape()[1], q.shape()[2], q.shape()[3]);
        let (n, dv) = (k.shape()[2], v.shape()[3]);
        let total: usize = sequences.iter().map(|s| s.rows).sum();
        ensure!(
            n > 0
                && total == n
                && m % n == 0
                && k.shape()[1..] == [heads, n, d]
                && v.shape()[1..3] == [heads, n],
            "{KV_ATTENTION}: a packed run of {total} rows got q {:?}, k {:?}, v {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        );
        // Query rows are (query head in the group, token): `rep` groups of n rows per KV head.
        let rep = m / n;
        let width = *mask.shape().last().unwrap_or(&0);
        let ms = broadcast_strides(mask.shape(), &[1, heads, m, width])?;
        let views = plain_views([q, k, v, mask])?;
        let [qd, kd, vd, maskd] = f32_slices(&views)?;
        // Each sequence's rows, head by head: keys and values [H, s, *] (appended to its cache),
        // queries and mask rows [H, rep * s, *] (the mask's rows for one head if it is shared).
        let head_masks = if ms[1] == 0 { 1 } else { heads };
        let mut rows_of = Vec::with_capacity(sequences.len());
        let mut first = 0;
        for seq in sequences.iter_mut() {
            let (s, t) = (seq.rows, seq.cache.len + seq.rows);
            ensure!(
                t <= width,
                "layer {}: a packed sequence at {t} tokens, the mask covers {width}",
                self.layer
            );
            let rows = |x: &[f32], w: usize, per_head: usize, groups: usize| {
                let mut out = Vec::with_capacity(heads * groups * s * w);
                for h in 0..heads {
                    for g in 0..groups {
                        out.extend_from_slice(&x[(h * per_head + g * n + first) * w..][..s * w]);
                    }
                }
                out
            };
            seq.cache
                .append(&rows(kd, d, n, 1), &rows(vd, dv, n, 1), heads, d, dv)?;
            let mut mask = Vec::with_capacity(head_masks * rep * s * t);
            for h in 0..head_masks {
                for g in 0..rep {
                    for i in 0..s {
                        let row = h * ms[1] + (g * n + first + i) * ms[2];
                        mask.extend((0..t).map(|c| maskd[row + c * ms[3]]));
                    }
                }
            }
            let mask_head = if head_masks == 1 { 0 } else { rep * s * t };
            rows_of.push(SequenceRows {
                q: rows(qd, d, m, rep),
                mask,
                mask_head,
                first,
                rows: s,
                keys: t,
            });
            first += s;
        }
        let mask_heads: Vec<_> = rows_of
            .iter()
            .map(|r| move |h: usize| h * r.mask_head)
            .collect();
        let paged: Vec<Paged> = sequences
            .iter()
            .map(|seq| Paged {
                cache: &seq.cache,
                d,
                dv,
            })
            .collect();
        let attentions: Vec<Heads> = rows_of
            .iter()
            .zip(&paged)
            .zip(&mask_heads)
            .map(|((r, chunks), mask_head)| Heads {
                q: &r.q,
                heads,
                m: rep * r.rows,
                d,
                chunks,
                t: r.keys,
                dv,
                mask: &r.mask,
                mask_head,
                mask_row: r.keys,
                mask_col: 1,
                scale: self.scale,
            })
            .collect();
        // Back to the run's row order: (head, group, row of the run).
        let mut out = vec![0f32; heads * m * dv];
        for (result, r) in attend_all(&attentions).iter().zip(&rows_of) {
            let s = r.rows;
            for h in 0..heads {
                for g in 0..rep {
                    let from = (h * rep + g) * s * dv;
                    let to = (h * m + g * n + r.first) * dv;
                    out[to..][..s * dv].copy_from_slice(&result[from..][..s * dv]);
                }
            }
        }
        let empty = Tensor::zero::<f32>(&[1, heads, width, 0])?.into_tvalue();
        Ok(tvec!(
            Tensor::from_shape(&[1, heads, m, dv], &out)?.into_tvalue(),
            empty.clone(),
            empty
        ))
    }
}

impl Expansion for KvAttention {
    fn name(&self) -> StaticName {
        KV_ATTENTION.into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(3)
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 6)?;
        check_output_arity(outputs, 3)?;
        for x in inputs.iter().chain(outputs) {
            s.equals(&x.datum_type, f32::datum_type())?;
        }
        for x in inputs[..5].iter().chain(outputs) {
            s.equals(&x.rank, 4)?;
        }
        let (q, past_k, k, past_v, v) =
            (&inputs[0], &inputs[1], &inputs[2], &inputs[3], &inputs[4]);
        for ax in 0..3 {
            s.equals(&outputs[0].shape[ax], &q.shape[ax])?;
        }
        s.equals(&outputs[0].shape[3], &v.shape[3])?;
        for (present, past, new) in [(&outputs[1], past_k, k), (&outputs[2], past_v, v)] {
            for ax in [0, 1, 3] {
                s.equals(&present.shape[ax], &past.shape[ax])?;
            }
            s.equals(&present.shape[2], past.shape[2].bex() + new.shape[2].bex())?;
        }
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.clone(), inputs)
    }
}

impl Op for KvAttention {
    fn name(&self) -> StaticName {
        KV_ATTENTION.into()
    }

    op_as_typed_op!();
}

impl EvalOp for KvAttention {
    not_out_of_plan!();

    /// Outside a session (no state): stateless calls only.
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.run(None, inputs)
    }

    fn state(&self, _ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        Ok(Some(Box::new(KvCache::default())))
    }
}

impl OpState for KvCache {
    fn eval(
        &mut self,
        _ctx: &EvalContext,
        op: &dyn Op,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        let op = op
            .downcast_ref::<KvAttention>()
            .context("a KV cache state on another op")?;
        op.run(Some(self), inputs)
    }

    /// One cache, one stream: a laned (batched) runtime cannot share it.
    fn reset_lanes(&mut self, _lanes: &[LaneId]) -> TractResult<()> {
        bail!("{KV_ATTENTION} keeps one stream's KV cache")
    }
}

impl OpState for PackedCaches {
    fn eval(
        &mut self,
        _ctx: &EvalContext,
        op: &dyn Op,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        let op = op
            .downcast_ref::<KvAttention>()
            .context("packed KV caches on another op")?;
        op.run_packed(&mut self.0, inputs)
    }

    fn reset_lanes(&mut self, _lanes: &[LaneId]) -> TractResult<()> {
        bail!("{KV_ATTENTION} keeps its sequences' KV caches")
    }
}

impl TypedOp for KvAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 6, "{KV_ATTENTION} takes 6 inputs");
        let (q, past_k, k, past_v, v) = (inputs[0], inputs[1], inputs[2], inputs[3], inputs[4]);
        for x in [q, past_k, k, past_v, v] {
            ensure!(x.rank() == 4, "{KV_ATTENTION}: inputs of rank 4");
        }
        let mut out = q.shape.to_tvec();
        out[3] = v.shape[3].clone();
        let present = |past: &TypedFact, new: &TypedFact| {
            let mut shape = past.shape.to_tvec();
            shape[2] = past.shape[2].clone() + new.shape[2].clone();
            f32::fact(shape)
        };
        Ok(tvec!(
            f32::fact(out),
            present(past_k, k),
            present(past_v, v)
        ))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let rows: TDim = inputs[0].shape.iter().take(3).product();
        let keys = inputs[1].shape[2].clone() + inputs[2].shape[2].clone();
        let width = inputs[0].shape[3].clone() + inputs[4].shape[3].clone();
        Ok(tvec!((Cost::FMA(f32::datum_type()), rows * keys * width)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tv(data: &[f32], shape: &[usize]) -> TValue {
        Tensor::from_shape(shape, data).unwrap().into_tvalue()
    }

    fn values(t: &TValue) -> Vec<u32> {
        let view = t.try_as_plain_ram().unwrap();
        view.as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    /// Causal mask for `s` new tokens after `p` cached ones, `[s, p + s]`.
    fn causal(p: usize, s: usize) -> Vec<f32> {
        (0..s * (p + s))
            .map(|x| {
                if x % (p + s) <= p + x / (p + s) {
                    0.0
                } else {
                    -1e9
                }
            })
            .collect()
    }

    #[test]
    fn steps_in_place_equal_stateless_steps_and_survive_a_shared_buffer() {
        let (heads, d) = (2, 8);
        let op = KvAttention {
            scale: 0.35,
            layer: 0,
        };
        let val = |i: usize| (i * 7919 % 113) as f32 / 56.0 - 1.0;
        let mut cache = KvCache::default();
        let (mut past_k, mut past_v) = (vec![], vec![]);
        let mut p = 0;
        let mut seed = 0;
        let mut snapshot = None;
        // Prefill 5, then 1, 1, a page and 70 (into page 1), 1 token(s).
        for s in [5, 1, 1, PAGE + 70, 1] {
            let mut fresh = |n: usize| {
                seed += n;
                (0..n).map(|i| val(i + seed)).collect::<Vec<f32>>()
            };
            let (q, k, v) = (
                fresh(heads * s * d),
                fresh(heads * s * d),
                fresh(heads * s * d),
            );
            let mask = tv(&causal(p, s), &[s, p + s]);
            let new = |x: &[f32]| tv(x, &[1, heads, s, d]);
            let empty = tv(&[], &[1, heads, p, 0]);
            let stateful = OpState::eval(
                &mut cache,
                &EvalContext::out_of_plan(),
                &op,
                tvec!(
                    new(&q),
                    empty.clone(),
                    new(&k),
                    empty,
                    new(&v),
                    mask.clone()
                ),
            )
            .unwrap();
            let stateless = EvalOp::eval(
                &op,
                &EvalContext::out_of_plan(),
                tvec!(
                    new(&q),
                    tv(&past_k, &[1, heads, p, d]),
                    new(&k),
                    tv(&past_v, &[1, heads, p, d]),
                    new(&v),
                    mask
                ),
            )
            .unwrap();
            assert_eq!(values(&stateful[0]), values(&stateless[0]), "after {p}");
            assert_eq!(stateful[1].shape(), &[1, heads, p + s, 0]);
            past_k = stateless[1]
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<f32>()
                .unwrap()
                .to_vec();
            past_v = stateless[2]
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<f32>()
                .unwrap()
                .to_vec();
            p += s;
            assert_eq!(cache.len, p);
            if p == 6 {
                // A snapshot shares the buffers: the next steps copy before they write.
                snapshot = Some((cache.clone(), past_k.clone()));
            }
        }
        let (snap, snap_k) = snapshot.unwrap();
        let keys: Vec<f32> = (0..heads)
            .flat_map(|h| {
                let paged = Paged {
                    cache: &snap,
                    d,
                    dv: d,
                };
                (0..snap.len.div_ceil(KEY_CHUNK))
                    .flat_map(|c| widened(paged.keys(h, c)))
                    .collect::<Vec<f32>>()
            })
            .collect();
        assert_eq!(keys, snap_k, "the snapshot's keys changed");
    }

    /// A chunk of the cache as f32.
    fn widened(chunk: Stored) -> Vec<f32> {
        match chunk {
            Stored::F32(x) => x.to_vec(),
            Stored::F16(h) => h.iter().map(|h| h.to_f32()).collect(),
        }
    }

    #[test]
    fn a_step_after_a_snapshot_copies_only_the_page_it_writes() {
        let (heads, d) = (3, 4);
        let tokens = |n: usize, x: f32| vec![x; heads * n * d];
        let mut cache = KvCache::default();
        cache
            .append(
                &tokens(2 * PAGE + 2, 1.0),
                &tokens(2 * PAGE + 2, 2.0),
                heads,
                d,
                d,
            )
            .unwrap();
        let snapshot = cache.clone();
        cache
            .append(&tokens(1, 3.0), &tokens(1, 4.0), heads, d, d)
            .unwrap();
        let shared: Vec<bool> = (0..3)
            .map(|p| Arc::ptr_eq(&cache.pages[p], &snapshot.pages[p]))
            .collect();
        assert_eq!(shared, [true, true, false], "full pages stay shared");
        let chunk = 2 * PAGE / KEY_CHUNK;
        let last = |c: &KvCache| widened(Paged { cache: c, d, dv: d }.keys(2, chunk));
        assert_eq!(
            last(&snapshot),
            vec![1.0; 2 * d],
            "the snapshot keeps its tokens"
        );
        assert_eq!(last(&cache)[2 * d..], [3.0; 4]);
        // A rewind into a shared page copies that page and leaves the snapshot's alone.
        cache.truncate(10);
        assert_eq!(cache.pages.len(), 1);
        cache
            .append(&tokens(1, 5.0), &tokens(1, 6.0), heads, d, d)
            .unwrap();
        assert!(!Arc::ptr_eq(&cache.pages[0], &snapshot.pages[0]));
        let first = widened(
            Paged {
                cache: &snapshot,
                d,
                dv: d,
            }
            .keys(0, 0),
        );
        assert_eq!(first[10 * d], 1.0);
        // Pages are of one shape: a step with other heads is an error, not a corrupt cache.
        assert!(cache.append(&[0.0; 8], &[0.0; 8], 1, 8, 8).is_err());
    }

    #[test]
    fn a_prompt_writes_into_the_pages_reserved_for_it() {
        let (heads, d) = (2, 4);
        let tokens = |n: usize| vec![1.0; heads * n * d];
        let mut cache = KvCache::default();
        let prompt = 3 * PAGE + 8;
        cache.reserve(prompt, heads, d, d);
        assert_eq!(cache.pages.len(), 4);
        let reserved: Vec<*const Page> = cache.pages.iter().map(Arc::as_ptr).collect();
        for _ in 0..2 {
            let half = tokens(prompt / 2);
            cache.append(&half, &half, heads, d, d).unwrap();
        }
        let used: Vec<*const Page> = cache.pages.iter().map(Arc::as_ptr).collect();
        assert_eq!(used, reserved, "the chunks allocated no pages of their own");
        assert_eq!(cache.len, prompt);
        // A later step past the reservation takes a new page; a rewind drops unused ones.
        cache
            .append(&tokens(PAGE), &tokens(PAGE), heads, d, d)
            .unwrap();
        assert_eq!(cache.pages.len(), 5);
        cache.truncate(64);
        assert_eq!(cache.pages.len(), 1);
    }

    #[test]
    fn a_session_cache_that_lost_its_place_is_an_error() {
        let op = KvAttention {
            scale: 1.0,
            layer: 3,
        };
        let mut cache = KvCache::default();
        let x = tv(&[0.5; 4], &[1, 1, 1, 4]);
        let past = tv(&[], &[1, 1, 2, 0]);
        let err = OpState::eval(
            &mut cache,
            &EvalContext::out_of_plan(),
            &op,
            tvec!(
                x.clone(),
                past.clone(),
                x.clone(),
                past,
                x,
                tv(&[0.0; 3], &[1, 3])
            ),
        )
        .unwrap_err();
        assert!(format!("{err}").contains("layer 3"), "{err}");
    }

    #[test]
    fn a_packed_run_gives_each_sequence_what_it_gets_alone() {
        // 2 KV heads, 2 query rows per head and token (grouped queries), a mask that differs by
        // head; sequence A continues 5 cached tokens with 1, B 300 (past a page) with 3.
        let (heads, rep, d) = (2, 2, 8);
        let op = KvAttention {
            scale: 0.35,
            layer: 0,
        };
        let val = |i: usize| (i * 7919 % 113) as f32 / 56.0 - 1.0;
        let ctx = EvalContext::out_of_plan();
        // Head 1 never sees key 0; both are causal.
        let mask_value = |h: usize, p: usize, i: usize, c: usize| {
            if c <= p + i && !(h == 1 && c == 0) {
                0.0
            } else {
                -1e9
            }
        };
        let mask = |p: usize, s: usize, width: usize| -> Vec<f32> {
            let mut out = vec![];
            for h in 0..heads {
                for _g in 0..rep {
                    for i in 0..s {
                        out.extend((0..width).map(|c| mask_value(h, p, i, c)));
                    }
                }
            }
            out
        };
        let seqs = [(5, 1, 11), (300, 3, 23)];
        let mut caches = vec![];
        let mut alone = vec![];
        let mut news = vec![];
        for &(p, s, seed) in &seqs {
            let x = |n: usize, salt: usize| -> Vec<f32> {
                (0..n).map(|i| val(i * 3 + seed * 1000 + salt)).collect()
            };
            let mut cache = KvCache::default();
            let fill = |n: usize| tv(&x(heads * n * d, 1), &[1, heads, n, d]);
            let empty = tv(&[], &[1, heads, 0, 0]);
            let q = tv(&x(heads * rep * p * d, 2), &[1, heads, rep * p, d]);
            let m = tv(&mask(0, p, p), &[1, heads, rep * p, p]);
            OpState::eval(
                &mut cache,
                &ctx,
                &op,
                tvec!(q, empty.clone(), fill(p), empty.clone(), fill(p), m),
            )
            .unwrap();
            let (q, k, v) = (
                x(heads * rep * s * d, 3),
                x(heads * s * d, 4),
                x(heads * s * d, 5),
            );
            let mut own = cache.clone();
            let out = OpState::eval(
                &mut own,
                &ctx,
                &op,
                tvec!(
                    tv(&q, &[1, heads, rep * s, d]),
                    tv(&[], &[1, heads, p, 0]),
                    tv(&k, &[1, heads, s, d]),
                    tv(&[], &[1, heads, p, 0]),
                    tv(&v, &[1, heads, s, d]),
                    tv(&mask(p, s, p + s), &[1, heads, rep * s, p + s])
                ),
            )
            .unwrap();
            alone.push(values(&out[0]));
            caches.push(cache);
            news.push((q, k, v));
        }

        // The run's rows: A's token then B's 3, per head and group.
        let n: usize = seqs.iter().map(|s| s.1).sum();
        let width = seqs.iter().map(|&(p, s, _)| p + s).max().unwrap();
        let (mut q, mut k, mut v, mut m) = (vec![], vec![], vec![], vec![]);
        for h in 0..heads {
            for (j, &(_, s, _)) in seqs.iter().enumerate() {
                k.extend_from_slice(&news[j].1[h * s * d..][..s * d]);
                v.extend_from_slice(&news[j].2[h * s * d..][..s * d]);
            }
            for g in 0..rep {
                for (j, &(p, s, _)) in seqs.iter().enumerate() {
                    q.extend_from_slice(&news[j].0[(h * rep + g) * s * d..][..s * d]);
                    for i in 0..s {
                        m.extend((0..width).map(|c| mask_value(h, p, i, c)));
                    }
                }
            }
        }
        let mut packed = PackedCaches(
            caches
                .into_iter()
                .zip(&seqs)
                .map(|(cache, &(_, rows, _))| PackedSequence { cache, rows })
                .collect(),
        );
        let empty = tv(&[], &[1, heads, width - n, 0]);
        let out = OpState::eval(
            &mut packed,
            &ctx,
            &op,
            tvec!(
                tv(&q, &[1, heads, rep * n, d]),
                empty.clone(),
                tv(&k, &[1, heads, n, d]),
                empty,
                tv(&v, &[1, heads, n, d]),
                tv(&m, &[1, heads, rep * n, width])
            ),
        )
        .unwrap();
        let out = values(&out[0]);
        let mut first = 0;
        for (j, &(p, s, _)) in seqs.iter().enumerate() {
            for h in 0..heads {
                for g in 0..rep {
                    let got = &out[(h * rep * n + g * n + first) * d..][..s * d];
                    let want = &alone[j][(h * rep + g) * s * d..][..s * d];
                    assert_eq!(got, want, "sequence {j}, head {h}, group {g}");
                }
            }
            assert_eq!(packed.0[j].cache.len, p + s);
            first += s;
        }
    }
}
