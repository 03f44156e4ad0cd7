//! tract's float ops whose results depend on the target, replaced after optimisation by ours
//! ([`crate::kernels::detmath`]): the same bits natively (any x86 level, any thread count) and in
//! wasm32. Element-wise SiLU, sigmoid, tanh, GELU (tanh form), exp, sin and cos on f32; RmsNorm on
//! f32 along the last axis. The rest of a decoder step is ours already (quantized products,
//! attention, activation rounding) or exact IEEE arithmetic (add, mul, div, sqrt, casts).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::nn::{GeluApproximate, RmsNorm};

use crate::kernels::detmath;

/// An element-wise function of [`detmath`].
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Func {
    Silu,
    Sigmoid,
    Tanh,
    GeluTanh,
    Exp,
    Sin,
    Cos,
}

impl Func {
    /// Ours for tract's element-wise `op`, if it is one of these (on f32; tract's fast GELU,
    /// which squares instead of cubing, is left alone).
    fn of(op: &ElementWiseOp) -> Option<Func> {
        if op.1.is_some_and(|dt| dt != f32::datum_type()) {
            return None;
        }
        if let Some(gelu) = op.0.downcast_ref::<GeluApproximate>() {
            return (!gelu.fast_impl).then_some(Func::GeluTanh);
        }
        Some(match &*op.0.name() {
            "Silu" => Func::Silu,
            "Sigmoid" => Func::Sigmoid,
            "Tanh" => Func::Tanh,
            "Exp" => Func::Exp,
            "Sin" => Func::Sin,
            "Cos" => Func::Cos,
            _ => return None,
        })
    }

    /// `xs[i] = f(xs[i])`: one loop per function, each inlined so the compiler vectorizes it
    /// (every lane computes what the scalar code would), with AVX2 where the CPU has it.
    fn apply(self, xs: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::cpu::avx2() {
            // SAFETY: the CPU has AVX2.
            return unsafe { apply_avx2(self, xs) };
        }
        apply_body(self, xs)
    }
}

#[inline(always)]
fn apply_body(func: Func, xs: &mut [f32]) {
    fn each(xs: &mut [f32], f: impl Fn(f32) -> f32) {
        for x in xs {
            *x = f(*x);
        }
    }
    match func {
        Func::Silu => each(xs, detmath::silu),
        Func::Sigmoid => each(xs, detmath::sigmoid),
        Func::Tanh => each(xs, detmath::tanh),
        Func::GeluTanh => each(xs, detmath::gelu_tanh),
        Func::Exp => each(xs, detmath::exp),
        Func::Sin => each(xs, detmath::sin),
        Func::Cos => each(xs, detmath::cos),
    }
}

/// [`apply_body`] compiled for AVX2 (no FMA: the same bits as the portable build).
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn apply_avx2(func: Func, xs: &mut [f32]) {
    apply_body(func, xs)
}

/// RMS normalization of each `row`-long row of `xs`, each then times `weight` if there is one
/// (AVX2 where the CPU has it).
fn rms_norm_rows(xs: &mut [f32], row: usize, eps: f32, weight: Option<&[f32]>) {
    #[inline(always)]
    fn body(xs: &mut [f32], row: usize, eps: f32, weight: Option<&[f32]>) {
        for r in xs.chunks_exact_mut(row) {
            match weight {
                Some(w) => detmath::rms_norm_weighted(r, eps, w),
                None => detmath::rms_norm(r, eps),
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(xs: &mut [f32], row: usize, eps: f32, weight: Option<&[f32]>) {
        body(xs, row, eps, weight)
    }
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::cpu::avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { avx2(xs, row, eps, weight) };
    }
    body(xs, row, eps, weight)
}

/// Replace, in place, every op of `model` that [`Func`] or [`DetRmsNorm`] covers. Returns how
/// many were replaced.
pub(crate) fn make_deterministic(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let f32_in =
            model.node_input_facts(id)?.first().map(|f| f.datum_type) == Some(f32::datum_type());
        let node = model.node(id);
        let ours: Option<Box<dyn TypedOp>> = if let Some(ew) = node.op_as::<ElementWiseOp>() {
            Func::of(ew)
                .filter(|_| f32_in)
                .map(|func| Box::new(DetUnary { func }) as _)
        } else if let Some(norm) = node.op_as::<RmsNorm>() {
            let rank = model.node_input_facts(id)?[0].rank();
            (f32_in && norm.axis + 1 == rank && norm.eps.len() == 1)
                .then(|| norm.eps.cast_to_scalar::<f32>())
                .transpose()?
                .map(|eps| {
                    Box::new(DetRmsNorm {
                        eps: eps.to_bits(),
                        weight: None,
                    }) as _
                })
        } else {
            None
        };
        if let Some(op) = ours {
            model.node_mut(id).op = op;
            replaced += 1;
        }
    }
    Ok(replaced)
}

/// An element-wise [`Func`] on an f32 tensor.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct DetUnary {
    func: Func,
}

