//! The wasmtime embedding: one Engine, the generator component compiled once (and cached on disk
//! as a `.cwasm` keyed by a content hash), pre-linked once (`InstancePre`), instantiated per use.
//!
//! The guest sees WASI Preview 2 with only the models directory, read-only, at `/models`, stderr,
//! clocks and random; no network, no environment, no other files. wasi:nn is ours (see [`crate::nn`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _, Result};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};
use wasmtime_wasi_nn::backend::{BackendInner, NamedTensor as BackendNamedTensor};
use wasmtime_wasi_nn::GraphRegistry;

use crate::nn::{backend_error_message, is_invalid_argument, ModelRegistry, OnnxBackend};

wasmtime::component::bindgen!({
    world: "generator-component",
    path: "../wit",
    with: {
        "wasi:nn/graph.graph": wasmtime_wasi_nn::Graph,
        "wasi:nn/tensor.tensor": wasmtime_wasi_nn::Tensor,
        "wasi:nn/inference.graph-execution-context": wasmtime_wasi_nn::ExecutionContext,
        "wasi:nn/errors.error": crate::runtime::NnError,
    },
    imports: { default: trappable },
});

pub use edge::slm::types::{
    Error as GuestError, FinishReason, Message, Options, Sampling, Summary,
};

use wasi::nn::errors::ErrorCode;
use wasi::nn::graph::{ExecutionTarget, GraphBuilder, GraphEncoding};
use wasi::nn::tensor::{TensorData, TensorDimensions, TensorType};

/// A wasi:nn error resource: a code and the full message.
#[derive(Debug)]
pub struct NnError {
    code: ErrorCode,
    message: String,
}

/// Per-instance state.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    registry: Arc<ModelRegistry>,
    http: WasiHttpCtx,
    http_hooks: NoOutgoingRequests,
    /// What this instance asked of the engine (for the per-request log line).
    pub stats: NnStats,
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

/// The guests we serve have no business making outgoing HTTP requests.
struct NoOutgoingRequests;

impl WasiHttpHooks for NoOutgoingRequests {
    fn send_request(
        &mut self,
        _request: hyper::Request<wasmtime_wasi_http::p2::body::HyperOutgoingBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn std::future::Future<
                Output = Result<
                    (
                        hyper::Response<wasmtime_wasi_http::p2::body::HyperOutgoingBody>,
                        Box<
                            dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>>
                                + Send,
                        >,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_hooks,
        }
    }
}

impl HostState {
    /// A fresh state: WASI with the models directory read-only at `/models`, stderr, clocks and
    /// random; wasi:nn on the shared registry.
    pub fn new(registry: Arc<ModelRegistry>) -> Result<HostState> {
        let dir = registry.dir();
        let wasi = WasiCtxBuilder::new()
            .inherit_stderr()
            .preopened_dir(dir, "/models", FsPerms::ReadOnly)
            .map_err(|e| {
                anyhow!(
                    "cannot open models directory {}: {}",
                    dir.display(),
                    one_line(&e)
                )
            })?
            .build();
        Ok(HostState {
            wasi,
            table: ResourceTable::new(),
            registry,
            http: WasiHttpCtx::new(),
            http_hooks: NoOutgoingRequests,
            stats: NnStats::default(),
        })
    }
}

