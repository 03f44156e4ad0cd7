//! `SlmRope`: rotary position embedding in one pass. Exports spell it out with `rotate_half`,
//! `x * cos + Concat(-x[.., h..], x[.., ..h]) * sin`: two slices, a negation, a concatenation,
//! two products and a sum, seven nodes for each of q and k in every layer, each with its own
//! pass over memory and its own dispatch (0.4 ms of an 8.5 ms decode step on the default model,
//! about a third of it dispatch).
//!
//! Each element gets the same two products and one sum as before (a negation is exact, and
//! `-a * b` is `-(a * b)`; sums and products commute bit for bit), so the results are the
//! unfused graph's, bit for bit, on every target.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::{Slice, TypedConcat};
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;

use super::arith::{Arith, Elementwise};
use super::read_once;

/// `out = x * cos + rotate_half(x) * sin` over x's last axis (`2 * half` wide); `cos` and `sin`
/// have one shape, which repeats within x's over its leading axes (as [`Elementwise`]'s part).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct Rope {
    half: usize,
}

/// The outlets of one `rotate_half` rotation: `x`, `cos` and `sin`, and the sum it ends in.
struct Found {
    x: OutletId,
    cos: OutletId,
    sin: OutletId,
    sum: OutletId,
    half: usize,
}

/// Replaces every rotation that [`Rope`] covers (after [`super::arith::replace_adds_and_muls`],
/// whose ops it matches). Returns how many. Rotations whose intermediate values anything else
/// reads are left as they are.
pub(crate) fn fuse_rotations(model: &mut TypedModel) -> TractResult<usize> {
    let found: Vec<Found> = (0..model.nodes().len())
        .filter_map(|id| find(model, id))
        .collect();
    for f in &found {
        let mut patch = TypedModelPatch::default();
        let inputs = patch.taps(model, &[f.x, f.cos, f.sin])?;
        let name = format!("{}.rope", model.node(f.sum.node).name);
        let out = patch.wire_node(name, Rope { half: f.half }, &inputs)?[0];
        patch.shunt_outside(model, f.sum, out)?;
        patch.apply(model)?;
    }
    if !found.is_empty() {
        model.compact()?;
    }
    Ok(found.len())
}

/// The rotation that ends in node `id`, if it is one.
fn find(model: &TypedModel, id: usize) -> Option<Found> {
    let sum = model.node(id);
    let ew = |n: &TypedNode, arith: Arith| {
        n.op_as::<Elementwise>()
            .filter(|e| e.arith() == arith)
            .map(|e| e.full_and_part(&n.inputs))
    };
    let (a, b) = ew(sum, Arith::Add)?;
    // The sum's operands in either order: `x * cos` and `rotated * sin`.
    [(a, b), (b, a)].into_iter().find_map(|(xc, rs)| {
        let (xc, rs) = (read_once(model, xc)?, read_once(model, rs)?);
        let (x, cos) = ew(xc, Arith::Mul)?;
        let (rotated, sin) = ew(rs, Arith::Mul)?;
        let half = rotation_of(model, read_once(model, rotated)?, x)?;
        let same_shape = model.outlet_fact(cos).ok()?.shape == model.outlet_fact(sin).ok()?.shape;
        same_shape.then_some(Found {
            x,
            cos,
            sin,
            sum: OutletId::new(id, 0),
            half,
        })
    })
}

/// `half` when `concat` is `Concat(Neg(x[.., half..2 half]), x[.., ..half])` on x's last axis
/// and that axis is `2 * half` wide.
fn rotation_of(model: &TypedModel, concat: &TypedNode, x: OutletId) -> Option<usize> {
    let shape = &model.outlet_fact(x).ok()?.shape;
    let last = shape.len().checked_sub(1)?;
    let width = shape[last].to_usize().ok()?;
    let [neg, low] = concat.inputs[..] else {
        return None;
    };
    if concat.op_as::<TypedConcat>()?.axis != last {
        return None;
    }
    let neg = read_once(model, neg)?;
    let is_neg = neg
        .op_as::<ElementWiseOp>()
        .is_some_and(|op| op.0.name() == "Neg");
    let high = read_once(model, *neg.inputs.first()?)?;
    let low = read_once(model, low)?;
    let slice = |n: &TypedNode| -> Option<(usize, usize)> {
        let s = n.op_as::<Slice>()?;
        if s.axis != last || n.inputs[0] != x {
            return None;
        }
        Some((s.start.to_usize().ok()?, s.end.to_usize().ok()?))
    };
    let half = width / 2;
    (is_neg
        && width % 2 == 0
        && half > 0
        && slice(high)? == (half, width)
        && slice(low)? == (0, half))
        .then_some(half)
}