impl DetUnary {
    pub(crate) fn func(&self) -> Func {
        self.func
    }
}

impl Op for DetUnary {
    fn name(&self) -> StaticName {
        format!("Slm{:?}", self.func).into()
    }

    op_as_typed_op!();
}

impl EvalOp for DetUnary {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut t = args_1!(inputs).into_tensor();
        {
            let mut view = t.try_as_plain_ram_mut()?;
            self.func.apply(view.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(t.into_tvalue()))
    }
}

impl TypedOp for DetUnary {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// RMS normalization along the last axis of an f32 tensor (`eps` as f32 bits, for Hash/Eq),
/// then, once [`fuse_norm_weights`] has taken in the `Mul` that follows it, times a weight per
/// position of that axis (as f32 bits).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct DetRmsNorm {
    eps: u32,
    weight: Option<Vec<u32>>,
}

/// Takes into each [`DetRmsNorm`] the product by a constant weight that follows it (every
/// model's norms: `norm(x) * w`, `w` one value per position of the normalized axis): one pass
/// and one dispatch instead of two, the same two products per value. Returns how many. A norm
/// whose output anything else reads is left as it is.
pub(crate) fn fuse_norm_weights(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in 0..model.nodes().len() {
        let Some((mul, weight)) = weight_after(model, id) else {
            continue;
        };
        let Some(norm) = model.node(id).op_as::<DetRmsNorm>() else {
            continue;
        };
        let op = DetRmsNorm {
            eps: norm.eps,
            weight: Some(weight.iter().map(|w| w.to_bits()).collect()),
        };
        let input = model.node(id).inputs[0];
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, input)?;
        let name = format!("{}.weighted", model.node(id).name);
        let out = patch.wire_node(name, op, &[x])?[0];
        patch.shunt_outside(model, OutletId::new(mul, 0), out)?;
        patch.apply(model)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}

/// The `Mul` that alone reads norm `id`'s output, and its other operand's values, when that is
/// a constant f32 weight with one value per position of the normalized (last) axis.
fn weight_after(model: &TypedModel, id: usize) -> Option<(usize, Vec<f32>)> {
    let node = model.node(id);
    let norm = node.op_as::<DetRmsNorm>()?;
    let out = OutletId::new(id, 0);
    if norm.weight.is_some()
        || node.outputs[0].successors.len() != 1
        || model.outputs.contains(&out)
    {
        return None;
    }
    let mul = model.node(node.outputs[0].successors[0].node);
    let is_mul = mul
        .op_as::<tract_onnx::tract_core::ops::binary::OptBinUnicast>()
        .is_some_and(|b| b.binop.name() == "Mul")
        || mul
            .op_as::<tract_onnx::tract_core::ops::binary::TypedBinOp>()
            .is_some_and(|b| b.0.name() == "Mul" && b.1.is_none())
        || mul
            .op_as::<super::arith::Elementwise>()
            .is_some_and(|e| e.arith() == super::arith::Arith::Mul);
    let [a, b] = mul.inputs[..] else { return None };
    let other = if a == out { b } else { a };
    let row = model.outlet_fact(out).ok()?.shape.last()?.to_usize().ok()?;
    let out_shape = &model.outlet_fact(OutletId::new(mul.id, 0)).ok()?.shape;
    let k = model.outlet_fact(other).ok()?.konst.clone()?;
    // The weight repeats over every axis but the last: the product keeps the norm's shape.
    let per_position = k.datum_type() == f32::datum_type()
        && k.len() == row
        && k.shape().last() == Some(&row)
        && *out_shape == model.outlet_fact(out).ok()?.shape;
    (is_mul && (a == out) != (b == out) && per_position && row > 0)
        .then(|| {
            let view = k.try_as_plain_ram().ok()?;
            Some((mul.id, view.as_slice::<f32>().ok()?.to_vec()))
        })
        .flatten()
}

