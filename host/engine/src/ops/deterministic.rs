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

/// RMS normalization of each `row`-long row of `xs` (AVX2 where the CPU has it).
fn rms_norm_rows(xs: &mut [f32], row: usize, eps: f32) {
    #[inline(always)]
    fn body(xs: &mut [f32], row: usize, eps: f32) {
        for r in xs.chunks_exact_mut(row) {
            detmath::rms_norm(r, eps);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(xs: &mut [f32], row: usize, eps: f32) {
        body(xs, row, eps)
    }
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::cpu::avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { avx2(xs, row, eps) };
    }
    body(xs, row, eps)
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
                .map(|eps| Box::new(DetRmsNorm { eps: eps.to_bits() }) as _)
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

/// RMS normalization along the last axis of an f32 tensor (`eps` as f32 bits, for Hash/Eq).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct DetRmsNorm {
    eps: u32,
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
        if row > 0 {
            let mut view = t.try_as_plain_ram_mut()?;
            rms_norm_rows(view.as_slice_mut::<f32>()?, row, eps);
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
