//! wasi:nn (`wasi:nn@0.2.0-rc-2024-10-28`) for the host's guests, on slm-engine.
//!
//! Shaped like wasmtime-wasi-nn's `WasiNnView`: per-instance state ([`NnCtx`]) plus a view
//! ([`NnView`]) that borrows it with the instance's resource table, and [`add_to_linker`]; the
//! WIT glue is written once, here. We do not use wasmtime-wasi-nn's own glue because it reports
//! every backend failure as `runtime-error` and drops the error's cause from its message: our
//! guests tell a bad request (`invalid-argument`) from a failing engine. Everything that is not
//! glue (tensor checks, error kinds, the stateful context, the prefix cache) is in the
//! `slm-wasi-nn` crate, which the in-wasm wasi:nn (guest/nn) shares.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use slm_engine::{Device, Model, Placement};
use slm_wasi_nn::names::{CACHED_TOKENS, INPUT_IDS};
use slm_wasi_nn::{ExecContext, NnError, NnTensor, Target};
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::registry::{LazyModel, ModelRegistry};

/// The generated host side of the wasi:nn WIT, with our types as its resources.
pub mod bindings {
    wasmtime::component::bindgen!({
        world: "wasi:nn/ml",
        path: "../wit",
        with: {
            "wasi:nn/graph.graph": crate::wasi_nn::NnGraph,
            "wasi:nn/tensor.tensor": slm_wasi_nn::NnTensor,
            "wasi:nn/inference.graph-execution-context": slm_wasi_nn::ExecContext,
            "wasi:nn/errors.error": slm_wasi_nn::NnError,
        },
        imports: { default: trappable },
    });
}

use bindings::wasi::nn::errors::{self, ErrorCode};
use bindings::wasi::nn::graph::{self, ExecutionTarget, GraphBuilder, GraphEncoding};
use bindings::wasi::nn::inference::{self, NamedTensor};
use bindings::wasi::nn::tensor::{self, TensorData, TensorDimensions, TensorType};

slm_wasi_nn::wit_conversions!(TensorType, ErrorCode, ExecutionTarget);

/// A graph a guest holds: loaded from its bytes (`load`), or a model of the registry (`load-by-name`),
/// loaded once per process and shared with every instance, with its prefix cache.
pub enum NnGraph {
    Loaded(Arc<Model>),
    Registered(Arc<LazyModel>),
}

/// Tokens an instance sent through wasi:nn `compute`.
#[derive(Debug, Default, Clone, Copy)]
pub struct NnStats {
    /// Tokens of multi-token (prefill) steps.
    pub prompt_tokens: u64,
    /// Single-token (decode) steps plus one per prefill: each step's logits yield a token.
    pub generated_tokens: u64,
}

impl NnStats {
    fn record(&mut self, input_tokens: u64) {
        if input_tokens > 1 {
            self.prompt_tokens += input_tokens;
        }
        self.generated_tokens += 1;
    }
}

/// One finished `compute` on a registered model, as [`StepObserver`]s see it.
pub struct Step<'a> {
    pub model: &'a str,
    /// Tokens sent (`input_ids`), and how many of the context's tokens the prefix cache restored.
    pub tokens: u64,
    pub cached_tokens: u64,
    /// Seconds since the instance's previous step, or since `started` for its first.
    pub seconds: f64,
    pub first: bool,
}

/// Receives what an instance's wasi:nn calls do as they happen (`slm serve`'s metrics).
pub trait StepObserver: Send + Sync {
    fn step(&self, step: &Step);
    /// The tokens held in KV caches of `model` changed by `delta`.
    fn kv_tokens(&self, model: &str, delta: i64);
}

/// Per-instance wasi:nn state.
pub struct NnCtx {
    registry: Arc<ModelRegistry>,
    /// What this instance asked of the engine (for the per-request log line).
    pub stats: NnStats,
    observer: Option<Arc<dyn StepObserver>>,
    /// When the instance's work started, then when its last step ended.
    last_step: Instant,
    first_step_done: bool,
    /// Live execution contexts on registered models: their model and the tokens they hold.
    contexts: BTreeMap<u32, (Arc<str>, usize)>,
}

