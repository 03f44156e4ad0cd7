//! Our tract ops, and how tract's ONNX front end builds them from the nodes that the rewrites
//! ([`crate::onnx`]) leave: `SlmQMatMul` ([`qmatmul::QMatMul`]) and `SlmQGather`
//! ([`qgather::QGather`]) on quantized weights ([`Packed`]), `SlmAttention`
//! ([`attention::Attention`]), `SlmKvAttention` ([`kv_attention::KvAttention`], with the KV cache
//! in its state), `SlmLastRows` ([`last_rows::LastRows`], the rows that reach the LM head). The weights do not go through the protobuf: the rewrite leaves
//! them in a registry ([`with_weights`]) under a key that the node's `weights` attribute names.

use std::cell::RefCell;
use std::collections::HashMap;

use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

pub(crate) mod arith;
pub(crate) mod attention;
pub(crate) mod deterministic;
pub(crate) mod gelu;
pub(crate) mod kv_attention;
pub(crate) mod last_rows;
mod packed;
pub(crate) mod qgather;
pub(crate) mod qmatmul;
pub(crate) mod rope;

pub(crate) use packed::Packed;

/// The op types of the rewritten nodes, and their attributes.
pub(crate) const QMATMUL: &str = "SlmQMatMul";
pub(crate) const QGATHER: &str = "SlmQGather";
pub(crate) const ATTENTION: &str = "SlmAttention";
pub(crate) const KV_ATTENTION: &str = "SlmKvAttention";
pub(crate) const LAST_ROWS: &str = "SlmLastRows";
/// String attribute of `SlmQMatMul` and `SlmQGather`: the key of their weights.
pub(crate) const WEIGHTS: &str = "weights";
/// Float attribute of `SlmAttention`: the factor of the scores.
pub(crate) const SCALE: &str = "scale";
/// Int attribute of `SlmKvAttention`: the decoder layer whose cache it keeps.
pub(crate) const LAYER: &str = "layer";

thread_local! {
    /// Weights of the rewritten nodes, by key, while tract parses the rewritten protobuf.
    static PENDING: RefCell<HashMap<String, Packed>> = RefCell::new(HashMap::new());
}

/// Registers the builders of our ops in tract's ONNX front end.
pub(crate) fn register(onnx: &mut tract_onnx::Onnx) {
    onnx.op_register.insert(QMATMUL, qmatmul::build);
    onnx.op_register.insert(QGATHER, qgather::build);
    onnx.op_register.insert(ATTENTION, attention::build);
    onnx.op_register.insert(KV_ATTENTION, kv_attention::build);
    onnx.op_register.insert(LAST_ROWS, last_rows::build);
}

/// Runs `f` (the parse of a rewritten protobuf) with `weights` available to the op builders.
/// They are dropped when `f` returns or panics (tract's front end panics on some malformed
/// graphs; a caller that catches it must not keep the model's weights alive on this thread).
pub(crate) fn with_weights<R>(weights: HashMap<String, Packed>, f: impl FnOnce() -> R) -> R {
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            PENDING.with(|p| p.borrow_mut().clear());
        }
    }
    PENDING.with(|p| *p.borrow_mut() = weights);
    let _clear = Clear;
    f()
}

/// The weights that the `weights` attribute of `node` names.
fn pending_weights(node: &pb::NodeProto) -> TractResult<Packed> {
    let key = node
        .attribute
        .iter()
        .find(|a| a.name == WEIGHTS)
        .map(|a| String::from_utf8_lossy(&a.s).to_string())
        .context("SlmQMatMul without a weights key")?;
    PENDING
        .with(|p| p.borrow().get(&key).cloned())
        .with_context(|| format!("{}: no weights {key}", node.op_type))
}

/// The node that produces `outlet`, when its one output has one reader (a fused
/// pattern's next node) and is not a model output: the fusions (rope.rs, gelu.rs) take in only
/// values nothing else reads.
pub(crate) fn read_once(model: &TypedModel, outlet: OutletId) -> Option<&TypedNode> {
    let node = model.node(outlet.node);
    let returned = model.outputs.contains(&outlet);
    (node.outputs.len() == 1 && node.outputs[0].successors.len() == 1 && !returned).then_some(node)
}

/// The type and shape rules of an op of ours with one output, for tract's inference front end.
pub(crate) trait Rules: TypedOp + Clone {
    /// How many inputs it takes.
    const INPUTS: usize;

    /// The rules, arities checked.
    fn rules<'r>(&'r self, s: &mut Solver<'r>, io: Io<'r>) -> InferenceResult;
}

/// The proxies of an op's inputs and outputs, for its [`Rules`].
pub(crate) struct Io<'r> {
    pub(crate) inputs: &'r [TensorProxy],
    pub(crate) outputs: &'r [TensorProxy],
}

/// The inference-time face of an op of ours: its [`Rules`]; in the typed graph, the op itself.
#[derive(Debug, Clone)]
pub(crate) struct Inferred<T>(pub(crate) T);

impl<T: Rules> Expansion for Inferred<T> {
    fn name(&self) -> StaticName {
        self.0.name()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, T::INPUTS)?;
        check_output_arity(outputs, 1)?;
        self.0.rules(s, Io { inputs, outputs })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.0.clone(), &inputs[..T::INPUTS])
    }
}
