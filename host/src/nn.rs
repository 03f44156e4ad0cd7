//! wasi:nn on slm-engine: an ONNX backend in the shape of `wasmtime-wasi-nn`'s backend traits,
//! and a model registry discovered from a models directory.
//!
//! Graphs are loaded lazily, once per process: a registry entry wraps a [`LazyModel`] whose
//! first `init-execution-context` loads `model.onnx`; every later context (in any component
//! instance) shares the same `Arc<Model>`. Each execution context owns a stateful
//! [`slm_engine::Session`] (the KV cache stays in the host).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use slm_engine::{DType, Device, EngineError, Model, Placement, Session};

use crate::prefix::PrefixCache;
use wasmtime_wasi_nn::backend::{
    BackendError, BackendExecutionContext, BackendFromDir, BackendGraph, BackendInner, Id,
    NamedTensor,
};
use wasmtime_wasi_nn::wit::{ExecutionTarget, GraphEncoding, TensorType};
use wasmtime_wasi_nn::{ExecutionContext, Graph, GraphRegistry, Tensor};

/// The start of the message a guest gets when it asks for the GPU and there is none (the reason
/// follows: a build without GPU support, no driver, a missing CUDA library, no device).
pub const NO_GPU: &str = "no usable GPU";

fn access(e: impl Into<wasmtime::Error>) -> BackendError {
    BackendError::BackendAccess(e.into())
}

fn access_msg(msg: impl std::fmt::Display) -> BackendError {
    BackendError::BackendAccess(wasmtime::format_err!("{msg}"))
}

/// The full text of a backend error (`BackendError`'s own Display drops the cause).
pub fn backend_error_message(e: &BackendError) -> String {
    match e {
        BackendError::BackendAccess(inner) => format!("{inner:#}"),
        other => other.to_string(),
    }
}

/// Whether a backend error is the caller's fault (bad tensors) rather than the backend's.
pub fn is_invalid_argument(e: &BackendError) -> bool {
    match e {
        BackendError::BackendAccess(inner) => {
            matches!(
                inner.downcast_ref::<EngineError>(),
                Some(EngineError::InvalidInput(_))
            )
        }
        BackendError::UnsupportedTensorType(_) | BackendError::InvalidNumberOfBuilders(..) => true,
        _ => false,
    }
}

/// Where a graph a guest loads with `target` runs. `cpu` is the CPU; `gpu` is the GPU when one
/// is usable and the host allows it (`host`: the `--device` option; `cpu` keeps guests off the GPU).
fn check_target(target: ExecutionTarget, host: Device) -> Result<Placement, BackendError> {
    match target {
        ExecutionTarget::Cpu => Ok(Placement::Cpu),
        ExecutionTarget::Gpu if host == Device::Cpu => Err(access_msg(format!(
            "{NO_GPU}: the host runs with --device cpu"
        ))),
        ExecutionTarget::Gpu => {
            slm_engine::resolve(Device::Gpu).map_err(|why| access_msg(format!("{NO_GPU}: {why}")))
        }
        ExecutionTarget::Tpu => Err(access_msg("the tpu execution target is not supported")),
    }
}

pub fn to_dtype(t: TensorType) -> DType {
    match t {
        TensorType::Fp16 => DType::F16,
        TensorType::Fp32 => DType::F32,
        TensorType::Fp64 => DType::F64,
        TensorType::Bf16 => DType::BF16,
        TensorType::U8 => DType::U8,
        TensorType::I32 => DType::I32,
        TensorType::I64 => DType::I64,
    }
}

pub fn to_tensor_type(t: DType) -> TensorType {
    match t {
        DType::F16 => TensorType::Fp16,
        DType::F32 => TensorType::Fp32,
        DType::F64 => TensorType::Fp64,
        DType::BF16 => TensorType::Bf16,
        DType::U8 => TensorType::U8,
        DType::I32 => TensorType::I32,
        DType::I64 => TensorType::I64,
    }
}

fn to_engine(t: &Tensor) -> Result<slm_engine::Tensor, BackendError> {
    let dims = t.dimensions.iter().map(|&d| d as usize).collect();
    slm_engine::Tensor::new(dims, to_dtype(t.ty), t.data.clone()).map_err(access)
}

fn from_engine(t: slm_engine::Tensor) -> Result<Tensor, BackendError> {
    let dims = t
        .dims
        .iter()
        .map(|&d| u32::try_from(d).map_err(|_| access_msg(format!("dimension {d} too large"))))
        .collect::<Result<Vec<u32>, _>>()?;
    Ok(Tensor::new(dims, to_tensor_type(t.dtype), t.data))
}