impl NnCtx {
    pub fn new(registry: Arc<ModelRegistry>) -> Self {
        NnCtx {
            registry,
            stats: NnStats::default(),
            observer: None,
            last_step: Instant::now(),
            first_step_done: false,
            contexts: BTreeMap::new(),
        }
    }

    /// Starts a request: its steps go to `observer`, its first step's time counts from
    /// `started`, and `stats` count from zero (an instance may serve several requests).
    pub fn observe(&mut self, observer: Arc<dyn StepObserver>, started: Instant) {
        self.observer = Some(observer);
        self.last_step = started;
        self.first_step_done = false;
        self.stats = NnStats::default();
    }

    /// Context `rep` now holds `held` tokens in its KV cache.
    fn holds(&mut self, rep: u32, held: usize) {
        if let (Some(observer), Some((model, before))) =
            (&self.observer, self.contexts.get_mut(&rep))
        {
            observer.kv_tokens(model, held as i64 - *before as i64);
            *before = held;
        }
    }

    /// Context `rep` finished a step that sent `tokens`.
    fn stepped(&mut self, rep: u32, tokens: u64, cached_tokens: u64) {
        let now = Instant::now();
        let seconds = now.duration_since(self.last_step).as_secs_f64();
        self.last_step = now;
        let first = !std::mem::replace(&mut self.first_step_done, true);
        if let (Some(observer), Some((model, _))) = (&self.observer, self.contexts.get(&rep)) {
            observer.step(&Step {
                model,
                tokens,
                cached_tokens,
                seconds,
                first,
            });
        }
    }

    /// Context `rep` is gone: its KV cache with it.
    fn released(&mut self, rep: u32) {
        if let (Some(observer), Some((model, held))) = (&self.observer, self.contexts.remove(&rep))
        {
            observer.kv_tokens(&model, -(held as i64));
        }
    }
}

impl Drop for NnCtx {
    fn drop(&mut self) {
        for rep in self.contexts.keys().copied().collect::<Vec<_>>() {
            self.released(rep);
        }
    }
}

/// Runs `f`, inference that blocks for a while, without holding up an async runtime it is called
/// from: under `slm serve` (tokio, multi-threaded) the worker first hands its other tasks (other
/// connections, `/health`) to another thread. Elsewhere `f` just runs.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The wasi:nn state of one instance, with the table its resources live in.
pub struct NnView<'a> {
    ctx: &'a mut NnCtx,
    table: &'a mut ResourceTable,
}

impl<'a> NnView<'a> {
    pub fn new(ctx: &'a mut NnCtx, table: &'a mut ResourceTable) -> Self {
        NnView { ctx, table }
    }

    fn get<T: 'static>(&self, r: &Resource<T>) -> wasmtime::Result<&T> {
        Ok(self.table.get(r)?)
    }

    /// The guest dropped its handle.
    fn delete<T: 'static>(&mut self, r: Resource<T>) -> wasmtime::Result<()> {
        self.table.delete(r)?;
        Ok(())
    }

    /// Hands `e` to the guest as an `error` resource.
    fn fail<T>(&mut self, e: NnError) -> wasmtime::Result<Result<T, Resource<NnError>>> {
        tracing::debug!("wasi:nn error {:?}: {}", e.kind, e.message);
        Ok(Err(self.table.push(e)?))
    }
}

struct HasNn;

impl HasData for HasNn {
    type Data<'a> = NnView<'a>;
}

