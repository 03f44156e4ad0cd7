//! `SlmQGather`: rows of a table (ONNX `Gather` on axis 0) read from the weights of a
//! [`super::qmatmul::QMatMul`] (a tied embedding and LM head hold the table once): int8 values
//! for a table with one scale per row (the graph scales them), or f32 values for int8 blocks
//! (each block's scale applied: exactly the file's values) and for f32 tables.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use super::{pending_weights, Inferred, Io, Packed, Rules, QGATHER};

pub(super) fn build(
    _ctx: &ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let w = match pending_weights(node)? {
        w @ (Packed::F32(_)
        | Packed::Int8(_)
        | Packed::Q8Head(_)
        | Packed::Q8Blocks(_)
        | Packed::Q5Blocks(_))
            if w.is_table() =>
        {
            w
        }
        _ => bail!("{QGATHER} needs an int8 table of rows (a transposed MatMul weight)"),
    };
    Ok((expand(Inferred(QGather { w })), vec![]))
}

/// `ids [..] -> rows [.., K]`, int8 (or f32: [`Packed::has_f32_rows`]): rows of the table of a
/// [`super::qmatmul::QMatMul`].
#[derive(Clone, PartialEq, Eq)]
pub struct QGather {
    pub w: Packed,
}

impl std::fmt::Debug for QGather {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QGather({:?})", self.w)
    }
}

impl Rules for QGather {
    const INPUTS: usize = 1;

    fn rules<'r>(&'r self, s: &mut Solver<'r>, io: Io<'r>) -> InferenceResult {
        let Io { inputs, outputs } = io;
        s.equals(&outputs[0].datum_type, self.row_type())?;
        s.equals(inputs[0].rank.bex() + 1, outputs[0].rank.bex())?;
        let k = self.w.k().to_dim();
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            for ax in 0..rank {
                s.equals(&outputs[0].shape[ax], &inputs[0].shape[ax])?;
            }
            s.equals(&outputs[0].shape[rank], k.clone())
        })?;
        Ok(())
    }
}

impl QGather {
    fn row_type(&self) -> DatumType {
        if self.w.has_f32_rows() {
            f32::datum_type()
        } else {
            i8::datum_type()
        }
    }
}

impl Op for QGather {
    fn name(&self) -> StaticName {
        QGATHER.into()
    }

    op_as_typed_op!();
}

impl EvalOp for QGather {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let ids = inputs[0].cast_to::<i64>()?;
        let plain = ids.try_as_plain_ram()?;
        let ids: &[i64] = plain.as_slice()?;
        let (rows, k) = (self.w.n() as i64, self.w.k());
        let mut shape: TVec<usize> = inputs[0].shape().into();
        shape.push(k);
        let mut table_rows = Vec::with_capacity(ids.len());
        for &id in ids {
            let r = if id < 0 { id + rows } else { id };
            ensure!(
                (0..rows).contains(&r),
                "{QGATHER}: index {id} out of 0..{rows}"
            );
            table_rows.push(r as usize);
        }
        // A row of the table is an output channel of the head: a column of its panels.
        let out = if self.w.has_f32_rows() {
            let mut out = vec![0f32; ids.len() * k];
            for (r, o) in table_rows.iter().zip(out.chunks_exact_mut(k)) {
                self.w.copy_column_f32(*r, o);
            }
            Tensor::from_shape(&shape, &out)?
        } else {
            let mut out = vec![0i8; ids.len() * k];
            for (r, o) in table_rows.iter().zip(out.chunks_exact_mut(k)) {
                self.w.copy_column(*r, o);
            }
            Tensor::from_shape(&shape, &out)?
        };
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QGather {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        shape.push(self.w.k().to_dim());
        Ok(tvec!(self.row_type().fact(shape)))
    }

    as_op!();
}