/// The ONNX backend: `cpu` runs on slm-engine (tract), `gpu` on its GPU engine where there is
/// one (and the host's `--device`, `host`, is not `cpu`); `tpu` is refused.
#[derive(Default)]
pub struct OnnxBackend {
    pub host: Device,
}

impl BackendInner for OnnxBackend {
    fn encoding(&self) -> GraphEncoding {
        GraphEncoding::Onnx
    }

    fn load(&mut self, builders: &[&[u8]], target: ExecutionTarget) -> Result<Graph, BackendError> {
        let placement = check_target(target, self.host)?;
        if builders.len() != 1 {
            return Err(BackendError::InvalidNumberOfBuilders(1, builders.len()));
        }
        let model = Model::from_bytes_on(builders[0], &placement).map_err(access)?;
        let g: Box<dyn BackendGraph> = Box::new(LoadedGraph(Arc::new(model)));
        Ok(g.into())
    }

    fn as_dir_loadable(&mut self) -> Option<&mut dyn BackendFromDir> {
        Some(self)
    }
}

impl BackendFromDir for OnnxBackend {
    /// Lazy: the model is read on the first `init-execution-context`.
    fn load_from_dir(
        &mut self,
        dir: &Path,
        target: ExecutionTarget,
    ) -> Result<Graph, BackendError> {
        let placement = check_target(target, self.host)?;
        let device = if placement == Placement::Cpu {
            Device::Cpu
        } else {
            Device::Gpu
        };
        let g: Box<dyn BackendGraph> =
            Box::new(LazyModel::new(dir.join("model.onnx"), 0).on(device, placement));
        Ok(g.into())
    }
}

/// A graph loaded from bytes by `wasi:nn/graph.load`.
struct LoadedGraph(Arc<Model>);

impl BackendGraph for LoadedGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        Ok(Context::new(self.0.clone(), None))
    }
}

/// A model file loaded on first use, once per process, with its prefix cache.
pub struct LazyModel {
    path: PathBuf,
    cell: OnceLock<Result<Arc<Model>, String>>,
    prefix: Arc<PrefixCache>,
    /// How long parsing and optimizing took.
    load_ms: OnceLock<f64>,
    /// What was asked (`auto` falls back to the CPU when the GPU plan cannot be built) and where
    /// it goes; `placed` is where the model ended up, once loaded.
    device: Device,
    placement: Placement,
    placed: OnceLock<Placement>,
}

impl LazyModel {
    /// `prefix_cache_bytes`: the prefix cache's size limit (0: no cache).
    pub fn new(path: PathBuf, prefix_cache_bytes: usize) -> Self {
        LazyModel {
            path,
            cell: OnceLock::new(),
            prefix: Arc::new(PrefixCache::new(prefix_cache_bytes)),
            load_ms: OnceLock::new(),
            device: Device::Cpu,
            placement: Placement::Cpu,
            placed: OnceLock::new(),
        }
    }

    /// Loads on `placement` (what `device` resolved to: [`slm_engine::resolve`]).
    pub fn on(mut self, device: Device, placement: Placement) -> Self {
        self.device = device;
        self.placement = placement;
        self
    }

    /// Where the model runs, once loaded.
    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn placed(&self) -> Option<&Placement> {
        self.placed.get()
    }

    fn load(&self) -> Result<Model, EngineError> {
        // The GPU engine panics on some driver failures; `catch_panic` keeps the hook quiet.
        let r = catch_panic(|| Model::load_on(&self.path, &self.placement)).unwrap_or_else(|p| {
            Err(EngineError::Runtime(format!(
                "the engine failed while loading: {p}"
            )))
        });
        let placed = match (&r, &self.placement, self.device) {
            (Err(e), Placement::Gpu(g), Device::Auto) => {
                let why = format!("{e}").replace('\n', " ");
                eprintln!(
                    "warning: cannot run {} on {g}: {why}; using the CPU",
                    self.path.display()
                );
                let _ = self.placed.set(Placement::Cpu);
                return Model::load(&self.path);
            }
            _ => self.placement.clone(),
        };
        let _ = self.placed.set(placed);
        r
    }

