//! `SlmGeluTanhF16`: GELU (tanh form) as our converter spells it for Gemma 3, the way llama.cpp
//! computes it (`host/convert`'s `gelu_tanh`): the input rounded to float16, the tanh formula,
//! the result rounded to float16, `x` itself from 10 up. That is fifteen nodes (four casts, six
//! products, two sums, a tanh, a comparison and a select), each its own pass over the MLP's
//! activations and its own dispatch: 38% of a Gemma 3 prompt's time at 2 threads, 7% of a decode
//! step (tract's casts to float16 alone cost 5 us each per token).
//!
//! One pass computes each element's same operations in the same order
//! ([`detmath::gelu_tanh_f16`]; sums and products commute bit for bit), so the results are the
//! graph's, bit for bit, on every target.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::logic::{CompGTE, Iff};

use super::arith::{Arith, Elementwise};
use super::deterministic::{DetUnary, Func};
use super::read_once;
use crate::kernels::detmath;
use crate::kernels::parallel::{parallel_ranges, OutPtr};

/// `y = gelu_tanh_f16(x)` element-wise on f32, its constants as f32 bits (for Hash and Eq).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct GeluTanhF16 {
    c: u32,
    a: u32,
    threshold: u32,
}

/// Values per part when a prompt's activations are split across threads.
const CHUNK: usize = 4096;
/// A value's work, in the multiply-adds that `parallel_ranges` weighs (a division, an
/// exponential and two float16 roundings: ~70 vector operations per 8 values): a decode step's
/// 2,048 values stay on one thread, a prompt's are split.
const WORK_PER_VALUE: usize = 16;

impl GeluTanhF16 {
    /// Every value of `xs`, its parts on the pool's threads (each value is computed alone, so
    /// any split gives the same bits).
    fn apply(&self, xs: &mut [f32]) {
        let len = xs.len();
        let out = OutPtr(xs.as_mut_ptr());
        parallel_ranges(len.div_ceil(CHUNK), len * WORK_PER_VALUE, &|b0, b1| {
            let (i0, i1) = (b0 * CHUNK, (b1 * CHUNK).min(len));
            // SAFETY: parts b0..b1 of distinct calls are disjoint ranges inside xs, which
            // outlives the call (parallel_ranges returns when every part is done).
            let part = unsafe { std::slice::from_raw_parts_mut(out.at(i0), i1 - i0) };
            self.apply_serial(part);
        });
    }

    fn apply_serial(&self, xs: &mut [f32]) {
        #[inline(always)]
        fn body(xs: &mut [f32], c: f32, a: f32, threshold: f32) {
            for x in xs {
                *x = detmath::gelu_tanh_f16(*x, c, a, threshold);
            }
        }
        // AVX2 without FMA: the same bits as the portable build, eight lanes at a time.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(xs: &mut [f32], c: f32, a: f32, threshold: f32) {
            body(xs, c, a, threshold)
        }
        let (c, a, t) = (
            f32::from_bits(self.c),
            f32::from_bits(self.a),
            f32::from_bits(self.threshold),
        );
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::cpu::avx2() {
            // SAFETY: the CPU has AVX2.
            return unsafe { avx2(xs, c, a, t) };
        }
        body(xs, c, a, t)
    }
}

/// The outlets of one spelled-out GELU: its input and its result, and its constants.
struct Found {
    x: OutletId,
    out: OutletId,
    op: GeluTanhF16,
}

/// Replaces every GELU that [`GeluTanhF16`] covers (after
/// [`super::deterministic::make_deterministic`] and [`super::arith::replace_adds_and_muls`],
/// whose ops it matches). Returns how many. A chain whose intermediate values anything else reads
/// is left as it is.
pub(crate) fn fuse_gelus(model: &mut TypedModel) -> TractResult<usize> {
    let found: Vec<Found> = (0..model.nodes().len())
        .filter_map(|id| find(model, id))
        .collect();
    for f in &found {
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, f.x)?;
        let name = format!("{}.gelu", model.node(f.out.node).name);
        let out = patch.wire_node(name, f.op.clone(), &[x])?[0];
        patch.shunt_outside(model, f.out, out)?;
        patch.apply(model)?;
    }
    if !found.is_empty() {
        model.compact()?;
    }
    Ok(found.len())
}

