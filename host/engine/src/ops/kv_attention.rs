//! `SlmKvAttention`: fused attention that keeps its layer's KV cache in place
//! ([`crate::onnx::kv_cache`] builds it from an export's `Concat`s and attention).
//!
//! In a session, the cache lives in the op's state ([`KvCache`]), token-major with capacity to
//! spare: a step appends its keys and values where the cache ends, and attention reads them
//! there. Nothing is copied per step, where `Concat` copied the whole cache, every layer, every
//! token. A [`crate::KvSnapshot`] shares the buffers; the next write to a shared buffer copies
//! it first (copy-on-write), so a snapshot never changes.
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

use super::attention::{attend_heads, broadcast_strides, Heads};
use super::{KV_ATTENTION, LAYER, SCALE};
use crate::onnx::graph::attr;

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

/// One layer's KV cache in a session: `len` tokens in buffers of `cap` tokens per head
/// (`[H, cap, D]`), so a step writes its tokens in place and attention reads each head's keys
/// contiguously. Shared buffers (a snapshot holds them) are copied before they are written.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    keys: Arc<Vec<f32>>,
    values: Arc<Vec<f32>>,
    cap: usize,
    pub(crate) len: usize,
    /// Tokens the cache is about to hold (a prompt's length, before its chunks run): the first
    /// growth makes room for them all, so a long prompt allocates its cache once.
    expect: usize,
}

impl KvCache {
    /// Makes the next growth room for `tokens` tokens at least.
    pub(crate) fn expect(&mut self, tokens: usize) {
        self.expect = tokens;
    }

    /// Keeps the first `len` tokens. (The rows after them are overwritten by the next write, or
    /// left behind when a shared buffer is copied.)
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes held by the buffers (spare capacity included).
    pub(crate) fn bytes(&self) -> usize {
        (self.keys.len() + self.values.len()) * std::mem::size_of::<f32>()
    }

    /// Writes `keys` and `values` (`[heads, s, d]` and `[heads, s, dv]`) after the cached tokens:
    /// in place when the buffers are this cache's own and have room, else into new buffers
    /// (growing by an eighth and 64 tokens: few copies over a generation, little unused memory
    /// at long contexts, where the cache is most of it).
    fn append(&mut self, keys: &[f32], values: &[f32], heads: usize, d: usize, dv: usize) {
        let s = keys.len().checked_div(heads * d).unwrap_or(0);
        let need = self.len + s;
        let own =
            Arc::get_mut(&mut self.keys).is_some() && Arc::get_mut(&mut self.values).is_some();
        let fits =
            self.keys.len() == heads * self.cap * d && self.values.len() == heads * self.cap * dv;
        if !own || !fits || need > self.cap {
            let cap = if fits && need <= self.cap {
                self.cap
            } else {
                need.max(self.expect) + need / 8 + 64
            };
            let old = self.cap;
            let len = if fits { self.len } else { 0 };
            self.keys = Arc::new(relayout(&self.keys, old, len, cap, heads, d));
            self.values = Arc::new(relayout(&self.values, old, len, cap, heads, dv));
            self.cap = cap;
            self.len = len;
        }
        let (cap, len) = (self.cap, self.len);
        for (buf, new, width) in [(&mut self.keys, keys, d), (&mut self.values, values, dv)] {
            let buf = Arc::get_mut(buf).expect("made unique above");
            for h in 0..heads {
                buf[(h * cap + len) * width..][..s * width]
                    .copy_from_slice(&new[h * s * width..][..s * width]);
            }
        }
        self.len = need;
    }
}

/// The first `len` tokens of each head of `old` (`[heads, old_cap, width]`) in a new buffer of
/// `cap` tokens per head.
fn relayout(
    old: &[f32],
    old_cap: usize,
    len: usize,
    cap: usize,
    heads: usize,
    width: usize,
) -> Vec<f32> {
    let mut buf = vec![0f32; heads * cap * width];
    for h in 0..heads {
        buf[h * cap * width..][..len * width]
            .copy_from_slice(&old[h * old_cap * width..][..len * width]);
    }
    buf
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
        let views = [
            q.try_as_plain_ram()?,
            k.try_as_plain_ram()?,
            v.try_as_plain_ram()?,
            mask.try_as_plain_ram()?,
        ];
        let (qd, kd, vd, maskd): (&[f32], &[f32], &[f32], &[f32]) = (
            views[0].as_slice()?,
            views[1].as_slice()?,
            views[2].as_slice()?,
            views[3].as_slice()?,
        );
        let attend = |keys: &[f32], values: &[f32], key_head: usize, value_head: usize| {
            attend_heads(&Heads {
                q: qd,
                heads,
                m,
                d,
                keys,
                key_head: &|h| h * key_head,
                values,
                value_head: &|h| h * value_head,
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
            cache.append(kd, vd, heads, d, dv);
            let cap = cache.cap;
            let result = attend(&cache.keys, &cache.values, cap * d, cap * dv);
            let empty = Tensor::zero::<f32>(&[1, heads, t, 0])?.into_tvalue();
            return Ok(tvec!(out(result)?.into_tvalue(), empty.clone(), empty));
        }

        ensure!(
            width == d && past_v.shape()[3] == dv,
            "{KV_ATTENTION}: past keys and values are {width} and {} wide, the heads {d} and {dv}",
            past_v.shape()[3]
        );
        let past = [past_k.try_as_plain_ram()?, past_v.try_as_plain_ram()?];
        let present_k = concat(past[0].as_slice()?, kd, heads, p, s, d);
        let present_v = concat(past[1].as_slice()?, vd, heads, p, s, dv);
        let result = attend(&present_k, &present_v, t * d, t * dv);
        Ok(tvec!(
            out(result)?.into_tvalue(),
            Tensor::from_shape(&[1, heads, t, d], &present_k)?.into_tvalue(),
            Tensor::from_shape(&[1, heads, t, dv], &present_v)?.into_tvalue()
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
        // Prefill 5, then 1, 1, 70 (past the first capacity, 69), 1 token(s).
        for s in [5, 1, 1, 70, 1] {
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
            .flat_map(|h| snap.keys[h * snap.cap * d..][..snap.len * d].to_vec())
            .collect();
        assert_eq!(keys, snap_k, "the snapshot's keys changed");
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
}