/// Adds our wasi:nn (and the `edge:slm/types` instance) to a linker.
pub fn add_nn_to_linker(linker: &mut Linker<HostState>) -> Result<()> {
    type D = HasSelf<HostState>;
    wasi::nn::errors::add_to_linker::<HostState, D>(linker, |s| s).map_err(werr)?;
    wasi::nn::tensor::add_to_linker::<HostState, D>(linker, |s| s).map_err(werr)?;
    wasi::nn::graph::add_to_linker::<HostState, D>(linker, |s| s).map_err(werr)?;
    wasi::nn::inference::add_to_linker::<HostState, D>(linker, |s| s).map_err(werr)?;
    edge::slm::types::add_to_linker::<HostState, D>(linker, |s| s).map_err(werr)?;
    Ok(())
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl HostState {
    fn fail<T>(
        &mut self,
        code: ErrorCode,
        message: String,
    ) -> wasmtime::Result<Result<T, Resource<NnError>>> {
        tracing::debug!("wasi:nn error {code:?}: {message}");
        let r = self.table.push(NnError { code, message })?;
        Ok(Err(r))
    }

    fn backend_fail<T>(
        &mut self,
        e: wasmtime_wasi_nn::backend::BackendError,
    ) -> wasmtime::Result<Result<T, Resource<NnError>>> {
        let code = if is_invalid_argument(&e) {
            ErrorCode::InvalidArgument
        } else {
            ErrorCode::RuntimeError
        };
        self.fail(code, backend_error_message(&e))
    }
}

fn nn_type(t: TensorType) -> wasmtime_wasi_nn::wit::TensorType {
    use wasmtime_wasi_nn::wit::TensorType as T;
    match t {
        TensorType::Fp16 => T::Fp16,
        TensorType::Fp32 => T::Fp32,
        TensorType::Fp64 => T::Fp64,
        TensorType::Bf16 => T::Bf16,
        TensorType::U8 => T::U8,
        TensorType::I32 => T::I32,
        TensorType::I64 => T::I64,
    }
}

fn wit_type(t: wasmtime_wasi_nn::wit::TensorType) -> TensorType {
    use wasmtime_wasi_nn::wit::TensorType as T;
    match t {
        T::Fp16 => TensorType::Fp16,
        T::Fp32 => TensorType::Fp32,
        T::Fp64 => TensorType::Fp64,
        T::Bf16 => TensorType::Bf16,
        T::U8 => TensorType::U8,
        T::I32 => TensorType::I32,
        T::I64 => TensorType::I64,
    }
}

impl edge::slm::types::Host for HostState {}
impl wasi::nn::errors::Host for HostState {}
impl wasi::nn::tensor::Host for HostState {}
impl wasi::nn::inference::Host for HostState {}

impl wasi::nn::errors::HostError for HostState {
    fn code(&mut self, e: Resource<NnError>) -> wasmtime::Result<ErrorCode> {
        Ok(self.table.get(&e)?.code)
    }
    fn data(&mut self, e: Resource<NnError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&e)?.message.clone())
    }
    fn drop(&mut self, e: Resource<NnError>) -> wasmtime::Result<()> {
        self.table.delete(e)?;
        Ok(())
    }
}

impl wasi::nn::tensor::HostTensor for HostState {
    fn new(
        &mut self,
        dimensions: TensorDimensions,
        ty: TensorType,
        data: TensorData,
    ) -> wasmtime::Result<Resource<wasmtime_wasi_nn::Tensor>> {
        let t = wasmtime_wasi_nn::Tensor::new(dimensions, nn_type(ty), data);
        Ok(self.table.push(t)?)
    }
    fn dimensions(
        &mut self,
        t: Resource<wasmtime_wasi_nn::Tensor>,
    ) -> wasmtime::Result<TensorDimensions> {
        Ok(self.table.get(&t)?.dimensions.clone())
    }
    fn ty(&mut self, t: Resource<wasmtime_wasi_nn::Tensor>) -> wasmtime::Result<TensorType> {
        Ok(wit_type(self.table.get(&t)?.ty))
    }
    fn data(&mut self, t: Resource<wasmtime_wasi_nn::Tensor>) -> wasmtime::Result<TensorData> {
        Ok(self.table.get(&t)?.data.clone())
    }
    fn drop(&mut self, t: Resource<wasmtime_wasi_nn::Tensor>) -> wasmtime::Result<()> {
        self.table.delete(t)?;
        Ok(())
    }
}