/// The GELU that ends in node `id` (`Where(x >= threshold, x, round16(y))`), if it is one.
fn find(model: &TypedModel, id: usize) -> Option<Found> {
    let select = model.node(id);
    select.op_as::<Iff>()?;
    let [cond, x, rounded] = select.inputs[..] else {
        return None;
    };
    let gte = read_once(model, cond)?;
    if !gte
        .op_as::<TypedBinOp>()
        .is_some_and(|b| b.0.is::<CompGTE>() && b.1.is_none())
        || gte.inputs.first() != Some(&x)
    {
        return None;
    }
    let threshold = scalar(model, *gte.inputs.get(1)?)?;
    if model.outlet_fact(x).ok()?.datum_type != f32::datum_type() {
        return None;
    }
    // y = (0.5 * xh) * (1 + tanh(arg)), the factors in either order.
    read_once(model, rounded)?;
    let y = read_once(model, rounded_to_f16(model, rounded)?)?;
    let (p, q) = both(model, y, Arith::Mul)?;
    [(p, q), (q, p)]
        .into_iter()
        .find_map(|(half, one_plus_tanh)| {
            let (xh, h) = with_constant(model, read_once(model, half)?, Arith::Mul)?;
            let (t, one) = with_constant(model, read_once(model, one_plus_tanh)?, Arith::Add)?;
            let tanh = read_once(model, t)?;
            if tanh.op_as::<DetUnary>()?.func() != Func::Tanh || h != 0.5 || one != 1.0 {
                return None;
            }
            // arg = (c * xh) * (1 + (a * xh) * xh)
            let (c, a) = argument_constants(model, read_once(model, tanh.inputs[0])?, xh)?;
            // xh = round16(x), read by the four products that name it.
            let xh_node = model.node(xh.node);
            let read_by_four =
                xh_node.outputs[0].successors.len() == 4 && !model.outputs.contains(&xh);
            (read_by_four && rounded_to_f16(model, xh)? == x).then(|| Found {
                x,
                out: OutletId::new(id, 0),
                op: GeluTanhF16 {
                    c: c.to_bits(),
                    a: a.to_bits(),
                    threshold: threshold.to_bits(),
                },
            })
        })
}

/// `(c, a)` when `arg` is `(c * xh) * (1 + (a * xh) * xh)`, the factors of each product in
/// either order.
fn argument_constants(model: &TypedModel, arg: &TypedNode, xh: OutletId) -> Option<(f32, f32)> {
    let (p, q) = both(model, arg, Arith::Mul)?;
    [(p, q), (q, p)].into_iter().find_map(|(cx, poly)| {
        let (x1, c) = with_constant(model, read_once(model, cx)?, Arith::Mul)?;
        let (axx, one) = with_constant(model, read_once(model, poly)?, Arith::Add)?;
        let (p, q) = both(model, read_once(model, axx)?, Arith::Mul)?;
        let ax = if q == xh {
            p
        } else if p == xh {
            q
        } else {
            return None;
        };
        let (x2, a) = with_constant(model, read_once(model, ax)?, Arith::Mul)?;
        (x1 == xh && x2 == xh && one == 1.0).then_some((c, a))
    })
}

/// The outlet `v` when `outlet` is `Cast(Cast(v, f16), f32)` (the inner cast read once) and v
/// is f32.
fn rounded_to_f16(model: &TypedModel, outlet: OutletId) -> Option<OutletId> {
    let to_f32 = model.node(outlet.node);
    let to_f16 = read_once(model, *to_f32.inputs.first()?)?;
    let v = *to_f16.inputs.first()?;
    let cast = |n: &TypedNode| n.op_as::<Cast>().map(|c| c.to);
    (cast(to_f32)? == f32::datum_type()
        && cast(to_f16)? == f16::datum_type()
        && model.outlet_fact(v).ok()?.datum_type == f32::datum_type())
    .then_some(v)
}