    pub fn get(&self) -> Result<Arc<Model>, String> {
        self.cell
            .get_or_init(|| {
                let t = std::time::Instant::now();
                let r = self.load().map(Arc::new).map_err(|e| match e {
                    EngineError::Load { .. } => e.to_string(),
                    other => format!("cannot load model {}: {other}", self.path.display()),
                });
                let _ = self.load_ms.set(t.elapsed().as_secs_f64() * 1e3);
                match &r {
                    Ok(_) => tracing::debug!(
                        "loaded {} on {} in {:.0} ms",
                        self.path.display(),
                        self.placed.get().unwrap_or(&Placement::Cpu),
                        t.elapsed().as_secs_f64() * 1e3
                    ),
                    Err(e) => tracing::debug!("{e}"),
                }
                r
            })
            .clone()
    }
}

/// A registry entry: the graph handed to guests delegates to the shared lazy model.
struct SharedModel(Arc<LazyModel>);

impl BackendGraph for SharedModel {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        self.0.init_execution_context()
    }
}

impl BackendGraph for LazyModel {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        let model = self.get().map_err(access_msg)?;
        Ok(Context::new(model, Some(self.prefix.clone())))
    }
}

thread_local! {
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a panic on this thread is being caught (the panic hook then stays silent).
pub fn panics_are_caught() -> bool {
    QUIET_PANICS.with(|q| q.get())
}

/// Run `f`, turning a panic into an error message.
fn catch_panic<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    QUIET_PANICS.with(|q| q.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(false));
    r.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string())
    })
}

/// Token ids must be in [0, vocab): the engine indexes the embedding table with them.
fn check_ids(inputs: &[(String, slm_engine::Tensor)], vocab: usize) -> Result<(), BackendError> {
    if vocab == 0 {
        return Ok(());
    }
    for (name, t) in inputs {
        if name != "input_ids" {
            continue;
        }
        let ids: Vec<i64> = match t.dtype {
            DType::I64 => t
                .data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            DType::I32 => t
                .data
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
                .collect(),
            _ => continue, // the engine reports the type error
        };
        if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as u64 >= vocab as u64) {
            return Err(access(EngineError::InvalidInput(format!(
                "input_ids: token id {bad} is out of range (vocabulary size {vocab})"
            ))));
        }
    }
    Ok(())
}

/// One execution context: a stateful engine session (KV cache) plus the WITX-style
/// set-input/get-output slots.
struct Context {
    vocab: usize,
    /// Set when the engine panicked: its state can no longer be trusted.
    broken: bool,
    session: Mutex<Session>,
    inputs: Vec<(String, slm_engine::Tensor)>,
    outputs: Vec<(String, slm_engine::Tensor)>,
    /// The token ids in the session's KV cache (what the prefix cache is keyed by).
    tokens: Vec<i64>,
    prefix: Option<Arc<PrefixCache>>,
}

/// A stateful step: the token ids sent and the position of the first.
struct TokenStep {
    ids: Vec<i64>,
    start: usize,
}

fn int_values(t: &slm_engine::Tensor) -> Option<Vec<i64>> {
    match t.dtype {
        DType::I64 => Some(
            t.data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        ),
        DType::I32 => Some(
            t.data
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
                .collect(),
        ),
        _ => None,
    }
}

fn i64_row(values: impl Iterator<Item = i64>) -> slm_engine::Tensor {
    let data: Vec<u8> = values.flat_map(|v| v.to_le_bytes()).collect();
    let n = data.len() / 8;
    slm_engine::Tensor::new(vec![1, n], DType::I64, data).expect("shape matches data")
}

impl Context {
    fn new(model: Arc<Model>, prefix: Option<Arc<PrefixCache>>) -> ExecutionContext {
        let vocab = model.info().vocab;
        let c: Box<dyn BackendExecutionContext> = Box::new(Context {
            vocab,
            broken: false,
            session: Mutex::new(Session::new(model)),
            inputs: Vec::new(),
            outputs: Vec::new(),
            tokens: Vec::new(),
            prefix: prefix.filter(|p| p.enabled()),
        });
        c.into()
    }

    /// The step a stateful call makes (`input_ids` and optional `position_ids`, nothing else);
    /// None for other calls, which the prefix cache leaves alone.
    fn token_step(&self, inputs: &[(String, slm_engine::Tensor)]) -> Option<TokenStep> {
        if inputs
            .iter()
            .any(|(n, _)| n != "input_ids" && n != "position_ids")
        {
            return None;
        }
        let ids = int_values(&inputs.iter().find(|(n, _)| n == "input_ids")?.1)?;
        let start = match inputs.iter().find(|(n, _)| n == "position_ids") {
            Some((_, p)) => usize::try_from(*int_values(p)?.first()?).ok()?,
            None => self.tokens.len(),
        };
        (start <= self.tokens.len() && !ids.is_empty()).then_some(TokenStep { ids, start })
    }
}

