//! `SlmLastRows`: the rows of the hidden states that reach the final norm and the LM head
//! ([`crate::onnx::packing`] puts it where an export slices out the last position).
//!
//! A run of one sequence keeps its last row, as the slice did. A packed run (several sequences'
//! tokens as the rows of one run, [`crate::batching`]) keeps the last row of each sequence: the
//! session sets them in the op's state ([`RowsToKeep`]) before the run. Input `[1, S, H]`,
//! output `[1, R, H]`, R the symbol [`ROWS`] (1 outside a packed run).

use tract_onnx::model::ParsingContext;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::LaneId;
use tract_onnx::tract_hir::internal::*;

use super::LAST_ROWS;

/// The symbol of the kept rows' axis (also the `logits` output's second axis).
pub(crate) const ROWS: &str = "slm_rows";

pub(super) fn build(
    _ctx: &ParsingContext,
    _node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(InferLastRows), vec![]))
}

/// The inference-time face: the typed op needs the model's symbol for R, made at wiring.
#[derive(Debug, Clone)]
struct InferLastRows;

impl Expansion for InferLastRows {
    fn name(&self) -> StaticName {
        LAST_ROWS.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&inputs[0].rank, 3)?;
        s.equals(&outputs[0].rank, 3)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[0].shape[2], &inputs[0].shape[2])
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let rows = model.symbols.sym(ROWS);
        model.wire_node(prefix, LastRows { rows }, inputs)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LastRows {
    rows: Symbol,
}

/// The rows a packed run keeps, in order (empty: the last row, as in a run of one sequence).
#[derive(Debug, Clone)]
pub(crate) struct RowsToKeep {
    pub(crate) rows: Vec<usize>,
    /// [`ROWS`], told to tract before each run: a symbol it had to find from node outputs would
    /// cost it a look at every output until this op's (0.6 ms per decode step).
    symbol: Symbol,
}

impl LastRows {
    fn run(&self, keep: &[usize], input: &TValue) -> TractResult<TVec<TValue>> {
        let shape = input.shape();
        ensure!(
            shape.len() == 3 && shape[0] == 1 && shape[1] > 0,
            "{LAST_ROWS}: input {shape:?} is not [1, tokens >= 1, hidden]"
        );
        let (s, h) = (shape[1], shape[2]);
        let last = [s - 1];
        let keep = if keep.is_empty() { &last[..] } else { keep };
        ensure!(
            keep.iter().all(|&r| r < s),
            "{LAST_ROWS}: rows {keep:?} of {s}"
        );
        let view = input.try_as_plain_ram()?;
        let x: &[f32] = view.as_slice()?;
        let mut out = Vec::with_capacity(keep.len() * h);
        for &r in keep {
            out.extend_from_slice(&x[r * h..][..h]);
        }
        Ok(tvec!(
            Tensor::from_shape(&[1, keep.len(), h], &out)?.into_tvalue()
        ))
    }
}

impl Op for LastRows {
    fn name(&self) -> StaticName {
        LAST_ROWS.into()
    }

    op_as_typed_op!();
}

impl EvalOp for LastRows {
    not_out_of_plan!();

    /// Outside a session: the last row.
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.run(&[], &inputs[0])
    }

    fn state(&self, _ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        Ok(Some(Box::new(RowsToKeep {
            rows: vec![],
            symbol: self.rows.clone(),
        })))
    }
}

impl OpState for RowsToKeep {
    fn eval(
        &mut self,
        _ctx: &EvalContext,
        op: &dyn Op,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        let op = op
            .downcast_ref::<LastRows>()
            .context("kept rows on another op")?;
        ensure!(inputs.len() == 1, "{LAST_ROWS} takes 1 input");
        op.run(&self.rows, &inputs[0])
    }

    fn has_init_tensor_fact(&self) -> bool {
        true
    }

    fn resolve_symbols(&mut self, state: &mut TurnState) -> TractResult<()> {
        state
            .resolved_symbols
            .set(&self.symbol, self.rows.len().max(1) as i64);
        Ok(())
    }

    fn reset_lanes(&mut self, _lanes: &[LaneId]) -> TractResult<()> {
        Ok(())
    }
}

impl TypedOp for LastRows {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.len() == 1 && inputs[0].rank() == 3,
            "{LAST_ROWS} takes one [1, tokens, hidden] input"
        );
        let mut shape = inputs[0].shape.to_tvec();
        shape[1] = self.rows.clone().into();
        Ok(tvec!(inputs[0].datum_type.fact(shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_row_or_the_rows_asked_for() {
        let op = LastRows {
            rows: SymbolScope::default().sym(ROWS),
        };
        let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let x = Tensor::from_shape(&[1, 4, 3], &x).unwrap().into_tvalue();
        let rows = |keep: &[usize]| {
            let out = op.run(keep, &x).unwrap();
            let view = out[0].try_as_plain_ram().unwrap();
            (
                out[0].shape().to_vec(),
                view.as_slice::<f32>().unwrap().to_vec(),
            )
        };
        assert_eq!(rows(&[]), (vec![1, 1, 3], vec![9.0, 10.0, 11.0]));
        assert_eq!(
            rows(&[0, 2]),
            (vec![1, 2, 3], vec![0.0, 1.0, 2.0, 6.0, 7.0, 8.0])
        );
        assert!(op.run(&[4], &x).is_err());
    }
}
