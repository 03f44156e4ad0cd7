//! A loaded model: a runnable tract plan and what the session needs to know of it (its inputs
//! and outputs, the KV cache's shape). Built by the CPU engine ([`cpu`]: our rewrites, ops and
//! kernels) or as the GPU plan ([`gpu`]), on the device that [`device`] selects.

use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::batching::Batcher;
use crate::ops::attention::Attention;
use crate::ops::kv_attention::KvAttention;
use crate::ops::last_rows::LastRows;
use crate::ops::qgather::QGather;
use crate::ops::qmatmul::QMatMul;
use crate::ops::rope::Rope;
#[cfg(doc)]
use crate::Session;
use crate::{names, EngineError};

mod cpu;
mod device;
mod gpu;

pub use cpu::release_free_memory;
pub use device::{gpu, gpu_memory_mib, resolve, Device, GpuInfo, Placement, GPU_BUILT, NOT_BUILT};

/// Shape facts of a decoder, read from its inputs and outputs.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Number of `past_key_values.{i}.key|value` pairs.
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Width of `logits` (0 when the model has no `logits` output).
    pub vocab: usize,
}

/// How the session feeds one model input.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum InputKind {
    InputIds,
    PositionIds,
    AttentionMask,
    Past { layer: usize, value: bool },
    Other,
}

/// A loaded, optimized model, shared (behind `Arc`) by every session that runs it.
pub struct Model {
    pub(crate) plan: Arc<TypedRunnableModel>,
    pub(crate) input_names: Vec<String>,
    pub(crate) input_kinds: Vec<InputKind>,
    pub(crate) output_names: Vec<String>,
    pub(crate) info: ModelInfo,
    /// The plan nodes that keep each layer's KV cache in their state (by layer), when every
    /// layer's does ([`crate::onnx::kv_cache`]); empty when the cache flows through the graph.
    pub(crate) kv_nodes: Vec<usize>,
    /// The plan node keeping the rows that reach the LM head ([`LastRows`]), in a graph that
    /// runs several sequences packed ([`crate::onnx::packing`]).
    pub(crate) rows_node: Option<usize>,
    /// Concurrent sessions' steps, run together ([`crate::batching`]).
    pub(crate) batcher: Batcher,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("inputs", &self.input_names)
            .field("info", &self.info)
            .finish()
    }
}

fn input_kind(name: &str) -> InputKind {
    match name {
        names::INPUT_IDS => InputKind::InputIds,
        names::POSITION_IDS => InputKind::PositionIds,
        names::ATTENTION_MASK => InputKind::AttentionMask,
        _ => {
            let past = name
                .strip_prefix(names::PAST_KEY_VALUES_PREFIX)
                .and_then(|rest| {
                    let (layer, kind) = rest.split_once('.')?;
                    Some(InputKind::Past {
                        layer: layer.parse().ok()?,
                        value: kind == "value",
                    })
                });
            past.unwrap_or(InputKind::Other)
        }
    }
}

/// The names of a parsed model's inputs and of its outputs (by label, else by node name).
fn io_names(model: &InferenceModel) -> TractResult<(Vec<String>, Vec<String>)> {
    let inputs = model
        .input_outlets()?
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    let outputs = model
        .output_outlets()?
        .iter()
        .map(|o| {
            model
                .outlet_label(*o)
                .map(str::to_string)
                .unwrap_or_else(|| model.node(o.node).name.clone())
        })
        .collect();
    Ok((inputs, outputs))
}

/// How the session feeds each input; an error for a model that is not a decoder.
fn decoder_inputs(input_names: &[String], name: &str) -> Result<Vec<InputKind>, EngineError> {
    let input_kinds: Vec<InputKind> = input_names.iter().map(|n| input_kind(n)).collect();
    if !input_kinds.contains(&InputKind::InputIds) {
        return Err(EngineError::load(
            name,
            format!(
                "the model has no `{}` input: not a decoder",
                names::INPUT_IDS
            ),
        ));
    }
    Ok(input_kinds)
}