/// Adds wasi:nn to a linker; `view` gives an instance's [`NnView`].
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> NnView<'_>,
) -> wasmtime::Result<()> {
    bindings::wasi::nn::errors::add_to_linker::<T, HasNn>(linker, view)?;
    bindings::wasi::nn::tensor::add_to_linker::<T, HasNn>(linker, view)?;
    bindings::wasi::nn::graph::add_to_linker::<T, HasNn>(linker, view)?;
    bindings::wasi::nn::inference::add_to_linker::<T, HasNn>(linker, view)?;
    Ok(())
}

/// Where a graph a guest loads for `target` runs. `cpu` is the CPU; `gpu` is the GPU when one
/// is usable and the host allows it (`host`: the `--device` option; `cpu` keeps guests off it).
fn placement(target: Target, host: Device) -> Result<Placement, NnError> {
    match target {
        Target::Cpu => Ok(Placement::Cpu),
        Target::Gpu if host == Device::Cpu => {
            Err(target.unsupported("the host runs with --device cpu"))
        }
        Target::Gpu => slm_engine::resolve(Device::Gpu).map_err(|why| target.unsupported(why)),
        Target::Tpu => Err(target.unsupported("")),
    }
}

impl errors::Host for NnView<'_> {}
impl tensor::Host for NnView<'_> {}
impl inference::Host for NnView<'_> {}

impl errors::HostError for NnView<'_> {
    fn code(&mut self, e: Resource<NnError>) -> wasmtime::Result<ErrorCode> {
        self.get(&e).map(|e| to_error_code(e.kind))
    }
    fn data(&mut self, e: Resource<NnError>) -> wasmtime::Result<String> {
        self.get(&e).map(|e| e.message.clone())
    }
    fn drop(&mut self, e: Resource<NnError>) -> wasmtime::Result<()> {
        self.delete(e)
    }
}

impl tensor::HostTensor for NnView<'_> {
    fn new(
        &mut self,
        dimensions: TensorDimensions,
        ty: TensorType,
        data: TensorData,
    ) -> wasmtime::Result<Resource<NnTensor>> {
        let ty = to_dtype(ty);
        let tensor = NnTensor {
            dimensions,
            ty,
            data,
        };
        Ok(self.table.push(tensor)?)
    }
    fn dimensions(&mut self, t: Resource<NnTensor>) -> wasmtime::Result<TensorDimensions> {
        self.get(&t).map(|t| t.dimensions.clone())
    }
    fn ty(&mut self, t: Resource<NnTensor>) -> wasmtime::Result<TensorType> {
        self.get(&t).map(|t| to_tensor_type(t.ty))
    }
    fn data(&mut self, t: Resource<NnTensor>) -> wasmtime::Result<TensorData> {
        self.get(&t).map(|t| t.data.clone())
    }
    fn drop(&mut self, t: Resource<NnTensor>) -> wasmtime::Result<()> {
        self.delete(t)
    }
}

impl graph::Host for NnView<'_> {
    fn load(
        &mut self,
        builders: Vec<GraphBuilder>,
        encoding: GraphEncoding,
        target: ExecutionTarget,
    ) -> wasmtime::Result<Result<Resource<NnGraph>, Resource<NnError>>> {
        if encoding != GraphEncoding::Onnx {
            return self.fail(NnError::invalid_encoding(encoding));
        }
        let loaded = placement(to_target(target), self.ctx.registry.device())
            .and_then(|placement| slm_wasi_nn::load_bytes(&builders, &placement));
        match loaded {
            Ok(model) => Ok(Ok(self.table.push(NnGraph::Loaded(Arc::new(model)))?)),
            Err(e) => self.fail(e),
        }
    }

    fn load_by_name(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Result<Resource<NnGraph>, Resource<NnError>>> {
        match self.ctx.registry.model(&name) {
            Some(model) => {
                let graph = NnGraph::Registered(model.clone());
                Ok(Ok(self.table.push(graph)?))
            }
            None => self.fail(NnError::new(
                slm_wasi_nn::ErrorKind::NotFound,
                format!("no model named {name:?} in the models directory"),
            )),
        }
    }
}

