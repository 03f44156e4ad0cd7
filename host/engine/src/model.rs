//! Loading an ONNX decoder into an optimized tract plan, and what the session needs to know of it.

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::{attention, proto, quant, EngineError};

/// The ONNX front end, with our int8 matmul and fused attention.
fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    quant::register(&mut onnx);
    attention::register(&mut onnx);
    onnx
}

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
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("inputs", &self.input_names)
            .field("info", &self.info)
            .finish()
    }
}

/// Uses every core for matrix products (native builds with the `threads` feature); `n` <= 1 runs
/// single-threaded.
pub fn set_threads(n: usize) {
    #[cfg(feature = "threads")]
    {
        use tract_linalg::multithread::{set_default_executor, Executor};
        set_default_executor(if n > 1 {
            Executor::multithread(n)
        } else {
            Executor::SingleThread
        });
        crate::spin::set_threads(n);
    }
    #[cfg(not(feature = "threads"))]
    let _ = n;
}

/// Hands the heap pages that loading freed (the decoded protobuf, in pieces of a few hundred KB
/// that glibc keeps for reuse) back to the OS: ~10 MiB less resident for the process's life.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only returns unused heap memory to the OS.
        unsafe { malloc_trim(0) };
    }
}

pub(crate) fn input_kind(name: &str) -> InputKind {
    match name {
        "input_ids" => InputKind::InputIds,
        "position_ids" => InputKind::PositionIds,
        "attention_mask" => InputKind::AttentionMask,
        _ => {
            let past = name.strip_prefix("past_key_values.").and_then(|rest| {
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

impl Model {
    /// Loads `model.onnx` (external data files next to it are found by tract).
    pub fn load(path: &Path) -> Result<Model, EngineError> {
        let name = path.display().to_string();
        if !path.is_file() {
            return Err(EngineError::load(&name, "file not found"));
        }
        let onnx = onnx();
        let mut q4 = quant::Q4Stream::default();
        let proto = proto::read_path(path, &mut q4).map_err(|e| EngineError::load(&name, e))?;
        let dir = path.parent().and_then(|d| d.to_str());
        let model = Self::parse(&onnx, proto, q4, dir).map_err(|e| EngineError::load(&name, e))?;
        let model = Self::optimize(model, &name);
        release_free_memory();
        model
    }

    /// Loads an ONNX model from memory (wasi:nn `load` with the file's bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Model, EngineError> {
        let onnx = onnx();
        let mut q4 = quant::Q4Stream::default();
        let proto =
            proto::read_bytes(bytes, &mut q4).map_err(|e| EngineError::load("<bytes>", e))?;
        let model =
            Self::parse(&onnx, proto, q4, None).map_err(|e| EngineError::load("<bytes>", e))?;
        let model = Self::optimize(model, "<bytes>");
        release_free_memory();
        model
    }

    /// Parses the protobuf after fusing its attention chains ([`attention::Attention`]) and
    /// moving its int8 and Q4_1 weights into [`quant::QMatMul`] nodes.
    fn parse(
        onnx: &tract_onnx::Onnx,
        mut proto: tract_onnx::pb::ModelProto,
        q4: quant::Q4Stream,
        dir: Option<&str>,
    ) -> TractResult<InferenceModel> {
        let mut weights = q4.finish(&mut proto);
        attention::rewrite(&mut proto);
        quant::rewrite(&mut proto, &mut weights);
        let parsed = quant::with_weights(weights, || onnx.parse(&proto, dir))?;
        drop(proto);
        if !parsed.unresolved_inputs.is_empty() {
            return Err(tract_onnx::tract_core::internal::format_err!(
                "could not resolve inputs {:?}",
                parsed.unresolved_inputs
            ));
        }
        Ok(parsed.model)
    }

    fn optimize(model: InferenceModel, name: &str) -> Result<Model, EngineError> {
        let input_names: Vec<String> = model
            .input_outlets()
            .map_err(|e| EngineError::load(name, e))?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let output_names: Vec<String> = model
            .output_outlets()
            .map_err(|e| EngineError::load(name, e))?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            })
            .collect();
        let typed = model
            .into_optimized()
            .map_err(|e| EngineError::load(name, e))?;
        let input_kinds: Vec<InputKind> = input_names.iter().map(|n| input_kind(n)).collect();
        if !input_kinds.contains(&InputKind::InputIds) {
            return Err(EngineError::load(
                name,
                "the model has no `input_ids` input: not a decoder",
            ));
        }
        let info = Self::read_info(&typed, &input_kinds, &output_names)
            .map_err(|e| EngineError::load(name, e))?;
        let plan = typed
            .into_runnable()
            .map_err(|e| EngineError::load(name, e))?;
        Ok(Model {
            plan,
            input_names,
            input_kinds,
            output_names,
            info,
        })
    }

    pub(crate) fn read_info(
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
        for (i, kind) in kinds.iter().enumerate() {
            if let InputKind::Past { layer, .. } = kind {
                info.layers = info.layers.max(layer + 1);
                let fact = typed.input_fact(i)?;
                // [batch, kv_heads, past, head_dim]: heads and head_dim are concrete.
                if fact.rank() == 4 {
                    info.kv_heads = fact.shape[1].as_i64().unwrap_or(0) as usize;
                    info.head_dim = fact.shape[3].as_i64().unwrap_or(0) as usize;
                }
            }
        }
        if let Some(i) = outputs.iter().position(|n| n == "logits") {
            let fact = typed.output_fact(i)?;
            info.vocab = fact.shape.last().and_then(|d| d.as_i64()).unwrap_or(0) as usize;
        }
        Ok(info)
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// How many matrix products of the plan run on int8 weights (our [`quant::QMatMul`]).
    #[doc(hidden)]
    pub fn int8_matmuls(&self) -> usize {
        self.plan
            .model()
            .nodes()
            .iter()
            .filter(|n| {
                n.op_as::<quant::QMatMul>()
                    .is_some_and(|q| !q.is_q4_1() && !q.is_q8_head())
            })
            .count()
    }

    /// How many matrix products of the plan run on int8 weights with 8-bit activations (the
    /// tied LM head of a Q4_1 model).
    #[doc(hidden)]
    pub fn q8_heads(&self) -> usize {
        self.plan
            .model()
            .nodes()
            .iter()
            .filter(|n| n.op_as::<quant::QMatMul>().is_some_and(|q| q.is_q8_head()))
            .count()
    }

    /// How many matrix products of the plan run on Q4_1 weights (our [`quant::QMatMul`]).
    #[doc(hidden)]
    pub fn q4_1_matmuls(&self) -> usize {
        self.plan
            .model()
            .nodes()
            .iter()
            .filter(|n| n.op_as::<quant::QMatMul>().is_some_and(|q| q.is_q4_1()))
            .count()
    }

    /// How many row lookups of the plan read int8 tables shared with a [`quant::QMatMul`].
    #[doc(hidden)]
    pub fn int8_gathers(&self) -> usize {
        self.plan
            .model()
            .nodes()
            .iter()
            .filter(|n| n.op_is::<quant::QGather>())
            .count()
    }

    /// How many attention chains of the plan run fused ([`attention::Attention`]).
    #[doc(hidden)]
    pub fn fused_attentions(&self) -> usize {
        self.plan
            .model()
            .nodes()
            .iter()
            .filter(|n| n.op_is::<attention::Attention>())
            .count()
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