impl Model {
    /// The model of `typed` (from the model `name`, whose inputs and outputs were read by
    /// [`io_names`] and [`decoder_inputs`]), made runnable by `prepare`.
    fn build(
        name: &str,
        typed: TypedModel,
        (input_names, output_names): (Vec<String>, Vec<String>),
        input_kinds: Vec<InputKind>,
        prepare: impl FnOnce(TypedModel) -> TractResult<Arc<TypedRunnableModel>>,
    ) -> Result<Model, EngineError> {
        let mut info = Self::read_info(&typed, &input_kinds, &output_names)
            .map_err(|e| EngineError::load(name, e))?;
        let plan = prepare(typed).map_err(|e| EngineError::load(name, e))?;
        let kv_nodes = Self::kv_nodes(&plan, &mut info);
        let rows_node = plan
            .model()
            .nodes()
            .iter()
            .find(|n| n.op_is::<LastRows>())
            .map(|n| n.id);
        Ok(Model {
            plan,
            input_names,
            input_kinds,
            output_names,
            info,
            kv_nodes,
            rows_node,
            batcher: Batcher::default(),
        })
    }

    fn read_info(
        typed: &TypedModel,
        kinds: &[InputKind],
        outputs: &[String],
    ) -> TractResult<ModelInfo> {
        let mut info = ModelInfo {
            layers: 0,
            kv_heads: 0,
            head_dim: 0,
            vocab: 0,
        };
        let mut past_inputs = 0;
        for (i, kind) in kinds.iter().enumerate() {
            if let InputKind::Past { layer, .. } = kind {
                past_inputs += 1;
                info.layers = info.layers.max(layer.saturating_add(1));
                let fact = typed.input_fact(i)?;
                // [batch, kv_heads, past, head_dim]: heads and head_dim are concrete.
                if fact.rank() == 4 {
                    info.kv_heads = fact.shape[1].as_i64().unwrap_or(0) as usize;
                    info.head_dim = fact.shape[3].as_i64().unwrap_or(0) as usize;
                }
            }
        }
        // The session holds a KV cache slot for every layer up to the largest number: numbers
        // beyond the inputs there are (`past_key_values.4294967296.key`) are a broken model.
        if info.layers > past_inputs {
            return Err(tract_onnx::tract_core::internal::format_err!(
                "{}{}.* is not among {past_inputs} past inputs numbered from 0",
                names::PAST_KEY_VALUES_PREFIX,
                info.layers - 1
            ));
        }
        if let Some(i) = outputs.iter().position(|n| n == names::LOGITS) {
            let fact = typed.output_fact(i)?;
            info.vocab = fact.shape.last().and_then(|d| d.as_i64()).unwrap_or(0) as usize;
        }
        Ok(info)
    }