impl graph::HostGraph for NnView<'_> {
    fn init_execution_context(
        &mut self,
        g: Resource<NnGraph>,
    ) -> wasmtime::Result<Result<Resource<ExecContext>, Resource<NnError>>> {
        let (ctx, model) = match self.table.get(&g)? {
            NnGraph::Loaded(model) => (Ok(ExecContext::new(model.clone(), None)), None),
            NnGraph::Registered(lazy) => {
                let lazy = lazy.clone();
                // The first use loads the model: seconds.
                let ctx = blocking(|| lazy.get())
                    .map(|model| ExecContext::new(model, Some(lazy.prefix_cache())))
                    .map_err(NnError::runtime);
                (ctx, Some(Arc::<str>::from(lazy.name())))
            }
        };
        match ctx {
            Ok(ctx) => {
                let r = self.table.push(ctx)?;
                if let Some(model) = model {
                    self.ctx.contexts.insert(r.rep(), (model, 0));
                }
                Ok(Ok(r))
            }
            Err(e) => self.fail(e),
        }
    }
    fn drop(&mut self, g: Resource<NnGraph>) -> wasmtime::Result<()> {
        self.delete(g)
    }
}

impl inference::HostGraphExecutionContext for NnView<'_> {
    fn compute(
        &mut self,
        ctx: Resource<ExecContext>,
        inputs: Vec<NamedTensor>,
    ) -> wasmtime::Result<Result<Vec<NamedTensor>, Resource<NnError>>> {
        // The inputs are the guest's to give: they leave the table here.
        let mut named = Vec::with_capacity(inputs.len());
        for (name, t) in inputs {
            named.push((name, self.table.delete(t)?));
        }
        let tokens = named
            .iter()
            .find(|(n, _)| n == INPUT_IDS)
            .map(|(_, t)| t.dimensions.iter().map(|&d| d as u64).product::<u64>());
        if let Some(tokens) = tokens {
            self.ctx.stats.record(tokens);
        }
        let exec = self.table.get_mut(&ctx)?;
        let result = blocking(|| exec.compute(named));
        let held = exec.cached_len();
        self.ctx.holds(ctx.rep(), held);
        match result {
            Ok(outputs) => {
                let cached = outputs
                    .iter()
                    .find(|(n, _)| n == CACHED_TOKENS)
                    .and_then(|(_, t)| Some(i64::from_le_bytes(t.data.get(..8)?.try_into().ok()?)))
                    .unwrap_or(0);
                self.ctx
                    .stepped(ctx.rep(), tokens.unwrap_or(0), cached.max(0) as u64);
                let mut out = Vec::with_capacity(outputs.len());
                for (name, t) in outputs {
                    out.push((name, self.table.push(t)?));
                }
                Ok(Ok(out))
            }
            Err(e) => self.fail(e),
        }
    }
    fn drop(&mut self, ctx: Resource<ExecContext>) -> wasmtime::Result<()> {
        self.ctx.released(ctx.rep());
        self.delete(ctx)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use bindings::wasi::nn::graph::{Host as _, HostGraph as _};
    use bindings::wasi::nn::inference::HostGraphExecutionContext as _;
    use slm_wasi_nn::names::{LOGITS, POSITION_IDS};
    use slm_wasi_nn::{ErrorKind, NO_GPU};

    use super::*;

    /// The generated test models (`scripts/test` writes the tiny one first).
    fn test_models() -> Arc<ModelRegistry> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-models");
        assert!(
            dir.join("tiny/model.onnx").is_file(),
            "{} is missing: run scripts/test (or slmconv tiny) first",
            dir.display()
        );
        let registry = ModelRegistry::discover_on(&dir, 0, Device::Cpu, Placement::Cpu);
        Arc::new(registry.expect("test models directory"))
    }

    fn borrow<T: 'static>(r: &Resource<T>) -> Resource<T> {
        Resource::new_borrow(r.rep())
    }

    fn i64_tensor(view: &mut NnView<'_>, value: i64) -> Resource<NnTensor> {
        let data = value.to_le_bytes().to_vec();
        tensor::HostTensor::new(view, vec![1, 1], TensorType::I64, data).unwrap()
    }

    /// A long session (a long `slm chat`) must not grow the instance's resource table: `compute`
    /// takes its input tensors out of it, and the guest drops the outputs it has read.
    #[test]
    fn a_2000_step_session_keeps_the_resource_table_flat() {
        let mut ctx = NnCtx::new(test_models());
        let mut table = ResourceTable::new();
        let mut view = NnView::new(&mut ctx, &mut table);
        let graph = view.load_by_name("tiny".into()).unwrap().ok().unwrap();
        let exec = view
            .init_execution_context(borrow(&graph))
            .unwrap()
            .ok()
            .unwrap();
        let mut sizes = Vec::new();
        for step in 0..2000i64 {
            let inputs = vec![
                (INPUT_IDS.to_string(), i64_tensor(&mut view, step % 100)),
                (POSITION_IDS.to_string(), i64_tensor(&mut view, step % 64)),
            ];
            let outputs = view.compute(borrow(&exec), inputs).unwrap();
            let outputs = outputs.unwrap_or_else(|_| panic!("step {step} failed"));
            assert_eq!(outputs[0].0, LOGITS);
            for (_, t) in outputs {
                tensor::HostTensor::drop(&mut view, t).unwrap();
            }
            if step == 9 || step == 1999 {
                sizes.push(view.table.iter_mut().count());
            }
        }
        assert_eq!(sizes[0], 2, "the graph and the context: {sizes:?}");
        assert_eq!(sizes[0], sizes[1], "entries after step 10 and step 2000");
    }

    /// A guest loading a graph for the `gpu` target on a machine without a usable GPU, or a host
    /// run with `--device cpu`: `unsupported-operation` with the reason, before the bytes are
    /// parsed; the cpu target parses them (`invalid-argument` for bytes that are no model).
    #[test]
    fn guest_gpu_target_without_a_gpu_is_refused_with_the_reason() {
        let load = |host: Device, target: ExecutionTarget| {
            let registry =
                ModelRegistry::discover_on(&std::env::temp_dir(), 0, host, Placement::Cpu).unwrap();
            let mut ctx = NnCtx::new(Arc::new(registry));
            let mut table = ResourceTable::new();
            let mut view = NnView::new(&mut ctx, &mut table);
            let builders = vec![b"not a model".to_vec()];
            let err = view.load(builders, GraphEncoding::Onnx, target).unwrap();
            let err = err.err().expect("refused");
            let e = view.table.get(&err).unwrap();
            (to_error_code(e.kind), e.message.clone())
        };
        let (code, msg) = load(Device::Cpu, ExecutionTarget::Gpu);
        assert_eq!(code, ErrorCode::UnsupportedOperation);
        assert_eq!(msg, format!("{NO_GPU}: the host runs with --device cpu"));
        if let Err(why) = slm_engine::gpu() {
            for host in [Device::Auto, Device::Gpu] {
                let (code, msg) = load(host, ExecutionTarget::Gpu);
                assert_eq!(code, ErrorCode::UnsupportedOperation);
                assert_eq!(msg, format!("{NO_GPU}: {why}"));
                assert!(!msg.contains('\n'));
            }
        }
        let (code, msg) = load(Device::Cpu, ExecutionTarget::Tpu);
        assert_eq!(code, ErrorCode::UnsupportedOperation, "{msg}");
        let (code, msg) = load(Device::Cpu, ExecutionTarget::Cpu);
        assert_eq!(code, ErrorCode::InvalidArgument, "{msg}");
        assert!(!msg.contains(NO_GPU), "{msg}");
        assert_eq!(to_error_code(ErrorKind::NotFound), ErrorCode::NotFound);
    }
}
