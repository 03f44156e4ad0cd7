//! `SlmQMatMul`: `y = x @ W`, x f32 `[.., K]`, y f32 `[.., N]`, W quantized ([`Packed`]).

use tract_onnx::model::ParsingContext;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use super::{pending_weights, Inferred, Io, Packed, Rules, QMATMUL};

pub(super) fn build(
    _ctx: &ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let w = pending_weights(node)?;
    Ok((expand(Inferred(QMatMul { w })), vec![]))
}

/// `y = x @ dequant(W)`: x f32 `[.., K]`, y f32 `[.., N]`, W int8 with per-channel scales, 4-bit
/// blocks or int8 blocks.
#[derive(Clone, PartialEq, Eq)]
pub struct QMatMul {
    pub w: Packed,
}

impl QMatMul {
    /// 4-bit blocks, float16 or f32 scales.
    pub fn is_q4_1(&self) -> bool {
        matches!(self.w, Packed::Q4_1(_) | Packed::Q4F32(_))
    }

    /// int8 blocks (Q8_0, Q5_0, Q6_K), held in 8 or 5 bits.
    pub fn is_q8_blocks(&self) -> bool {
        matches!(self.w, Packed::Q8Blocks(_) | Packed::Q5Blocks(_))
    }

    /// f32 weights (float matrices), summed in one order on every target.
    pub fn is_f32(&self) -> bool {
        matches!(self.w, Packed::F32(_))
    }

    pub fn is_q8_head(&self) -> bool {
        matches!(self.w, Packed::Q8Head(_))
    }
}

impl std::fmt::Debug for QMatMul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatMul({:?})", self.w)
    }
}

impl Rules for QMatMul {
    const INPUTS: usize = 1;

    fn rules<'r>(&'r self, s: &mut Solver<'r>, io: Io<'r>) -> InferenceResult {
        let Io { inputs, outputs } = io;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].rank, &inputs[0].rank)?;
        let (k, n) = (self.w.k().to_dim(), self.w.n().to_dim());
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            for ax in 0..rank - 1 {
                s.equals(&outputs[0].shape[ax], &inputs[0].shape[ax])?;
            }
            s.equals(&inputs[0].shape[rank - 1], k.clone())?;
            s.equals(&outputs[0].shape[rank - 1], n.clone())
        })?;
        Ok(())
    }
}

impl Op for QMatMul {
    fn name(&self) -> StaticName {
        QMATMUL.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.w)])
    }

    op_as_typed_op!();
}

impl EvalOp for QMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let shape = x.shape();
        let (k, n) = (self.w.k(), self.w.n());
        ensure!(
            shape.last() == Some(&k),
            "{QMATMUL}: input shape {shape:?}, K={k}"
        );
        let m = x.len() / k;
        let mut out_shape: TVec<usize> = shape.into();
        *out_shape.last_mut().unwrap() = n;
        let plain = x.try_as_plain_ram()?;
        let xs: &[f32] = plain.as_slice()?;
        // SAFETY: f32 has no invalid bit patterns, and every element is written by the matmul
        // below (m rows of N) before the tensor is read.
        let mut y = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        {
            let mut view = y.try_as_plain_ram_mut()?;
            let ys: &mut [f32] = view.as_slice_mut()?;
            self.w.matmul(xs, m, ys);
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for QMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        ensure!(!shape.is_empty(), "{QMATMUL} needs a rank >= 1 input");
        *shape.last_mut().unwrap() = self.w.n().to_dim();
        Ok(tvec!(f32::fact(shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let rows: TDim = inputs[0].shape.iter().rev().skip(1).product();
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            rows * (self.w.k() * self.w.n())
        )))
    }

    as_op!();
}
