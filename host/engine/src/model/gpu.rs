//! The GPU plan: a plain tract-onnx parse (none of our CPU rewrites: tract-cuda does not know our
//! ops; tract folds the int8 `Cast * scale` weights to f32, the block-quantized products and
//! `GatherBlocks` tables are dequantized to f32 here, the batch axis pinned to one),
//! decluttered, with tract-transformers' rotary-embedding pattern detected, then prepared by the
//! `cuda` [`Runtime`](tract_onnx::tract_core::runtime::Runtime). It is an ordinary `TypedSimplePlan`
//! with the same inputs and outputs, so [`crate::Session`] (stateful KV cache, rewinds,
//! [`crate::KvSnapshot`]) runs it unchanged: the KV tensors stay host tensors between steps.
//! The same graph optimized for the CPU ([`Model::load_plain`]) tests all of it but tract-cuda.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tract_onnx::pb;
use tract_onnx::prelude::*;
#[allow(unused_imports)]
use tract_onnx::tract_core::internal::TractErrorContext as _;

use super::{decoder_inputs, io_names, Model};
use crate::onnx::graph::{prune, set_op, FLOAT};
use crate::onnx::{batch, nbits, proto};
use crate::{names, EngineError};

/// A model file, or its bytes (wasi:nn `load`).
#[derive(Clone, Copy)]
pub(super) enum Source<'a> {
    Path(&'a Path),
    Bytes(&'a [u8]),
}

impl Source<'_> {
    fn name(&self) -> String {
        match self {
            Source::Path(p) => p.display().to_string(),
            Source::Bytes(_) => "<bytes>".to_string(),
        }
    }
}

/// Replaces every block-quantized product (`MatMulNBits`, our offset ops) by a `MatMul` on its
/// dequantized f32 weight, and every `GatherBlocks` lookup that shares a product's table (a tied
/// 8-bit embedding) by a `Gather` on the dequantized rows, for front ends that do not run them
/// (tract's own import has no zero points and knows none of our ops; the GPU plan runs f32).
fn dequantize_nbits(proto: &mut pb::ModelProto) {
    let Some(graph) = proto.graph.as_mut() else {
        return;
    };
    let mut dense = vec![];
    let mut tables = vec![];
    {
        let inits: HashMap<&str, &pb::TensorProto> = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        // Each product read once, by its node and by the name of its `B` (a lookup's key).
        let products: Vec<(usize, nbits::NBits)> = graph
            .node
            .iter()
            .enumerate()
            .filter_map(|(i, n)| Some((i, nbits::nbits(n, |name| inits.get(name).copied())?)))
            .collect();
        let by_table: HashMap<&str, &(usize, nbits::NBits)> = products
            .iter()
            .map(|p| (graph.node[p.0].input[1].as_str(), p))
            .collect();
        for (i, w) in &products {
            let mut kn = vec![0u8; w.k * w.n * 4];
            for c in 0..w.n {
                for kk in 0..w.k {
                    let v = w.value(c, kk);
                    kn[(kk * w.n + c) * 4..][..4].copy_from_slice(&v.to_le_bytes());
                }
            }
            dense.push((*i, w.k, w.n, kn));
        }
        for (i, node) in graph.node.iter().enumerate() {
            if !nbits::is_gather_blocks(node) {
                continue;
            }
            // The lookup reads its product's B and scales: rows of that weight, [N][K].
            let Some((head, w)) = by_table.get(node.input[1].as_str()) else {
                continue;
            };
            if graph.node[*head].input.get(2) != node.input.get(2) {
                continue;
            }
            let mut nk = Vec::with_capacity(w.k * w.n * 4);
            for c in 0..w.n {
                for kk in 0..w.k {
                    nk.extend_from_slice(&w.value(c, kk).to_le_bytes());
                }
            }
            tables.push((i, w.k, w.n, nk));
        }
    }
    for (i, k, n, raw) in dense {
        let name = format!("{}_dequantized", graph.node[i].input[1]);
        let x = std::mem::take(&mut graph.node[i].input[0]);
        set_op(&mut graph.node[i], "MatMul", vec![x, name.clone()], vec![]);
        graph.initializer.push(f32_initializer(name, [k, n], raw));
    }
    for (i, k, n, raw) in tables {
        let name = format!("{}_rows", graph.node[i].input[1]);
        let ids = std::mem::take(&mut graph.node[i].input[0]);
        set_op(
            &mut graph.node[i],
            "Gather",
            vec![name.clone(), ids],
            vec![],
        );
        graph.initializer.push(f32_initializer(name, [n, k], raw));
    }
    prune(graph);
}