/// The operands of `node` when it is our `arith` on two values of the same shape.
fn both(model: &TypedModel, node: &TypedNode, arith: Arith) -> Option<(OutletId, OutletId)> {
    let e = node.op_as::<Elementwise>().filter(|e| e.arith() == arith)?;
    let (full, part) = e.full_and_part(&node.inputs);
    let same = model.outlet_fact(full).ok()?.shape == model.outlet_fact(part).ok()?.shape;
    same.then_some((full, part))
}

/// `(v, k)` when `node` is our `arith` of `v` and a scalar constant `k`.
fn with_constant(model: &TypedModel, node: &TypedNode, arith: Arith) -> Option<(OutletId, f32)> {
    let e = node.op_as::<Elementwise>().filter(|e| e.arith() == arith)?;
    let (full, part) = e.full_and_part(&node.inputs);
    Some((full, scalar(model, part)?))
}

/// The value of a one-element f32 constant.
fn scalar(model: &TypedModel, outlet: OutletId) -> Option<f32> {
    let k = model.outlet_fact(outlet).ok()?.konst.clone()?;
    (k.datum_type() == f32::datum_type() && k.len() == 1)
        .then(|| k.cast_to_scalar::<f32>().ok())
        .flatten()
}

impl Op for GeluTanhF16 {
    fn name(&self) -> StaticName {
        "SlmGeluTanhF16".into()
    }

    op_as_typed_op!();
}

impl EvalOp for GeluTanhF16 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut t = args_1!(inputs).into_tensor();
        {
            let mut view = t.try_as_plain_ram_mut()?;
            self.apply(view.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(t.into_tvalue()))
    }
}

