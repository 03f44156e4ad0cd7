//! `slm serve`: the HTTP component (`wasi:http/incoming-handler`) on wasmtime-wasi-http.
//!
//! The component is compiled and pre-linked once; every request gets an instance (pooling
//! allocator) in its own tokio task: an idle one that answered earlier requests cleanly, else a
//! fresh one (instances.rs). Models, compiled code and the engine are shared by all
//! instances. Concurrent requests run concurrently; wasm yields to the scheduler on epoch ticks
//! and inference steps leave the async workers (`wasi_nn::blocking`), so `/health` and other
//! connections keep being served under load. A request whose client goes away is stopped: the
//! response body's writer fails (streaming), or the task is aborted (not yet answered).
//!
//! What a client may cost is bounded by [`Limits`] (README "Security and limits").

mod admission;
mod auth;
mod body;
mod handler;
mod instances;
mod metrics;
mod respond;
mod settled;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use auth::ApiKeys;

use crate::registry::ModelRegistry;
use crate::runtime::{one_line, werr};
use handler::Server;

/// How often running wasm yields to the scheduler.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// How long to wait before accepting again after an accept failed (e.g. no file descriptors left).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// Instances that may exist at once (each request holds one while it runs). Admission keeps
/// generations far below this; the rest are short (`/health`, `/v1/models`, refusals).
const MAX_INSTANCES: u32 = 128;

/// What one client may cost the server: `slm serve`'s flags.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// For a request's headers, and for an idle keep-alive connection.
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// How long requests in progress may take to finish when the server is asked to stop.
    pub drain_timeout: Duration,
    pub max_connections: usize,
    /// Generations per model: running, and waiting for a slot.
    pub max_running: usize,
    pub max_queue: usize,
    /// From a request's arrival to its last byte.
    pub request_timeout: Duration,
    /// Tokens one request may generate (passed to the component as `SLM_MAX_TOKENS`).
    pub max_tokens: u32,
    /// Linear memory of one instance.
    pub instance_memory_bytes: usize,
    /// Requests one instance may answer (1: a fresh instance per request).
    pub instance_reuse: u32,
    /// How long an idle instance is kept for the next request.
    pub instance_idle_timeout: Duration,
    /// Run one completion on the default model before accepting requests.
    pub warm_up: bool,
}

pub struct ServeOptions<'a> {
    pub listen: SocketAddr,
    pub component: &'a Path,
    pub registry: Arc<ModelRegistry>,
    pub limits: Limits,
    pub api_keys: ApiKeys,
}

fn engine(pooling: bool, max_memory: usize) -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    if pooling {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(MAX_INSTANCES);
        // The composed app has a few core instances, each with a memory and a table.
        pool.total_core_instances(MAX_INSTANCES * 8);
        pool.total_memories(MAX_INSTANCES * 4);
        pool.total_tables(MAX_INSTANCES * 8);
        pool.max_memories_per_component(8);
        pool.max_tables_per_component(16);
        pool.max_core_instances_per_component(32);
        // The store's limiter enforces the limit; the pool reserves address space for it.
        pool.max_memory_size(max_memory);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    Engine::new(&config)
}

/// Runs the server until Ctrl-C.
pub fn serve(opts: ServeOptions) -> Result<()> {
    let memory = opts.limits.instance_memory_bytes;
    // The pooling allocator reserves address space up front; some sandboxes refuse that.
    let engine = match engine(true, memory) {
        Ok(e) => e,
        Err(e) => {
            tracing::debug!(
                "pooling allocator unavailable ({}): allocating on demand",
                one_line(&e)
            );
            engine(false, memory).map_err(werr)?
        }
    };
    let server = Arc::new(Server::new(
        engine,
        opts.component,
        opts.registry,
        opts.limits,
        opts.api_keys,
    )?);
    // Inference leaves the async workers (block_in_place), which then need replacing: a few
    // workers are plenty for accepting, parsing and streaming.
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(4);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(accept_loop(server, opts.listen, opts.component))
}

async fn accept_loop(server: Arc<Server>, listen: SocketAddr, component: &Path) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let engine = server.engine.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(EPOCH_TICK);
        engine.increment_epoch();
    });
    // Idle instances past their timeout give their memory back even when no request comes.
    let sweeper = server.clone();
    tokio::spawn(async move {
        let every = (sweeper.limits.instance_idle_timeout / 2).max(Duration::from_secs(1));
        loop {
            tokio::time::sleep(every).await;
            sweeper.drop_expired_instances();
        }
    });
    if server.limits.warm_up {
        let t = std::time::Instant::now();
        match server.warm_up().await {
            Ok(()) => tracing::info!("warmed up in {:.0} ms", t.elapsed().as_secs_f64() * 1e3),
            // The default model is broken: its requests will say so; the others still serve.
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }
    // Requests that name no model get the default (the generator lists it first).
    let default = server.registry.default_model();
    eprintln!(
        "serving {} on http://{addr} (models: {}{})",
        component.display(),
        server.registry.names().join(", "),
        default
            .map(|m| format!("; default {m}"))
            .unwrap_or_default()
    );
    let connections = Arc::new(Semaphore::new(server.limits.max_connections));
    let mut accept_failing = false;
    let graceful = GracefulShutdown::new();
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            signal = &mut stop => {
                drop(listener);
                let drain = server.limits.drain_timeout;
                eprintln!(
                    "{signal}: shutting down ({} connections open; requests in progress get {}s)",
                    graceful.count(),
                    drain.as_secs()
                );
                if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
                    eprintln!("requests still in progress after --drain-timeout: stopped");
                }
                return Ok(());
            }
        };
        let mut stream = match accepted {
            Ok((stream, _)) => {
                accept_failing = false;
                stream
            }
            // Out of file descriptors, or a connection gone before it was accepted: the
            // connections already open go on, and accepting resumes once some close. Back off
            // so a full descriptor table does not spin this loop; warn once per streak.
            Err(e) => {
                if !accept_failing {
                    eprintln!("warning: cannot accept connections: {e} (retrying)");
                    accept_failing = true;
                }
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            // Over the cap: say so and close, without reading the request.
            let max = server.limits.max_connections;
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    stream.write_all(&respond::over_capacity(max)),
                )
                .await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let server = server.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let header_timeout = server.limits.header_timeout;
            let service = hyper::service::service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, std::convert::Infallible>(server.handle(req).await) }
            });
            // The header timeout also closes idle keep-alive connections: hyper starts it
            // whenever it waits for the next request's head.
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            // On shutdown: an idle connection closes, a busy one after its response.
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
}

/// Resolves when the process is asked to stop: Ctrl-C (SIGINT) or SIGTERM (what container
/// runtimes and Kubernetes send); which one.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "interrupt",
            _ = term.recv() => "terminate",
        },
        Err(e) => {
            eprintln!("warning: cannot watch for SIGTERM ({e}): only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            "interrupt"
        }
    }
}
