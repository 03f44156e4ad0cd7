//! One request, from arrival to its last byte: the host's own checks (Host header, API key,
//! body size and time), `/metrics`, admission to a model's slots, then an instance of the
//! component (a warm one when one is idle: instances.rs) under the request's deadline and memory
//! limit.

use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use wasmtime::component::Linker;
use wasmtime::Engine;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::WasiHttpView;

use super::admission::{Admission, Slot};
use super::instances::{InstancePool, Reuse};
use super::metrics::{self, Metrics};
use super::respond::{ApiError, Response};
use super::settled::EndsWhenSettled;
use super::{body, ApiKeys, Limits};
use crate::registry::ModelRegistry;
use crate::runtime::{add_nn_to_linker, load_component, one_line, werr, HostState};
use crate::wasi_nn::{Step, StepObserver};

/// What every request needs: the pre-linked component, the shared models, the limits.
pub struct Server {
    pub engine: Engine,
    instances: Arc<InstancePool>,
    pub registry: Arc<ModelRegistry>,
    pub limits: Limits,
    api_keys: ApiKeys,
    admission: Admission,
    pub metrics: Arc<Metrics>,
}

/// How an instance's work ended.
enum Ended {
    Done(wasmtime::Result<()>),
    /// It ran past the request's deadline and was stopped.
    TimedOut,
}

type RequestTask = tokio::task::JoinHandle<Ended>;

impl Server {
    pub fn new(
        engine: Engine,
        component: &Path,
        registry: Arc<ModelRegistry>,
        limits: Limits,
        api_keys: ApiKeys,
    ) -> Result<Server> {
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
        // KV capacity: --max-running full contexts per model, from config.json, read once.
        let kv_capacity = registry
            .names()
            .into_iter()
            .filter_map(|name| {
                let tokens = registry.context_length(&name)? as f64 * limits.max_running as f64;
                Some((name, tokens))
            })
            .collect();
        // Enough idle instances for every generation that may run at once.
        let reuse = Reuse {
            max_requests: limits.instance_reuse,
            max_idle: (limits.max_running * registry.names().len().max(1))
                .min(super::MAX_INSTANCES as usize / 2),
            idle_timeout: limits.instance_idle_timeout,
        };
        let instances = Arc::new(InstancePool::new(pre, reuse));
        let mut metrics = Metrics::new(kv_capacity);
        metrics.instances(&instances);
        let metrics = Arc::new(metrics);
        let admission = Admission::new(
            registry.names(),
            limits.max_running,
            limits.max_queue,
            metrics.clone(),
        );
        Ok(Server {
            engine,
            instances,
            registry,
            limits,
            api_keys,
            admission,
            metrics,
        })
    }

    /// Serves one request; every answer, the host's or the component's, is logged and counted.
    pub async fn handle(self: Arc<Self>, req: hyper::Request<hyper::body::Incoming>) -> Response {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        match self.clone().answer(req, started).await {
            Ok(resp) => resp,
            Err(e) => {
                let status = e.status.as_u16();
                eprintln!(
                    "{method} {path} {status} {:.0} ms: {}",
                    started.elapsed().as_secs_f64() * 1e3,
                    e.message
                );
                self.metrics.request(&path, status);
                e.into_response()
            }
        }
    }