/// Seeds `session` from the longest cached prefix of `full` (the tokens the session will hold
/// after this step); returns the inputs still to compute and how many tokens the cache gave.
fn reuse_prefix(
    cache: &PrefixCache,
    session: &mut Session,
    full: &[i64],
    step: &TokenStep,
    inputs: Vec<(String, slm_engine::Tensor)>,
) -> (Vec<(String, slm_engine::Tensor)>, usize) {
    if step.ids.len() < 2 {
        return (inputs, 0);
    }
    let Some((kv, hit)) = cache.lookup(full) else {
        return (inputs, 0);
    };
    // The last token is always computed: its logits are the answer.
    let hit = hit.min(full.len() - 1);
    if hit <= step.start || session.restore(&kv, hit).is_err() {
        return (inputs, 0);
    }
    let inputs = vec![
        (
            "input_ids".to_string(),
            i64_row(full[hit..].iter().copied()),
        ),
        (
            "position_ids".to_string(),
            i64_row((hit as i64)..(full.len() as i64)),
        ),
    ];
    (inputs, hit - step.start)
}

impl Context {
    fn run(
        &mut self,
        inputs: Vec<(String, slm_engine::Tensor)>,
    ) -> Result<Vec<(String, slm_engine::Tensor)>, BackendError> {
        if self.broken {
            return Err(access_msg(
                "this execution context is unusable after an engine failure; create a new one",
            ));
        }
        check_ids(&inputs, self.vocab)?;
        let step = self.token_step(&inputs);
        let Context {
            session,
            tokens,
            prefix,
            broken,
            ..
        } = self;
        let session = session
            .get_mut()
            .map_err(|_| access_msg("execution context poisoned by an earlier failure"))?;
        // The tokens the session holds after this step.
        let full: Option<Vec<i64>> = step.as_ref().map(|s| {
            let mut f = tokens[..s.start].to_vec();
            f.extend_from_slice(&s.ids);
            f
        });
        let (inputs, cached) = match (prefix.as_deref(), &step, &full) {
            (Some(cache), Some(step), Some(full)) => {
                reuse_prefix(cache, session, full, step, inputs)
            }
            _ => (inputs, 0),
        };
        let result = match catch_panic(|| session.run(inputs)) {
            Ok(r) => r.map_err(access),
            Err(panic) => {
                *broken = true;
                Err(access_msg(format!("the inference engine failed: {panic}")))
            }
        };
        let mut outputs = match result {
            Ok(outputs) => outputs,
            Err(e) => {
                tokens.clear();
                session.reset();
                return Err(e);
            }
        };
        *tokens = full.unwrap_or_default();
        if let (Some(cache), Some(step)) = (prefix.as_deref(), &step) {
            if step.ids.len() > 1 {
                cache.insert(tokens, session.snapshot());
                // Tells the guest how much of its prompt was reused (for usage.cached_tokens).
                outputs.push((
                    "cached_tokens".to_string(),
                    i64_row(std::iter::once(cached as i64)),
                ));
            }
        }
        Ok(outputs)
    }
}

impl Drop for Context {
    /// A finished context's tokens (prompt and answer) seed the next turn of the conversation.
    fn drop(&mut self) {
        if let (Some(cache), Ok(session)) = (&self.prefix, self.session.get_mut()) {
            if !self.broken && session.cached_len() == self.tokens.len() {
                cache.insert(&self.tokens, session.snapshot());
            }
        }
    }
}

impl BackendExecutionContext for Context {
    fn set_input(&mut self, id: Id, tensor: &Tensor) -> Result<(), BackendError> {
        let name = match id {
            Id::Name(n) => n,
            Id::Index(i) => {
                return Err(access_msg(format!(
                    "input {i}: inputs are set by name in this backend"
                )))
            }
        };
        let t = to_engine(tensor)?;
        self.inputs.retain(|(n, _)| *n != name);
        self.inputs.push((name, t));
        Ok(())
    }

    fn get_output(&mut self, id: Id) -> Result<Tensor, BackendError> {
        let t = match &id {
            Id::Name(n) => self.outputs.iter().find(|(m, _)| m == n),
            Id::Index(i) => self.outputs.get(*i as usize),
        };
        let t = t.ok_or_else(|| access_msg(format!("no output {id:?}")))?;
        from_engine(t.1.clone())
    }