impl wasi::nn::graph::Host for HostState {
    fn load(
        &mut self,
        builders: Vec<GraphBuilder>,
        encoding: GraphEncoding,
        target: ExecutionTarget,
    ) -> wasmtime::Result<Result<Resource<wasmtime_wasi_nn::Graph>, Resource<NnError>>> {
        if encoding != GraphEncoding::Onnx {
            return self.fail(
                ErrorCode::InvalidEncoding,
                format!("graph encoding {encoding:?} is not supported (only onnx)"),
            );
        }
        let target = match target {
            ExecutionTarget::Cpu => wasmtime_wasi_nn::wit::ExecutionTarget::Cpu,
            ExecutionTarget::Gpu => wasmtime_wasi_nn::wit::ExecutionTarget::Gpu,
            ExecutionTarget::Tpu => wasmtime_wasi_nn::wit::ExecutionTarget::Tpu,
        };
        let slices: Vec<&[u8]> = builders.iter().map(|b| b.as_slice()).collect();
        let mut backend = OnnxBackend {
            host: self.registry.device(),
        };
        match backend.load(&slices, target) {
            Ok(g) => Ok(Ok(self.table.push(g)?)),
            Err(e) => {
                let msg = backend_error_message(&e);
                let code = if msg.contains(crate::nn::NO_GPU) || msg.contains("tpu") {
                    ErrorCode::UnsupportedOperation
                } else {
                    ErrorCode::InvalidArgument
                };
                self.fail(code, msg)
            }
        }
    }

    fn load_by_name(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Result<Resource<wasmtime_wasi_nn::Graph>, Resource<NnError>>> {
        match self.registry.get(&name) {
            Some(g) => {
                let g = g.clone();
                Ok(Ok(self.table.push(g)?))
            }
            None => self.fail(
                ErrorCode::NotFound,
                format!(
                    "no model named {name:?} in {}",
                    self.registry.dir().display()
                ),
            ),
        }
    }
}

impl wasi::nn::graph::HostGraph for HostState {
    fn init_execution_context(
        &mut self,
        g: Resource<wasmtime_wasi_nn::Graph>,
    ) -> wasmtime::Result<Result<Resource<wasmtime_wasi_nn::ExecutionContext>, Resource<NnError>>>
    {
        let graph = self.table.get(&g)?.clone();
        match graph.init_execution_context() {
            Ok(ctx) => Ok(Ok(self.table.push(ctx)?)),
            Err(e) => self.backend_fail(e),
        }
    }
    fn drop(&mut self, g: Resource<wasmtime_wasi_nn::Graph>) -> wasmtime::Result<()> {
        self.table.delete(g)?;
        Ok(())
    }
}

impl wasi::nn::inference::HostGraphExecutionContext for HostState {
    fn compute(
        &mut self,
        ctx: Resource<wasmtime_wasi_nn::ExecutionContext>,
        inputs: Vec<(String, Resource<wasmtime_wasi_nn::Tensor>)>,
    ) -> wasmtime::Result<
        Result<Vec<(String, Resource<wasmtime_wasi_nn::Tensor>)>, Resource<NnError>>,
    > {
        let mut named = Vec::with_capacity(inputs.len());
        if let Some((_, t)) = inputs.iter().find(|(n, _)| n == "input_ids") {
            let dims = &self.table.get(t)?.dimensions;
            let tokens = dims.iter().map(|&d| d as u64).product::<u64>();
            self.stats.record(tokens);
        }
        for (name, t) in inputs {
            // The guest keeps ownership of its tensor handles; copy the data.
            let tensor = self.table.get(&t)?.clone();
            named.push(BackendNamedTensor { name, tensor });
        }
        let exec = self.table.get_mut(&ctx)?;
        match exec.compute_with_io(named) {
            Ok(outputs) => {
                let mut out = Vec::with_capacity(outputs.len());
                for o in outputs {
                    out.push((o.name, self.table.push(o.tensor)?));
                }
                Ok(Ok(out))
            }
            Err(e) => self.backend_fail(e),
        }
    }
    fn drop(&mut self, ctx: Resource<wasmtime_wasi_nn::ExecutionContext>) -> wasmtime::Result<()> {
        self.table.delete(ctx)?;
        Ok(())
    }
}

/// A wasmtime error as one line.
pub fn one_line(e: &wasmtime::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

pub fn werr(e: wasmtime::Error) -> anyhow::Error {
    anyhow!("{}", one_line(&e))
}

/// Where compiled components are cached: `$SLM_CACHE_DIR`, `$XDG_CACHE_HOME/edge-slm`,
/// or `~/.cache/edge-slm`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SLM_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("edge-slm"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("edge-slm"))
}

/// Find a component: explicit path, else next to the executable, else `dist/`.
pub fn find_component(explicit: Option<&Path>, file: &str) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("component {} not found (run scripts/build)", p.display());
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join(file));
        }
    }
    candidates.push(PathBuf::from("dist").join(file));
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        anyhow!(
            "component {file} not found next to the slm executable or in dist/ (run scripts/build)"
        )
    })
}

