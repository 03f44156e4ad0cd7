//! Warm instances: an instance that answered a request cleanly answers later ones too (up to
//! `--instance-reuse` requests), so what the generator keeps per instance (each model's parsed
//! tokenizer and chat template, its wasi:nn graph; with `--portable`, the model itself) is built
//! once per instance instead of once per request.
//!
//! An instance goes back to the idle list only when its request ended with a response and no
//! error: one that trapped, ran past its deadline or was cut off mid-call is dropped, because its
//! state is unknown. One whose memory grew past half its limit is dropped too, so a reused
//! instance never fails a request that a fresh one would have answered.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use wasmtime::component::Resource;
use wasmtime::{Engine, Store};
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};
use wasmtime_wasi_http::p2::types::{HostIncomingRequest, HostResponseOutparam};

use crate::registry::ModelRegistry;
use crate::runtime::{HostState, MemoryLimit};
use crate::wasi_nn::StepObserver;

/// How instances are reused: `slm serve`'s flags.
#[derive(Clone, Copy, Debug)]
pub struct Reuse {
    /// Requests one instance may answer (1: a fresh instance per request).
    pub max_requests: u32,
    /// Idle instances kept at most.
    pub max_idle: usize,
    /// An instance idle longer than this is dropped.
    pub idle_timeout: Duration,
}

/// One instance: its store, and its exports once instantiated.
pub struct Instance {
    pub store: Store<HostState>,
    proxy: Option<Proxy>,
    answered: u32,
    idle_since: Instant,
}

impl Instance {
    /// Starts this instance's next request: counters and timings restart from `started`.
    pub fn begin(&mut self, observer: Arc<dyn StepObserver>, started: Instant) {
        self.store.data_mut().nn.observe(observer, started);
    }

    /// Answers one request (`wasi:http/incoming-handler.handle`), instantiating the component on
    /// the instance's first request.
    pub async fn handle(
        &mut self,
        pool: &InstancePool,
        request: Resource<HostIncomingRequest>,
        out: Resource<HostResponseOutparam>,
    ) -> wasmtime::Result<()> {
        if self.proxy.is_none() {
            pool.started.inc();
            self.proxy = Some(pool.pre.instantiate_async(&mut self.store).await?);
        }
        let proxy = self.proxy.as_ref().expect("instantiated above");
        proxy
            .wasi_http_incoming_handler()
            .call_handle(&mut self.store, request, out)
            .await
    }
}

/// The pre-linked component and the instances waiting for a request.
pub struct InstancePool {
    pre: ProxyPre<HostState>,
    reuse: Reuse,
    idle: Mutex<Vec<Instance>>,
    /// Instances started, for `/metrics`.
    pub started: Counter,
    /// Instances idle right now, for `/metrics`.
    pub idle_gauge: Gauge,
}

impl InstancePool {
    pub fn new(pre: ProxyPre<HostState>, reuse: Reuse) -> InstancePool {
        InstancePool {
            pre,
            reuse,
            idle: Mutex::new(Vec::new()),
            started: Counter::default(),
            idle_gauge: Gauge::default(),
        }
    }

    /// The most recently used idle instance (its caches are the warmest), else a new store
    /// (instantiated on its first call, in the request's task).
    pub fn take(
        &self,
        engine: &Engine,
        registry: &Arc<ModelRegistry>,
        env: &[(&str, String)],
        memory_bytes: usize,
    ) -> anyhow::Result<Instance> {
        if let Some(instance) = self.pop_live() {
            return Ok(instance);
        }
        let mut state = HostState::with_env(registry.clone(), env)?;
        state.limits = MemoryLimit::new(memory_bytes);
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_async_yield_and_update(1);
        Ok(Instance {
            store,
            proxy: None,
            answered: 0,
            idle_since: Instant::now(),
        })
    }

    fn pop_live(&self) -> Option<Instance> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let timeout = self.reuse.idle_timeout;
        idle.retain(|i| i.idle_since.elapsed() < timeout);
        let instance = idle.pop();
        self.idle_gauge.set(idle.len() as i64);
        instance
    }

    /// An instance whose request ended with a response and no error: kept for the next request
    /// unless it has answered its share, its memory grew past half its limit, or enough are idle.
    pub fn give_back(&self, mut instance: Instance) {
        instance.answered += 1;
        let limit = &instance.store.data().limits;
        if instance.answered >= self.reuse.max_requests
            || instance.proxy.is_none()
            || limit.largest > limit.max / 2
        {
            return;
        }
        instance.idle_since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.reuse.max_idle {
            idle.push(instance);
        }
        self.idle_gauge.set(idle.len() as i64);
    }

    /// Drops the instances idle past `--instance-idle-timeout` (run periodically, so an idle
    /// server gives their memory back).
    pub fn sweep(&self) {
        let expired: Vec<Instance> = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let timeout = self.reuse.idle_timeout;
            let (keep, expired) = idle
                .drain(..)
                .partition(|i| i.idle_since.elapsed() < timeout);
            *idle = keep;
            self.idle_gauge.set(idle.len() as i64);
            expired
        };
        drop(expired); // outside the lock: freeing a store returns its memory
    }
}