    /// The nodes keeping each layer's cache in place, by layer, when there is one per layer. The
    /// rewrite made the KV tensors' width symbolic: `info` takes the head width from the keys.
    fn kv_nodes(plan: &TypedRunnableModel, info: &mut ModelInfo) -> Vec<usize> {
        let model = plan.model();
        let mut nodes = vec![None; info.layers];
        for node in model.nodes() {
            if let Some(op) = node.op_as::<KvAttention>() {
                match nodes.get_mut(op.layer) {
                    Some(slot @ None) => *slot = Some(node.id),
                    _ => return vec![],
                }
                let keys = model.outlet_fact(node.inputs[2]).ok();
                if let Some(d) = keys.and_then(|f| f.shape.get(3).and_then(|d| d.as_i64())) {
                    info.head_dim = d as usize;
                }
            }
        }
        nodes
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default()
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// How many nodes of the plan `f` accepts.
    fn count(&self, f: impl Fn(&TypedNode) -> bool) -> usize {
        self.plan.model().nodes().iter().filter(|n| f(n)).count()
    }

    /// How many matrix products of the plan run on int8 weights (our [`QMatMul`]).
    #[doc(hidden)]
    pub fn int8_matmuls(&self) -> usize {
        self.count(|n| {
            n.op_as::<QMatMul>().is_some_and(|q| {
                !q.is_q4_1() && !q.is_q8_head() && !q.is_q8_blocks() && !q.is_f32()
            })
        })
    }

    /// How many matrix products of the plan run on int8 weights with 8-bit activations (the
    /// tied LM head of a Q4_1 model).
    #[doc(hidden)]
    pub fn q8_heads(&self) -> usize {
        self.count(|n| n.op_as::<QMatMul>().is_some_and(|q| q.is_q8_head()))
    }

    /// How many matrix products of the plan run on int8 blocks (Q8_0, Q5_0, Q6_K weights).
    #[doc(hidden)]
    pub fn q8_block_matmuls(&self) -> usize {
        self.count(|n| n.op_as::<QMatMul>().is_some_and(|q| q.is_q8_blocks()))
    }

    /// How many matrix products of the plan run on 4-bit blocks (Q4_0, Q4_1, Q4_K weights).
    #[doc(hidden)]
    pub fn q4_1_matmuls(&self) -> usize {
        self.count(|n| n.op_as::<QMatMul>().is_some_and(|q| q.is_q4_1()))
    }

    /// How many matrix products of the plan run on f32 weights (our one-order kernel).
    #[doc(hidden)]
    pub fn f32_matmuls(&self) -> usize {
        self.count(|n| n.op_as::<QMatMul>().is_some_and(|q| q.is_f32()))
    }

    /// How many row lookups of the plan read tables shared with a [`QMatMul`] (int8 or f32).
    #[doc(hidden)]
    pub fn table_gathers(&self) -> usize {
        self.count(|n| n.op_is::<QGather>())
    }

    /// How many attention chains of the plan run fused ([`Attention`], [`KvAttention`]).
    #[doc(hidden)]
    pub fn fused_attentions(&self) -> usize {
        self.count(|n| n.op_is::<Attention>() || n.op_is::<KvAttention>())
    }

    /// How many rotary embeddings (`rotate_half` chains) of the plan run fused ([`Rope`]).
    #[doc(hidden)]
    pub fn fused_rotations(&self) -> usize {
        self.count(|n| n.op_is::<Rope>())
    }

    /// Whether the KV cache stays in place in the attention ops' state (else the graph
    /// concatenates it every step).
    #[doc(hidden)]
    pub fn kv_in_place(&self) -> bool {
        !self.kv_nodes.is_empty()
    }

    /// Whether concurrent sessions' steps run together, packed into one run (continuous
    /// batching): graphs of our converters with the KV cache in place and position inputs.
    pub fn packs_sequences(&self) -> bool {
        self.rows_node.is_some()
            && self.kv_in_place()
            && self.input_kinds.contains(&InputKind::PositionIds)
    }

    /// What batching has done with this model's sessions so far.
    #[doc(hidden)]
    pub fn batching_stats(&self) -> crate::BatchingStats {
        self.batcher.stats()
    }

    /// Starts (or stops) timing every node of packed runs (see [`Session::set_profiling`]).
    #[doc(hidden)]
    pub fn set_batch_profiling(&self, on: bool) {
        *self
            .batcher
            .profile
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = on.then(crate::Profile::default);
    }

    /// The timings of packed runs since profiling was turned on; starts a fresh collection.
    #[doc(hidden)]
    pub fn take_batch_profile(&self) -> Option<crate::Profile> {
        let mut p = self
            .batcher
            .profile
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        p.as_mut().map(std::mem::take)
    }

    /// Names of the model's inputs, in order.
    pub fn input_names(&self) -> &[String] {
        &self.input_names
    }

    /// Names of the model's outputs, in order.
    pub fn output_names(&self) -> &[String] {
        &self.output_names
    }
}