impl Op for DetRmsNorm {
    fn name(&self) -> StaticName {
        "SlmRmsNorm".into()
    }

    op_as_typed_op!();
}

impl EvalOp for DetRmsNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut t = args_1!(inputs).into_tensor();
        let row = *t.shape().last().unwrap_or(&1);
        let eps = f32::from_bits(self.eps);
        let weight: Option<Vec<f32>> = self
            .weight
            .as_ref()
            .map(|w| w.iter().map(|&b| f32::from_bits(b)).collect());
        ensure!(
            weight.as_ref().is_none_or(|w| w.len() == row),
            "SlmRmsNorm: a weight of {:?} values for rows of {row}",
            weight.as_ref().map(Vec::len)
        );
        if row > 0 {
            let mut view = t.try_as_plain_ram_mut()?;
            rms_norm_rows(view.as_slice_mut::<f32>()?, row, eps, weight.as_deref());
        }
        Ok(tvec!(t.into_tvalue()))
    }
}

impl TypedOp for DetRmsNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::math;

    /// `RmsNorm(x) * w` over x `[1, 3, 8]`, the weight `w_shape` (a model's: `[1, 1, 8]`),
    /// first or second in the product.
    fn norm_times(w_shape: &[usize], weight_first: bool) -> TractResult<TypedModel> {
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([1, 3, 8]))?;
        let eps = tensor0(1e-6f32).into_arc_tensor();
        let norm = m.wire_node("norm", RmsNorm { axis: 2, eps }, &[x])?[0];
        let n: usize = w_shape.iter().product();
        let w: Vec<f32> = (0..n).map(|i| 0.5 + i as f32 * 0.37).collect();
        let w = m.add_const("w", Tensor::from_shape(w_shape, &w)?)?;
        let ins = if weight_first { [w, norm] } else { [norm, w] };
        let out = m.wire_node("mul", math::mul(), &ins)?[0];
        m.select_output_outlets(&[out])?;
        Ok(m)
    }

    fn run(m: TypedModel) -> TractResult<Vec<u32>> {
        let x: Vec<f32> = (0..24).map(|i| (i as f32 * 0.7).sin() * 3.0).collect();
        let x = Tensor::from_shape(&[1, 3, 8], &x)?;
        let out = m.into_runnable()?.run(tvec!(x.into_tvalue()))?;
        let out = out[0].try_as_plain_ram()?;
        Ok(out.as_slice::<f32>()?.iter().map(|v| v.to_bits()).collect())
    }

    #[test]
    fn a_norms_weight_is_taken_in_bit_for_bit() -> TractResult<()> {
        for weight_first in [false, true] {
            let mut m = norm_times(&[1, 1, 8], weight_first)?;
            make_deterministic(&mut m)?;
            let before = run(m.clone())?;
            assert_eq!(fuse_norm_weights(&mut m)?, 1);
            assert_eq!(m.nodes().len(), 2, "{:?}", m.nodes());
            assert_eq!(run(m)?, before, "weight first: {weight_first}");
        }
        Ok(())
    }

    #[test]
    fn a_weight_that_is_not_per_position_stays() -> TractResult<()> {
        // One value per row, not per position of the normalized axis.
        let mut m = norm_times(&[1, 3, 1], false)?;
        make_deterministic(&mut m)?;
        assert_eq!(fuse_norm_weights(&mut m)?, 0);
        // The norm is also a model output.
        let mut m = norm_times(&[1, 1, 8], false)?;
        make_deterministic(&mut m)?;
        let norm = m.node_by_name("norm")?.id;
        let mut outputs = m.output_outlets()?.to_vec();
        outputs.push(OutletId::new(norm, 0));
        m.select_output_outlets(&outputs)?;
        assert_eq!(fuse_norm_weights(&mut m)?, 0);
        Ok(())
    }
}
