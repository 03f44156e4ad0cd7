//! `GET /metrics`: the server's counters in the Prometheus / OpenMetrics text format
//! (prometheus-client). README "Metrics" lists them.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::instances::InstancePool;
use crate::registry::ModelRegistry;
use crate::wasi_nn::{Step, StepObserver};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

type HistogramFamily = Family<ModelLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    requests: Family<RouteLabels, Counter>,
    prompt_tokens: Family<ModelLabels, Counter>,
    generated_tokens: Family<ModelLabels, Counter>,
    prefix_hits: Family<ModelLabels, Counter>,
    prefix_hit_tokens: Family<ModelLabels, Counter>,
    ttft: HistogramFamily,
    inter_token: HistogramFamily,
    running: Family<ModelLabels, Gauge>,
    waiting: Family<ModelLabels, Gauge>,
    kv_tokens: Family<ModelLabels, Gauge>,
    kv_usage: Family<ModelLabels, Gauge<f64, AtomicU64>>,
    prefix_bytes: Family<ModelLabels, Gauge>,
    batched_runs: Family<ModelLabels, Counter>,
    batched_steps: Family<ModelLabels, Counter>,
    /// KV capacity per model in tokens: `--max-running` full contexts (models whose context
    /// length is known).
    kv_capacity: BTreeMap<String, f64>,
}

/// The routes we count by name; anything else is `other`, so clients cannot grow the label set.
const ROUTES: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/health",
    "/metrics",
];

/// The label of a request path.
pub fn route_label(path: &str) -> &'static str {
    let path = path.trim_end_matches('/');
    ROUTES.into_iter().find(|r| *r == path).unwrap_or("other")
}