    fn compute(
        &mut self,
        inputs: Option<Vec<NamedTensor>>,
    ) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        match inputs {
            Some(inputs) => {
                let inputs = inputs
                    .iter()
                    .map(|n| Ok((n.name.clone(), to_engine(&n.tensor)?)))
                    .collect::<Result<Vec<_>, BackendError>>()?;
                let outputs = self.run(inputs)?;
                let outputs = outputs
                    .into_iter()
                    .map(|(name, t)| {
                        Ok(NamedTensor {
                            name,
                            tensor: from_engine(t)?,
                        })
                    })
                    .collect::<Result<Vec<_>, BackendError>>()?;
                Ok(Some(outputs))
            }
            None => {
                let inputs = std::mem::take(&mut self.inputs);
                self.outputs = self.run(inputs)?;
                Ok(None)
            }
        }
    }
}

/// The models of a directory: every subdirectory with a `model.onnx`, named after it.
pub struct ModelRegistry {
    dir: PathBuf,
    graphs: BTreeMap<String, Graph>,
    models: BTreeMap<String, Arc<LazyModel>>,
    device: Device,
}

impl ModelRegistry {
    /// Scan `dir` (not recursive). Nothing is loaded yet. Each model gets a prefix cache of
    /// `prefix_cache_bytes` (0: none) and is to be loaded on `placement` (what `device`, the
    /// host's `--device`, resolved to).
    pub fn discover_on(
        dir: &Path,
        prefix_cache_bytes: usize,
        device: Device,
        placement: Placement,
    ) -> std::io::Result<Self> {
        let mut graphs = BTreeMap::new();
        let mut models = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let model = path.join("model.onnx");
            if !model.is_file() {
                continue;
            }
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let lazy =
                Arc::new(LazyModel::new(model, prefix_cache_bytes).on(device, placement.clone()));
            let g: Box<dyn BackendGraph> = Box::new(SharedModel(lazy.clone()));
            graphs.insert(name.to_string(), g.into());
            models.insert(name.to_string(), lazy);
        }
        Ok(ModelRegistry {
            dir: dir.to_path_buf(),
            graphs,
            models,
            device,
        })
    }

    /// The host's `--device`.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The lazily loaded model `name`.
    pub fn model(&self, name: &str) -> Option<&Arc<LazyModel>> {
        self.models.get(name)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How long loading `name` took, once it is loaded.
    pub fn load_ms(&self, name: &str) -> Option<f64> {
        self.models.get(name)?.load_ms.get().copied()
    }

    /// Empties every model's prefix cache.
    pub fn clear_prefix_caches(&self) {
        for m in self.models.values() {
            m.prefix.clear();
        }
    }

    /// Model names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.graphs.keys().cloned().collect()
    }
}

impl GraphRegistry for ModelRegistry {
    fn get(&self, name: &str) -> Option<&Graph> {
        self.graphs.get(name)
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Graph> {
        self.graphs.get_mut(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest loading a graph for the `gpu` target (wasi:nn `load`) on a machine without a usable
    /// GPU, or a host run with `--device cpu`: a clear error (the runtime maps the `NO_GPU`
    /// prefix to wasi:nn's unsupported-operation), before the bytes are even parsed.
    #[test]
    fn guest_gpu_target_without_a_gpu_is_refused_with_the_reason() {
        let err = |host: Device| {
            let e = OnnxBackend { host }
                .load(&[b"not parsed".as_slice()], ExecutionTarget::Gpu)
                .err()
                .expect("refused");
            backend_error_message(&e)
        };
        let msg = err(Device::Cpu);
        assert_eq!(msg, format!("{NO_GPU}: the host runs with --device cpu"));
        if let Err(why) = slm_engine::gpu() {
            for host in [Device::Auto, Device::Gpu] {
                let msg = err(host);
                assert_eq!(msg, format!("{NO_GPU}: {why}"));
                assert!(!msg.contains('\n'));
            }
        }
        // The cpu target parses the bytes (and fails on these as an invalid model, not a GPU).
        let e = OnnxBackend { host: Device::Cpu }
            .load(&[b"not an onnx model".as_slice()], ExecutionTarget::Cpu)
            .err()
            .expect("not a model");
        assert!(!backend_error_message(&e).contains(NO_GPU));
    }
}