impl Op for Rope {
    fn name(&self) -> StaticName {
        "SlmRope".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Rope {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, cos, sin) = args_3!(inputs);
        let width = 2 * self.half;
        ensure!(
            x.shape().last() == Some(&width) && cos.shape() == sin.shape(),
            "SlmRope: x {:?}, cos {:?}, sin {:?}",
            x.shape(),
            cos.shape(),
            sin.shape()
        );
        ensure!(
            super::arith::repeats_within(cos.shape(), x.shape(), &1),
            "SlmRope: shape {:?} does not repeat within {:?}",
            cos.shape(),
            x.shape()
        );
        let (xv, cv, sv) = (
            x.try_as_plain_ram()?,
            cos.try_as_plain_ram()?,
            sin.try_as_plain_ram()?,
        );
        let (xs, cs, ss) = (
            xv.as_slice::<f32>()?,
            cv.as_slice::<f32>()?,
            sv.as_slice::<f32>()?,
        );
        let mut out = Tensor::zero::<f32>(x.shape())?;
        if !cs.is_empty() {
            let mut view = out.try_as_plain_ram_mut()?;
            let os = view.as_slice_mut::<f32>()?;
            let h = self.half;
            // Per repeat of cos and sin, per row of the last axis: its two halves.
            for (xb, ob) in xs.chunks_exact(cs.len()).zip(os.chunks_exact_mut(cs.len())) {
                let rows = xb.chunks_exact(width).zip(ob.chunks_exact_mut(width));
                for (r, (x, o)) in rows.enumerate() {
                    let (c, s) = (&cs[r * width..][..width], &ss[r * width..][..width]);
                    for i in 0..h {
                        o[i] = x[i] * c[i] + -x[i + h] * s[i];
                        o[i + h] = x[i + h] * c[i + h] + x[i] * s[i + h];
                    }
                }
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Rope {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::math;

    /// An export's rotation of x `[1, 3, 2, 8]` by cos and sin `[1, 1, 2, 8]`: `x * cos` first
    /// or second in the sum.
    fn rotation(cos_first: bool) -> TractResult<TypedModel> {
        let val = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + seed) % 1013) as f32 / 97.0 - 5.0)
                .collect()
        };
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([1, 3, 2, 8]))?;
        let cos = m.add_const("cos", Tensor::from_shape(&[1, 1, 2, 8], &val(16, 1))?)?;
        let sin = m.add_const("sin", Tensor::from_shape(&[1, 1, 2, 8], &val(16, 2))?)?;
        let low = m.wire_node("low", Slice::new(3, 0, 4), &[x])?[0];
        let high = m.wire_node("high", Slice::new(3, 4, 8), &[x])?[0];
        let neg = m.wire_node("neg", math::neg(), &[high])?[0];
        let rotated = m.wire_node("rotated", TypedConcat { axis: 3 }, &[neg, low])?[0];
        let xc = m.wire_node("xc", math::mul(), &[x, cos])?[0];
        let rs = m.wire_node("rs", math::mul(), &[sin, rotated])?[0];
        let terms = if cos_first { [xc, rs] } else { [rs, xc] };
        let out = m.wire_node("sum", math::add(), &terms)?[0];
        m.select_output_outlets(&[out])?;
        Ok(m)
    }

    fn run(m: TypedModel, x: &Tensor) -> TractResult<Vec<u32>> {
        let out = m.into_runnable()?.run(tvec!(x.clone().into_tvalue()))?;
        let out = out[0].try_as_plain_ram()?;
        Ok(out.as_slice::<f32>()?.iter().map(|v| v.to_bits()).collect())
    }

    #[test]
    fn a_fused_rotation_gives_the_graphs_bits() -> TractResult<()> {
        let x: Vec<f32> = (0..48).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let x = Tensor::from_shape(&[1, 3, 2, 8], &x)?;
        for cos_first in [true, false] {
            let mut m = rotation(cos_first)?;
            let before = run(m.clone(), &x)?;
            super::super::arith::replace_adds_and_muls(&mut m)?;
            assert_eq!(fuse_rotations(&mut m)?, 1);
            assert!(m.nodes().iter().any(|n| n.op_is::<Rope>()));
            assert!(!m.nodes().iter().any(|n| n.op_is::<TypedConcat>()));
            assert_eq!(run(m, &x)?, before, "cos_first {cos_first}");
        }
        Ok(())
    }

    #[test]
    fn a_rotation_read_elsewhere_stays() -> TractResult<()> {
        let mut m = rotation(true)?;
        // The rotated x is also a model output: fusing would compute it twice.
        let rotated = m.node_by_name("rotated")?.id;
        let mut outputs = m.output_outlets()?.to_vec();
        outputs.push(OutletId::new(rotated, 0));
        m.select_output_outlets(&outputs)?;
        super::super::arith::replace_adds_and_muls(&mut m)?;
        assert_eq!(fuse_rotations(&mut m)?, 0);
        Ok(())
    }
}