fn f32_initializer(name: String, dims: [usize; 2], raw_data: Vec<u8>) -> pb::TensorProto {
    pb::TensorProto {
        name,
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: FLOAT,
        raw_data,
        ..Default::default()
    }
}

/// The ONNX front end without our CPU rewrites (the GPU plan's, and [`Model::load_plain`]'s).
fn parse_plain(source: Source, name: &str) -> Result<InferenceModel, EngineError> {
    let (proto, dir) = match source {
        Source::Path(path) => {
            if !path.is_file() {
                return Err(EngineError::load(name, "file not found"));
            }
            (
                proto::read_path(path, &mut proto::KeepAll),
                path.parent().and_then(|d| d.to_str()),
            )
        }
        Source::Bytes(bytes) => (proto::read_bytes(bytes, &mut proto::KeepAll), None),
    };
    let mut proto = proto.map_err(|e| EngineError::load(name, e))?;
    dequantize_nbits(&mut proto);
    // One sequence per session, as on the CPU: Optimum exports' masks need the batch a number.
    if let Some(graph) = proto.graph.as_mut() {
        batch::pin_to_one(graph);
    }
    let parsed = tract_onnx::onnx()
        .parse(&proto, dir)
        .map_err(|e| EngineError::load(name, e))?;
    drop(proto);
    if !parsed.unresolved_inputs.is_empty() {
        return Err(EngineError::load(
            name,
            format!("could not resolve inputs {:?}", parsed.unresolved_inputs),
        ));
    }
    Ok(parsed.model)
}

/// Typed, decluttered, with the rotary embeddings detected (tract's GPU kernel for them). The
/// KV cache stays in the inputs and outputs (no `detect_kv_cache`): the session owns it.
///
/// The scaled masked softmax is left as its scale, mask and `Softmax`: tract-cuda 0.23.9's fused
/// kernel for exactly 128 columns is instantiated with a block of 126 (nn.cu), so at 128 keys
/// (a 128-token prompt, or the decode step that reaches 128) every score row came out wrong:
/// logits off by up to 4 on the real model, found by scripts/gpu-check on an H200.
fn plain_typed(model: InferenceModel) -> TractResult<TypedModel> {
    let mut typed = model.into_typed()?.into_decluttered()?;
    if let Some(t) = tract_onnx::tract_core::transform::get_transform("detect_apply_rope")? {
        t.transform(&mut typed)?;
    }
    typed.declutter()?;
    Ok(typed)
}