impl TypedOp for GeluTanhF16 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::math;

    /// Our converter's GELU of x `[1, 2, 512]` (`host/convert`'s `gelu_tanh`), the operands of
    /// each product and sum in the converter's order, or swapped.
    fn gelu(swapped: bool) -> TractResult<TypedModel> {
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([1, 2, 512]))?;
        let k = |m: &mut TypedModel, name: &str, v: f32| -> TractResult<OutletId> {
            m.add_const(name, Tensor::from_shape(&[1, 1, 1], &[v])?)
        };
        let bin = |m: &mut TypedModel, name: &str, op: TypedBinOp, a, b| -> TractResult<OutletId> {
            let ins = if swapped { [b, a] } else { [a, b] };
            Ok(m.wire_node(name, op, &ins)?[0])
        };
        let round = |m: &mut TypedModel, name: &str, v| -> TractResult<OutletId> {
            let h = m.wire_node(format!("{name}.16"), Cast::new(f16::datum_type()), &[v])?[0];
            Ok(m.wire_node(format!("{name}.32"), Cast::new(f32::datum_type()), &[h])?[0])
        };
        let xh = round(&mut m, "xh", x)?;
        let c = k(&mut m, "c", (2.0 / std::f64::consts::PI).sqrt() as f32)?;
        let cx = bin(&mut m, "cx", math::mul(), c, xh)?;
        let a = k(&mut m, "a", 0.044715)?;
        let ax = bin(&mut m, "ax", math::mul(), a, xh)?;
        let axx = bin(&mut m, "axx", math::mul(), ax, xh)?;
        let one = k(&mut m, "one", 1.0)?;
        let poly = bin(&mut m, "poly", math::add(), one, axx)?;
        let arg = bin(&mut m, "arg", math::mul(), cx, poly)?;
        let t = m.wire_node("tanh", math::tanh(), &[arg])?[0];
        let t1 = bin(&mut m, "t1", math::add(), one, t)?;
        let half = k(&mut m, "half", 0.5)?;
        let hx = bin(&mut m, "hx", math::mul(), half, xh)?;
        let y = bin(&mut m, "y", math::mul(), hx, t1)?;
        let y = round(&mut m, "y", y)?;
        let ten = k(&mut m, "ten", 10.0)?;
        let large = m.wire_node("large", TypedBinOp(Box::new(CompGTE), None), &[x, ten])?[0];
        let out = m.wire_node("select", Iff, &[large, x, y])?[0];
        m.select_output_outlets(&[out])?;
        Ok(m)
    }

    fn run(m: TypedModel, x: &Tensor) -> TractResult<Vec<u32>> {
        let out = m.into_runnable()?.run(tvec!(x.clone().into_tvalue()))?;
        let out = out[0].try_as_plain_ram()?;
        Ok(out.as_slice::<f32>()?.iter().map(|v| v.to_bits()).collect())
    }

    /// Ours, as make_deterministic and replace_adds_and_muls leave the graph before the fusion.
    fn ours(m: &mut TypedModel) -> TractResult<()> {
        super::super::deterministic::make_deterministic(m)?;
        super::super::arith::replace_adds_and_muls(m)?;
        Ok(())
    }

    #[test]
    fn a_fused_gelu_gives_the_graphs_bits() -> TractResult<()> {
        // Small and large, negative, around the threshold, past float16's range, subnormal.
        let x: Vec<f32> = (0..1024)
            .map(|i| match i % 8 {
                0 => (i as f32 * 0.37).sin() * 12.0,
                1 => 10.0 - i as f32 * 1e-4,
                2 => -(i as f32) * 97.0,
                3 => (i as f32) * 1e-7,
                _ => (i as f32 * 0.011).cos() * 4.0,
            })
            .collect();
        let x = Tensor::from_shape(&[1, 2, 512], &x)?;
        for swapped in [false, true] {
            let mut m = gelu(swapped)?;
            ours(&mut m)?;
            let before = run(m.clone(), &x)?;
            assert_eq!(fuse_gelus(&mut m)?, 1, "swapped {swapped}");
            assert!(m.nodes().iter().any(|n| n.op_is::<GeluTanhF16>()));
            assert!(!m.nodes().iter().any(|n| n.op_is::<Cast>()));
            assert_eq!(run(m, &x)?, before, "swapped {swapped}");
        }
        Ok(())
    }

    #[test]
    fn a_prompts_values_split_across_threads_give_the_same_bits() {
        let (c, a, threshold) = ((2.0 / std::f64::consts::PI).sqrt() as f32, 0.044715, 10.0);
        let op = GeluTanhF16 {
            c: c.to_bits(),
            a: f32::to_bits(a),
            threshold: f32::to_bits(threshold),
        };
        let x: Vec<f32> = (0..300_001)
            .map(|i| (i as f32 * 0.0137).sin() * 14.0)
            .collect();
        let want: Vec<u32> = x
            .iter()
            .map(|&v| detmath::gelu_tanh_f16(v, c, a, threshold).to_bits())
            .collect();
        let got = crate::kernels::testing::same_on_threads(x.len(), |out| {
            out.copy_from_slice(&x);
            op.apply(out);
        });
        assert!(got.iter().map(|v| v.to_bits()).eq(want));
    }

    #[test]
    fn a_gelu_read_elsewhere_stays() -> TractResult<()> {
        let mut m = gelu(false)?;
        // The tanh is also a model output: fusing would compute it twice.
        let tanh = m.node_by_name("tanh")?.id;
        let mut outputs = m.output_outlets()?.to_vec();
        outputs.push(OutletId::new(tanh, 0));
        m.select_output_outlets(&outputs)?;
        ours(&mut m)?;
        assert_eq!(fuse_gelus(&mut m)?, 0);
        Ok(())
    }

    #[test]
    fn other_constants_are_the_ops() -> TractResult<()> {
        // A GELU with another threshold and factors is fused with them; one whose "0.5" is
        // another number is not this formula.
        let mut m = gelu(false)?;
        ours(&mut m)?;
        let half = m.node_by_name("half")?.id;
        let konst = tract_onnx::tract_core::ops::konst::Const::new(
            Tensor::from_shape(&[1, 1, 1], &[0.25f32])?.into_arc_tensor(),
        )?;
        m.node_mut(half).op = Box::new(konst);
        m.refresh_output_facts()?;
        assert_eq!(fuse_gelus(&mut m)?, 0);
        Ok(())
    }
}
