//! `slm serve`: the HTTP component (`wasi:http/incoming-handler`) on wasmtime-wasi-http.
//!
//! The component is compiled and pre-linked once; every request gets a fresh instance (pooling
//! allocator) in its own tokio task. Models, compiled code and the engine are shared by all
//! instances. Concurrent requests run concurrently; wasm yields to the scheduler on epoch ticks
//! so one long generation cannot starve the others, and a request whose client goes away is
//! stopped: the response body's writer fails (streaming), or the task is aborted (not yet
//! answered).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use hyper::server::conn::http1;
use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::WasiHttpView;

use crate::registry::ModelRegistry;
use crate::runtime::{add_nn_to_linker, load_component, one_line, werr, HostState};

/// How often running wasm yields to the scheduler.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// How long to wait before accepting again after an accept failed (e.g. no file descriptors left).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// Instances that may exist at once (each request holds one while it runs).
const MAX_INSTANCES: u32 = 128;

pub struct ServeOptions<'a> {
    pub listen: SocketAddr,
    pub component: &'a Path,
    pub registry: Arc<ModelRegistry>,
}

/// What every request needs: the pre-linked component and the shared models.
struct Server {
    engine: Engine,
    pre: ProxyPre<HostState>,
    registry: Arc<ModelRegistry>,
}

fn engine(pooling: bool) -> wasmtime::Result<Engine> {
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
        // Up to the whole 32-bit space: the portable app holds the model in its linear memory.
        pool.max_memory_size(4 << 30);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    Engine::new(&config)
}

impl Server {
    fn new(component: &Path, registry: Arc<ModelRegistry>) -> Result<Server> {
        // The pooling allocator reserves address space up front; some sandboxes refuse that.
        let engine = match engine(true) {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(
                    "pooling allocator unavailable ({}): allocating on demand",
                    one_line(&e)
                );
                engine(false).map_err(werr)?
            }
        };
        let component = load_component(&engine, component)?;
        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(werr)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(werr)?;
        add_nn_to_linker(&mut linker)?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| anyhow!("the HTTP component does not link: {}", one_line(&e)))?;
        let pre = ProxyPre::new(pre).map_err(|e| {
            anyhow!(
                "the component does not export wasi:http/incoming-handler: {}",
                one_line(&e)
            )
        })?;
        Ok(Server {
            engine,
            pre,
            registry,
        })
    }

    /// Serves one request with a fresh instance.
    async fn handle(
        self: Arc<Self>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<HyperOutgoingBody>> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        // HTTP/1.1 requires Host; without it the request cannot be handed to the component.
        if req.uri().authority().is_none() && !req.headers().contains_key(hyper::header::HOST) {
            eprintln!("{method} {path} 400 no Host header");
            let message = "the request has no Host header".to_string();
            return Ok(error_response(
                hyper::StatusCode::BAD_REQUEST,
                "invalid_request_error",
                message,
            ));
        }

        let mut store = Store::new(&self.engine, HostState::new(self.registry.clone())?);
        store.epoch_deadline_async_yield_and_update(1);
        let status = Arc::new(AtomicU16::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (request, out) = {
            let mut http = store.data_mut().http();
            let request = http.new_incoming_request(Scheme::Http, req).map_err(werr)?;
            let seen = status.clone();
            let out = http
                .new_response_outparam_from_callback(move |resp| {
                    let code = resp.as_ref().map(|r| r.status().as_u16()).unwrap_or(500);
                    seen.store(code, Ordering::Relaxed);
                    let _ = tx.send(resp);
                })
                .map_err(werr)?;
            (request, out)
        };

        let pre = self.pre.clone();
        let task = tokio::spawn(async move {
            let result = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, request, out)
                    .await
            }
            .await;
            let stats = store.data().nn.stats;
            let code = match status.load(Ordering::Relaxed) {
                0 => 500,
                c => c,
            };
            let error = result
                .as_ref()
                .err()
                .map(|e| format!(" error: {}", one_line(e)));
            // The access log: one line per request.
            eprintln!(
                "{method} {path} {code} tokens {}+{} {:.0} ms{}",
                stats.prompt_tokens,
                stats.generated_tokens,
                started.elapsed().as_secs_f64() * 1e3,
                error.unwrap_or_default()
            );
            result
        });
        // Dropped when the client goes away before the response starts: stop its work too.
        let guard = AbortOnDrop(Some(task));

        match rx.await {
            Ok(Ok(resp)) => {
                drop(guard.take()); // the task now feeds the body, and stops when it is dropped
                Ok(resp)
            }
            Ok(Err(code)) => Err(anyhow!("the component answered with an error: {code:?}")),
            Err(_) => {
                // The component finished (or trapped) without setting a response.
                let task = guard.take();
                match task.await {
                    Ok(Ok(())) => Err(anyhow!("the component sent no response")),
                    Ok(Err(e)) => Err(anyhow!("the component failed: {}", one_line(&e))),
                    Err(e) => Err(anyhow!("the request task failed: {e}")),
                }
            }
        }
    }
}

type RequestTask = tokio::task::JoinHandle<wasmtime::Result<()>>;

/// Aborts a task when dropped, unless taken back.
struct AbortOnDrop(Option<RequestTask>);

impl AbortOnDrop {
    fn take(mut self) -> RequestTask {
        self.0.take().expect("taken once")
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// A plain-text 500 for failures outside the component (it answers everything else itself).
fn internal_error(message: String) -> hyper::Response<HyperOutgoingBody> {
    error_response(
        hyper::StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        message,
    )
}

/// An error the host answers itself, in OpenAI's shape.
fn error_response(
    status: hyper::StatusCode,
    kind: &str,
    message: String,
) -> hyper::Response<HyperOutgoingBody> {
    use http_body_util::{BodyExt, Full};
    let body = serde_json::json!({"error": {"message": message, "type": kind, "code": null}});
    let body = Full::new(bytes::Bytes::from(body.to_string()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut resp = hyper::Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Runs the server until Ctrl-C.
pub fn serve(opts: ServeOptions) -> Result<()> {
    let server = Arc::new(Server::new(opts.component, opts.registry)?);
    // Inference blocks the worker running it: keep enough workers for accepting and streaming.
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(16);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("cannot listen on {}", opts.listen))?;
        let addr = listener.local_addr()?;
        let engine = server.engine.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            engine.increment_epoch();
        });
        // Requests that name no model get the default (the generator lists it first).
        let default = server.registry.default_model();
        eprintln!(
            "serving {} on http://{addr} (models: {}{})",
            opts.component.display(),
            server.registry.names().join(", "),
            default
                .map(|m| format!("; default {m}"))
                .unwrap_or_default()
        );
        let mut accept_failing = false;
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("shutting down");
                    return Ok(());
                }
            };
            let stream = match accepted {
                Ok((stream, _)) => {
                    accept_failing = false;
                    stream
                }
                // Out of file descriptors, or a connection gone before it was accepted: the
                // connections already open go on, and accepting resumes once some close. Back
                // off so a full descriptor table does not spin this loop; warn once per streak.
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
            let server = server.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let server = server.clone();
                    async move {
                        match server.handle(req).await {
                            Ok(resp) => Ok::<_, std::convert::Infallible>(resp),
                            Err(e) => {
                                let msg = format!("{e:#}").replace('\n', " ");
                                tracing::warn!("{msg}");
                                Ok(internal_error(msg))
                            }
                        }
                    }
                });
                if let Err(e) = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!("connection ended: {e}");
                }
            });
        }
    })
}
