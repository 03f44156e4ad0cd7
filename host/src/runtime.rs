//! The wasmtime embedding: one Engine, the generator component compiled once (and cached on disk
//! as a `.cwasm` keyed by a content hash), pre-linked once (`InstancePre`), instantiated per use.
//!
//! The guest sees WASI Preview 2 with only the models directory, read-only, at `/models`, stderr,
//! clocks and random; no network, no other files, and no environment but what the host passes on
//! purpose (`slm serve`'s limits). wasi:nn is ours (see [`crate::wasi_nn`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _, Result};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::registry::ModelRegistry;
use crate::wasi_nn::{NnCtx, NnView};

wasmtime::component::bindgen!({
    world: "generator-component",
    path: "../wit",
    // wasi:nn is generated once, in crate::wasi_nn.
    with: {
        "wasi:nn/graph": crate::wasi_nn::bindings::wasi::nn::graph,
        "wasi:nn/tensor": crate::wasi_nn::bindings::wasi::nn::tensor,
        "wasi:nn/inference": crate::wasi_nn::bindings::wasi::nn::inference,
        "wasi:nn/errors": crate::wasi_nn::bindings::wasi::nn::errors,
    },
    imports: { default: trappable },
});

pub use edge::slm::types::{
    Error as GuestError, FinishReason, Format, Message, Options, Sampling, Summary, Tool,
    ToolCallDelta, ToolChoice,
};

/// Per-instance state.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// wasi:nn on the shared registry, and what this instance asked of it.
    pub nn: NnCtx,
    http: WasiHttpCtx,
    http_hooks: NoOutgoingRequests,
    /// Memory the instance may grow to (`slm serve`; unlimited otherwise).
    pub limits: MemoryLimit,
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
        Self::with_env(registry, &[])
    }

    /// [`HostState::new`] with these environment variables for the guest.
    pub fn with_env(registry: Arc<ModelRegistry>, env: &[(&str, String)]) -> Result<HostState> {
        let dir = registry.dir();
        let mut wasi = WasiCtxBuilder::new();
        wasi.inherit_stderr();
        wasi.preopened_dir(dir, "/models", FsPerms::ReadOnly)
            .map_err(|e| {
                anyhow!(
                    "cannot open models directory {}: {}",
                    dir.display(),
                    one_line(&e)
                )
            })?;
        // The sandbox does not follow a link out of `/models`: mount a linked model directory
        // at its own path, where the guest looks for it.
        for (name, target) in registry.linked_dirs() {
            let at = format!("/models/{name}");
            wasi.preopened_dir(target, &at, FsPerms::ReadOnly)
                .map_err(|e| anyhow!("cannot open model directory {name}: {}", one_line(&e)))?;
        }
        for (key, value) in env {
            wasi.env(key, value);
        }
        Ok(HostState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            nn: NnCtx::new(registry),
            http: WasiHttpCtx::new(),
            http_hooks: NoOutgoingRequests,
            limits: MemoryLimit::default(),
        })
    }
}

/// Adds our wasi:nn (and the `edge:slm/types` instance) to a linker.
pub fn add_nn_to_linker(linker: &mut Linker<HostState>) -> Result<()> {
    crate::wasi_nn::add_to_linker(linker, |s| NnView::new(&mut s.nn, &mut s.table))
        .map_err(werr)?;
    edge::slm::types::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)
        .map_err(werr)?;
    Ok(())
}

impl edge::slm::types::Host for HostState {}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
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
    release_freed_memory();
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

/// Hands the allocator's free memory back to the system. Compiling a component frees ~120 MB
/// that glibc's arenas keep (its threads' arenas are not trimmed as the main heap is), and the
/// model loaded next would otherwise come on top of it (Gemma 3's first run: 481 MiB of RSS
/// against 361 once the compiled component is cached).
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// An engine, `component` compiled (or from the cache) and a linker with WASI Preview 2.
pub fn wasi_component(component: &Path) -> Result<(Engine, Component, Linker<HostState>)> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    let engine = Engine::new(&config).map_err(werr)?;
    let component = load_component(&engine, component)?;
    let mut linker: Linker<HostState> = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(werr)?;
    Ok((engine, component, linker))
}

/// The engine, the pre-linked generator component and the shared model registry.
pub struct Runtime {
    pub engine: Engine,
    pre: GeneratorComponentPre<HostState>,
    pub registry: Arc<ModelRegistry>,
}

impl Runtime {
    pub fn new(component: &Path, registry: Arc<ModelRegistry>) -> Result<Runtime> {
        let (engine, component, mut linker) = wasi_component(component)?;
        add_nn_to_linker(&mut linker)?;
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

/// The store's memory limit, and the largest any of the instance's memories has grown to.
pub struct MemoryLimit {
    limits: StoreLimits,
    /// Bytes one memory may grow to.
    pub max: usize,
    pub largest: usize,
}

impl MemoryLimit {
    pub fn new(max: usize) -> MemoryLimit {
        MemoryLimit {
            limits: StoreLimitsBuilder::new().memory_size(max).build(),
            max,
            largest: 0,
        }
    }
}

impl Default for MemoryLimit {
    /// No limit (the CLI's own runs).
    fn default() -> MemoryLimit {
        MemoryLimit {
            limits: StoreLimits::default(),
            max: usize::MAX,
            largest: 0,
        }
    }
}

impl ResourceLimiter for MemoryLimit {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if allowed {
            self.largest = self.largest.max(desired);
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}