fn ttft_histogram() -> Histogram {
    // 10 ms .. ~82 s.
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

fn inter_token_histogram() -> Histogram {
    // 2.5 ms .. ~5 s.
    Histogram::new(exponential_buckets(0.0025, 2.0, 12))
}

impl Metrics {
    /// `kv_capacity`: tokens per model that its running generations may hold at most (the KV
    /// utilisation's denominator), worked out once at start-up.
    pub fn new(kv_capacity: BTreeMap<String, f64>) -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            prompt_tokens: Family::default(),
            generated_tokens: Family::default(),
            prefix_hits: Family::default(),
            prefix_hit_tokens: Family::default(),
            ttft: Family::new_with_constructor(ttft_histogram),
            inter_token: Family::new_with_constructor(inter_token_histogram),
            running: Family::default(),
            waiting: Family::default(),
            kv_tokens: Family::default(),
            kv_usage: Family::default(),
            prefix_bytes: Family::default(),
            batched_runs: Family::default(),
            batched_steps: Family::default(),
            kv_capacity,
        };
        let r = &mut m.registry;
        r.register(
            "slm_http_requests",
            "HTTP requests answered, by route and status",
            m.requests.clone(),
        );
        r.register(
            "slm_prompt_tokens",
            "Prompt tokens prefilled (prefix-cache hits included)",
            m.prompt_tokens.clone(),
        );
        r.register(
            "slm_generation_tokens",
            "Tokens generated",
            m.generated_tokens.clone(),
        );
        r.register(
            "slm_prefix_cache_hits",
            "Prefills that reused a cached prefix",
            m.prefix_hits.clone(),
        );
        r.register(
            "slm_prefix_cache_hit_tokens",
            "Prompt tokens restored from the prefix cache instead of computed",
            m.prefix_hit_tokens.clone(),
        );
        r.register(
            "slm_time_to_first_token_seconds",
            "From a request's arrival to its first token",
            m.ttft.clone(),
        );
        r.register(
            "slm_inter_token_latency_seconds",
            "Between consecutive generated tokens of a request",
            m.inter_token.clone(),
        );
        r.register(
            "slm_requests_running",
            "Generations running",
            m.running.clone(),
        );
        r.register(
            "slm_requests_waiting",
            "Generations waiting for a slot (--max-running)",
            m.waiting.clone(),
        );
        r.register(
            "slm_kv_cache_tokens",
            "Tokens held in the KV caches of running generations",
            m.kv_tokens.clone(),
        );
        r.register(
            "slm_kv_cache_usage_ratio",
            "slm_kv_cache_tokens over --max-running full contexts (0-1)",
            m.kv_usage.clone(),
        );
        r.register(
            "slm_prefix_cache_bytes",
            "Bytes held by the prefix cache",
            m.prefix_bytes.clone(),
        );
        r.register(
            "slm_batched_runs",
            "Model runs that carried the steps of several generations at once (continuous batching)",
            m.batched_runs.clone(),
        );
        r.register(
            "slm_batched_steps",
            "Generation steps that ran in such a shared run",
            m.batched_steps.clone(),
        );
        m
    }

    /// Counts the instances `pool` starts and keeps idle.
    pub fn instances(&mut self, pool: &InstancePool) {
        self.registry.register(
            "slm_instances_started",
            "Component instances started (an idle one answers the next request when it can: --instance-reuse)",
            pool.started.clone(),
        );
        self.registry.register(
            "slm_instances_idle",
            "Instances kept warm for the next request",
            pool.idle_gauge.clone(),
        );
    }

    fn model(model: &str) -> ModelLabels {
        ModelLabels {
            model: model.to_string(),
        }
    }

    pub fn request(&self, path: &str, status: u16) {
        let route = route_label(path);
        self.requests
            .get_or_create(&RouteLabels { route, status })
            .inc();
    }

    pub fn running(&self, model: &str) -> Gauge {
        self.running.get_or_create_owned(&Self::model(model))
    }

    pub fn waiting(&self, model: &str) -> Gauge {
        self.waiting.get_or_create_owned(&Self::model(model))
    }

    /// The text of `GET /metrics`, with the gauges that are read rather than counted brought up
    /// to date.
    pub fn render(&self, models: &ModelRegistry) -> String {
        for name in models.names() {
            let labels = Self::model(&name);
            // Every model shows up, used or not.
            let _ = self.running.get_or_create(&labels);
            let _ = self.waiting.get_or_create(&labels);
            let held = self.kv_tokens.get_or_create(&labels).get();
            if let Some(capacity) = self.kv_capacity.get(&name) {
                self.kv_usage
                    .get_or_create(&labels)
                    .set((held as f64 / capacity).clamp(0.0, 1.0));
            }
            if let Some(model) = models.model(&name) {
                let (_, bytes) = model.prefix_cache().usage();
                self.prefix_bytes.get_or_create(&labels).set(bytes as i64);
                if let Some(loaded) = model.loaded() {
                    // The engine counts; the counters catch up at each scrape.
                    let stats = loaded.batching_stats();
                    for (counter, total) in [
                        (&self.batched_runs, stats.packed_runs),
                        (&self.batched_steps, stats.packed_steps),
                    ] {
                        let counter = counter.get_or_create(&labels);
                        counter.inc_by(total.saturating_sub(counter.get()));
                    }
                }
            }
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String");
        text
    }
}

impl StepObserver for Metrics {
    fn step(&self, step: &Step) {
        let labels = Self::model(step.model);
        if step.tokens > 1 {
            self.prompt_tokens
                .get_or_create(&labels)
                .inc_by(step.tokens);
        }
        self.generated_tokens.get_or_create(&labels).inc();
        if step.cached_tokens > 0 {
            self.prefix_hits.get_or_create(&labels).inc();
            self.prefix_hit_tokens
                .get_or_create(&labels)
                .inc_by(step.cached_tokens);
        }
        if step.first {
            self.ttft.get_or_create(&labels).observe(step.seconds);
        } else if step.tokens == 1 {
            self.inter_token
                .get_or_create(&labels)
                .observe(step.seconds);
        }
    }

    fn kv_tokens(&self, model: &str, delta: i64) {
        self.kv_tokens
            .get_or_create(&Self::model(model))
            .inc_by(delta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_a_closed_set() {
        assert_eq!(route_label("/v1/chat/completions/"), "/v1/chat/completions");
        assert_eq!(route_label("/health"), "/health");
        assert_eq!(route_label("/v1/../../etc/passwd"), "other");
    }
}