    async fn answer(
        self: Arc<Self>,
        req: hyper::Request<hyper::body::Incoming>,
        started: Instant,
    ) -> Result<Response, ApiError> {
        let deadline = tokio::time::Instant::from_std(started + self.limits.request_timeout);
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        // HTTP/1.1 requires Host; without it the request cannot be handed to the component.
        if req.uri().authority().is_none() && !req.headers().contains_key(hyper::header::HOST) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "the request has no Host header",
            ));
        }
        let route = metrics::route_label(&path);
        if self.api_keys.needed_for(route) {
            let auth = req.headers().get(hyper::header::AUTHORIZATION);
            if !self.api_keys.allows(auth.map(|v| v.as_bytes())) {
                let message = match auth {
                    None => "no API key: send Authorization: Bearer <key>",
                    Some(_) => "incorrect API key",
                };
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error",
                    message,
                )
                .code("invalid_api_key"));
            }
        }
        if route == "/metrics" && method == Method::GET {
            let text = self.metrics.render(&self.registry);
            // Counted before rendering would count the scrape in itself; count it after.
            self.metrics.request(&path, 200);
            return Ok(super::respond::full(
                text,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ));
        }
        let req = body::read(req, self.limits.max_body_bytes, self.limits.body_timeout).await?;

        // A generation waits for a slot of its model (the default when it names none).
        let generates =
            method == Method::POST && matches!(route, "/v1/chat/completions" | "/v1/completions");
        let model = match generates.then(|| body::requested_model(req.body())) {
            Some(Some(Some(model))) => Some(model),
            Some(Some(None)) => self.registry.default_model(),
            _ => None,
        };
        let slot = match model {
            Some(model) => self.admit(&model, deadline).await?,
            None => None,
        };
        self.run(req, started, deadline, slot, None).await
    }

    async fn admit(
        &self,
        model: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Slot>, ApiError> {
        match tokio::time::timeout_at(deadline, self.admission.admit(model)).await {
            Ok(Ok(slot)) => Ok(slot),
            Ok(Err(full)) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!(
                    "model {} is busy: {} generations running and {} waiting; retry later",
                    full.model, full.running, full.waiting
                ),
            )
            .code("overloaded")
            .retry_after(1)),
            Err(_) => Err(self.timed_out()),
        }
    }

    /// One short completion on the default model before the server takes requests (llama.cpp's
    /// server warms up likewise): the model is loaded, and the instance that ran it waits for the
    /// first request with its tokenizer and chat template parsed. Not counted in `/metrics`.
    pub async fn warm_up(&self) -> Result<()> {
        let Some(model) = self.registry.default_model() else {
            return Ok(());
        };
        let body = serde_json::json!({"model": model, "prompt": "Hello there", "max_tokens": 1});
        let req = hyper::Request::post("/v1/completions")
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(bytes::Bytes::from(body.to_string()))?;
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + self.limits.request_timeout);
        let failed = |why: String| anyhow!("the warm-up completion on model {model} failed: {why}");
        let (done, finished) = tokio::sync::oneshot::channel();
        let resp = self
            .run(req, started, deadline, None, Some(done))
            .await
            .map_err(|e| failed(e.message))?;
        let status = resp.status();
        // Read to the end, so the component finishes writing it.
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| failed(format!("{e:?}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(failed(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        let _ = finished.await;
        Ok(())
    }

    /// Drops idle instances past `--instance-idle-timeout`.
    pub fn drop_expired_instances(&self) {
        self.instances.sweep();
    }

    fn timed_out(&self) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!(
                "the request took longer than this server's limit of {} s",
                self.limits.request_timeout.as_secs()
            ),
        )
        .code("timeout")
    }

    /// Runs the component on the request in an idle or a new instance, in its own task.
    async fn run(
        &self,
        req: hyper::Request<bytes::Bytes>,
        started: Instant,
        deadline: tokio::time::Instant,
        slot: Option<Slot>,
        warm_up: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<Response, ApiError> {
        // The warm-up is not counted, and is told when its instance is back in the idle list.
        let counted = warm_up.is_none();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let internal = |what: &str, e: wasmtime::Error| {
            eprintln!("{method} {path}: {what}: {}", one_line(&e));
            ApiError::internal()
        };
        let env = [("SLM_MAX_TOKENS", self.limits.max_tokens.to_string())];
        let mut instance = self
            .instances
            .take(
                &self.engine,
                &self.registry,
                &env,
                self.limits.instance_memory_bytes,
            )
            .map_err(|e| {
                eprintln!("{method} {path}: {e:#}");
                ApiError::internal()
            })?;
        let observer: Arc<dyn StepObserver> = match counted {
            true => self.metrics.clone(),
            false => Arc::new(Unobserved),
        };
        instance.begin(observer, started);

        let status = Arc::new(AtomicU16::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (request, out) = {
            let body = req.map(|b| {
                Full::new(b)
                    .map_err(|never: Infallible| -> wasmtime_wasi_http::Error { match never {} })
            });
            let mut http = instance.store.data_mut().http();
            let request = http
                .new_incoming_request(Scheme::Http, body)
                .map_err(|e| internal("cannot pass the request on", e))?;
            let seen = status.clone();
            let out = http
                .new_response_outparam_from_callback(move |resp| {
                    let code = resp.as_ref().map(|r| r.status().as_u16()).unwrap_or(500);
                    seen.store(code, Ordering::Relaxed);
                    let _ = tx.send(resp);
                })
                .map_err(|e| internal("cannot pass the request on", e))?;
            (request, out)
        };

        let instances = self.instances.clone();
        let metrics = self.metrics.clone();
        let (log_method, log_path) = match counted {
            true => (method.clone(), path.clone()),
            false => (method.clone(), format!("{path} (warm-up)")),
        };
        // Fired once the instance is kept or dropped; the response's end waits for it.
        let (settled, settled_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let _slot = slot; // held until the last byte is written
            let work = instance.handle(&instances, request, out);
            let ended = match tokio::time::timeout_at(deadline, work).await {
                Ok(result) => Ended::Done(result),
                Err(_) => Ended::TimedOut,
            };
            let stats = instance.store.data().nn.stats;
            let code = match status.load(Ordering::Relaxed) {
                0 => 500,
                c => c,
            };
            let error = match &ended {
                Ended::Done(Ok(())) => String::new(),
                Ended::Done(Err(e)) => format!(" error: {}", one_line(e)),
                Ended::TimedOut => " stopped: past --request-timeout".to_string(),
            };
            // The access log: one line per request.
            eprintln!(
                "{log_method} {log_path} {code} tokens {}+{} {:.0} ms{error}",
                stats.prompt_tokens,
                stats.generated_tokens,
                started.elapsed().as_secs_f64() * 1e3,
            );
            // An unanswered request is counted by whoever answers it.
            let answered = status.load(Ordering::Relaxed) != 0;
            if answered && counted {
                metrics.request(&log_path, code);
            }
            if answered && matches!(ended, Ended::Done(Ok(()))) {
                instances.give_back(instance);
            }
            let _ = settled.send(());
            if let Some(done) = warm_up {
                let _ = done.send(());
            }
            ended
        });
        // Dropped when the client goes away before the response starts: stop its work too.
        let guard = AbortOnDrop(Some(task));

        match rx.await {
            Ok(Ok(resp)) => {
                drop(guard.take()); // the task now feeds the body, and stops when it is dropped
                Ok(resp.map(|body| EndsWhenSettled::new(body, settled_rx).boxed_unsync()))
            }
            Ok(Err(code)) => {
                eprintln!("{method} {path}: the component answered with an error: {code:?}");
                Err(ApiError::internal())
            }
            Err(_) => {
                // The component finished (or trapped, or ran out of time) without a response.
                match guard.take().await {
                    Ok(Ended::TimedOut) => Err(self.timed_out()),
                    Ok(Ended::Done(Ok(()))) => {
                        eprintln!("{method} {path}: the component sent no response");
                        Err(ApiError::internal())
                    }
                    // Logged with its cause by the task (the access log line).
                    Ok(Ended::Done(Err(_))) => Err(ApiError::internal()),
                    Err(e) => {
                        eprintln!("{method} {path}: the request task failed: {e}");
                        Err(ApiError::internal())
                    }
                }
            }
        }
    }
}

/// Steps that no metric counts (the warm-up's).
struct Unobserved;

impl StepObserver for Unobserved {
    fn step(&self, _: &Step) {}
    fn kv_tokens(&self, _: &str, _: i64) {}
}

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