/// Compile a component, or load it from the `.cwasm` cache.
pub fn load_component(engine: &Engine, path: &Path) -> Result<Component> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read component {}", path.display()))?;
    let mut h = Sha256::new();
    h.update(&bytes);
    {
        use std::hash::{Hash, Hasher};
        let mut s = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut s);
        h.update(s.finish().to_le_bytes());
    }
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let cached = cache_dir().map(|d| d.join(format!("{}.cwasm", &key[..32])));

    if let Some(c) = &cached {
        if c.is_file() {
            // SAFETY: the file was written by `precompile_component` of an engine with the same
            // compatibility hash (part of the key), in a directory we own.
            match unsafe { Component::deserialize_file(engine, c) } {
                Ok(comp) => {
                    tracing::debug!("compile cache hit: {}", c.display());
                    return Ok(comp);
                }
                Err(e) => tracing::debug!(
                    "compile cache entry unusable ({}): recompiling",
                    one_line(&e)
                ),
            }
        }
    }
    tracing::debug!("compile cache miss: compiling {}", path.display());
    let t = std::time::Instant::now();
    let serialized = engine.precompile_component(&bytes).map_err(|e| {
        anyhow!(
            "cannot compile component {}: {}",
            path.display(),
            one_line(&e)
        )
    })?;
    tracing::debug!("compiled in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    if let Some(c) = &cached {
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(c.parent().unwrap())?;
            let tmp = c.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, &serialized)?;
            std::fs::rename(&tmp, c)
        };
        if let Err(e) = write() {
            tracing::debug!("cannot write compile cache {}: {e}", c.display());
        }
    }
    // SAFETY: produced just now by this engine.
    unsafe { Component::deserialize(engine, &serialized) }.map_err(werr)
}

/// The engine, the pre-linked generator component and the shared model registry.
pub struct Runtime {
    pub engine: Engine,
    pre: GeneratorComponentPre<HostState>,
    pub registry: Arc<ModelRegistry>,
}

impl Runtime {
    pub fn new(component: &Path, registry: Arc<ModelRegistry>) -> Result<Runtime> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        let engine = Engine::new(&config).map_err(werr)?;
        let component = load_component(&engine, component)?;
        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(werr)?;
        GeneratorComponent::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(werr)?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| anyhow!("the generator component does not link: {}", one_line(&e)))?;
        let pre = GeneratorComponentPre::new(pre).map_err(werr)?;
        Ok(Runtime {
            engine,
            pre,
            registry,
        })
    }

    /// A fresh store and instance.
    pub fn instantiate(&self) -> Result<(Store<HostState>, GeneratorComponent)> {
        let state = HostState::new(self.registry.clone())?;
        let mut store = Store::new(&self.engine, state);
        let inst = self.pre.instantiate(&mut store).map_err(werr)?;
        Ok((store, inst))
    }
}