/// The names of the nodes from each `past_key_values.*` input up to (and with) the Concat that
/// appends the step's keys or values to it.
#[cfg_attr(not(feature = "gpu"), allow(dead_code))]
fn past_concats(model: &TypedModel) -> Vec<String> {
    let mut names = Vec::new();
    for input in model.input_outlets().unwrap_or(&[]) {
        if !model
            .node(input.node)
            .name
            .starts_with(names::PAST_KEY_VALUES_PREFIX)
        {
            continue;
        }
        let mut frontier = vec![*input];
        for _depth in 0..4 {
            let mut next = Vec::new();
            for outlet in frontier {
                for succ in &model.outlet_successors(outlet)[..] {
                    let node = model.node(succ.node);
                    names.push(node.name.clone());
                    if !node.op().name().contains("Concat") {
                        next.extend(
                            (0..node.outputs.len()).map(|slot| OutletId::new(node.id, slot)),
                        );
                    }
                }
            }
            frontier = next;
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Extra nodes the GPU plan keeps on the CPU: `SLM_GPU_FORCE_CPU`, comma-separated node-name
/// substrings or `op:NAME` (every node whose op's name contains NAME). A diagnostic for
/// scripts/gpu-check: keeping one kind of op on the CPU at a time finds the GPU kernel behind a
/// difference. When set, the op kinds of the graph and what was kept are printed on stderr.
fn forced_on_cpu(model: &TypedModel) -> Vec<String> {
    let Ok(spec) = std::env::var("SLM_GPU_FORCE_CPU") else {
        return vec![];
    };
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for node in model.nodes() {
        *kinds.entry(node.op().name().to_string()).or_default() += 1;
    }
    let mut names = vec![];
    for pat in spec.split(',').filter(|p| !p.is_empty()) {
        match pat.strip_prefix("op:") {
            Some(op) => names.extend(
                model
                    .nodes()
                    .iter()
                    .filter(|n| n.op().name().contains(op))
                    .map(|n| n.name.clone()),
            ),
            None => names.push(pat.to_string()),
        }
    }
    eprintln!(
        "SLM_GPU_FORCE_CPU={spec:?}: {} nodes kept on the CPU; op kinds: {kinds:?}",
        names.len()
    );
    names
}

impl Model {
    /// The GPU plan's graph (plain tract-onnx, f32 weights, transformer patterns detected),
    /// optimized for the CPU: what a GPU run is compared with, and a test of everything in the
    /// GPU path but tract-cuda itself.
    #[doc(hidden)]
    pub fn load_plain(path: &Path) -> Result<Model, EngineError> {
        Self::load_with(Source::Path(path), |typed| {
            forced_on_cpu(&typed);
            Ok(typed.into_optimized()?.into_runnable()?)
        })
    }

    /// The nodes the GPU plan keeps on the CPU (each KV cache input up to its Concat).
    #[doc(hidden)]
    pub fn gpu_cpu_nodes(path: &Path) -> Result<Vec<String>, EngineError> {
        let name = path.display().to_string();
        let typed = plain_typed(parse_plain(Source::Path(path), &name)?)
            .map_err(|e| EngineError::load(&name, e))?;
        Ok(past_concats(&typed))
    }

    #[cfg(not(feature = "gpu"))]
    pub(super) fn load_gpu(_source: Source) -> Result<Model, EngineError> {
        Err(EngineError::Runtime(super::device::NOT_BUILT.to_string()))
    }

    #[cfg(feature = "gpu")]
    pub(super) fn load_gpu(source: Source) -> Result<Model, EngineError> {
        super::device::gpu().map_err(EngineError::Runtime)?;
        Self::load_with(source, |typed| {
            use tract_onnx::tract_core::runtime::runtime_for_name;
            // Naming the crate links it, and with it the `cuda` runtime it registers.
            let _ = tract_cuda::CudaTransform;
            let rt = runtime_for_name("cuda")?.context("tract's cuda runtime is not registered")?;
            // The KV cache inputs are empty on a session's first step, and CUDA does not allocate
            // 0 bytes (cuMemAlloc: invalid value): keep each past -> Concat on the CPU, so only
            // the (never empty) concatenation crosses to the GPU.
            let mut on_cpu = past_concats(&typed);
            on_cpu.extend(forced_on_cpu(&typed));
            let on_cpu = on_cpu.join(",");
            let knobs = tract_onnx::tract_core::tract_data::knobs::KnobScope::new([(
                "TRACT_CUDA_FORCE_CPU",
                on_cpu.as_str(),
            )])?;
            // tract-cuda panics (`expect`) when it cannot create its context or streams.
            let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                knobs.enter(|| rt.prepare(typed))
            }))
            .map_err(|p| {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tract_onnx::tract_core::internal::format_err!("tract-cuda failed: {msg}")
            })??;
            prepared
                .typed_plan()
                .cloned()
                .context("the cuda runtime did not build a tract plan")
        })
    }

    fn load_with(
        source: Source,
        prepare: impl FnOnce(TypedModel) -> TractResult<Arc<TypedRunnableModel>>,
    ) -> Result<Model, EngineError> {
        let name = source.name();
        let model = parse_plain(source, &name)?;
        let io = io_names(&model).map_err(|e| EngineError::load(&name, e))?;
        let input_kinds = decoder_inputs(&io.0, &name)?;
        let typed = plain_typed(model).map_err(|e| EngineError::load(&name, e))?;
        Self::build(&name, typed, io, input_kinds, prepare)
    }
}
