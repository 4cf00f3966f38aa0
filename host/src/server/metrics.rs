//! Prometheus metrics, labelled by tenant, rendered by the `prometheus` crate.
//! Host-wide series (which models are loaded) carry no tenant label and are
//! shown only in the all-tenants view: a model's load state tells when other
//! tenants used it.

use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::inference::residency::{ModelStatus, Phase};

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests by tenant and kind (`generate`, `chat`, `pipeline`, ...).
    pub requests: IntCounterVec,
    /// Errors by tenant and code.
    pub errors: IntCounterVec,
    /// Prompt (`in`) and generated (`out`) tokens by tenant, model and
    /// adapter (empty for none): see [`tokens_of`].
    pub tokens: IntCounterVec,
    /// Seconds from request to first generated text, by tenant.
    pub time_to_first_token: HistogramVec,
    /// Seconds between generated pieces, by tenant.
    pub token_latency: HistogramVec,
    /// Generations admitted and not yet finished, by tenant (a global gauge
    /// showed every tenant the others' activity).
    pub queue_depth: IntGaugeVec,
    /// Wasm fuel used by guest calls, by tenant.
    pub fuel: IntCounterVec,
    /// Sandbox limit breaches by tenant and limit.
    pub breaches: IntCounterVec,
    /// The served LoRA adapters in memory, and their bytes (host-wide).
    adapters: (IntGauge, IntGauge),
    /// `vllm:lora_requests_info`: which served adapters are in memory, for
    /// the Gateway API Inference Extension's adapter affinity (host-wide).
    lora_info: GaugeVec,
    /// Reads the adapters' count and bytes at each scrape.
    adapters_now: Mutex<Option<AdapterCount>>,
}

/// Reads how many adapters are in memory and their bytes.
type AdapterCount = Box<dyn Fn() -> (usize, u64) + Send + Sync>;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A generation's token counters: prompt tokens, generated tokens.
pub type TokenCounters = (prometheus::IntCounter, prometheus::IntCounter);

/// The counters in `tokens` ([`Metrics::tokens`]) of `tenant`'s
/// generations on `model`, a served name (`MODEL` or `MODEL:ADAPTER`,
/// checked by then).
pub fn tokens_of(tokens: &IntCounterVec, tenant: &str, model: &str) -> TokenCounters {
    let (model, adapter) = model.split_once(':').unwrap_or((model, ""));
    let of = |direction| tokens.with_label_values(&[tenant, direction, model, adapter]);
    (of("in"), of("out"))
}

impl Metrics {
    /// Registers the fleet's metrics: only hosts in a fleet show them.
    pub fn fleet(&self) -> super::fleet::FleetMetrics {
        let up = IntGauge::new(
            "realm_fleet_redis_up",
            "1 while the fleet's Redis (shared limits) answers, 0 while it does not",
        )
        .expect("valid metric");
        let errors = prometheus::IntCounter::new(
            "realm_fleet_redis_errors_total",
            "Calls to the fleet's Redis that failed or timed out",
        )
        .expect("valid metric");
        for metric in [
            Box::new(up.clone()) as Box<dyn Collector>,
            Box::new(errors.clone()),
        ] {
            self.registry.register(metric).expect("registered once");
        }
        super::fleet::FleetMetrics { up, errors }
    }

    /// Registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["tenant"])
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "realm_queue_depth",
                "Generations admitted and not yet finished",
            ),
            &["tenant"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(queue_depth.clone()))
            .expect("unique metric");
        let gauge = |name: &str, help: &str| {
            let gauge = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(gauge.clone()))
                .expect("unique metric");
            gauge
        };
        let lora_info = GaugeVec::new(
            Opts::new(
                "vllm:lora_requests_info",
                "Served LoRA adapters: in memory (running), how many may be (max); the value is when this was read",
            ),
            &["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(lora_info.clone()))
            .expect("unique metric");
        let adapters = (
            gauge("realm_adapters_loaded", "Served LoRA adapters in memory"),
            gauge(
                "realm_adapter_bytes",
                "Bytes the served LoRA adapters in memory hold",
            ),
        );
        Metrics {
            requests: counter(
                "realm_requests_total",
                "Requests received",
                &["tenant", "kind"],
            ),
            errors: counter("realm_errors_total", "Errors returned", &["tenant", "code"]),
            tokens: counter(
                "realm_tokens_total",
                "Prompt (in) and generated (out) tokens",
                &["tenant", "direction", "model", "adapter"],
            ),
            time_to_first_token: histogram(
                "realm_time_to_first_token_seconds",
                "Time from request to the first generated text",
                prometheus::exponential_buckets(0.005, 2.0, 14).expect("valid buckets"),
            ),
            token_latency: histogram(
                "realm_token_latency_seconds",
                "Time between generated pieces of text",
                prometheus::exponential_buckets(0.001, 2.0, 14).expect("valid buckets"),
            ),
            queue_depth,
            fuel: counter(
                "realm_guest_fuel_total",
                "Wasm fuel used by guest calls",
                &["tenant"],
            ),
            breaches: counter(
                "realm_limit_breaches_total",
                "Guest calls stopped by a sandbox limit",
                &["tenant", "limit"],
            ),
            adapters,
            adapters_now: Mutex::new(None),
            lora_info,
            registry,
        }
    }

    /// Sets `vllm:lora_requests_info`: `served` adapters (`MODEL:ADAPTER`)
    /// may be in memory, `running` are. Without served adapters there is
    /// no series (as vLLM without LoRA). Adapters are read on first use
    /// while the request waits, so none is ever reported waiting.
    pub fn set_lora_info(&self, served: usize, running: &[String]) {
        self.lora_info.reset();
        if served == 0 {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        self.lora_info
            .with_label_values(&[served.to_string().as_str(), &running.join(","), ""])
            .set(now);
    }

    /// Adds the series of the models `status` describes (loaded, bytes,
    /// loads, unloads), read at each scrape.
    pub fn watch_models(&self, status: impl Fn() -> Vec<ModelStatus> + Send + Sync + 'static) {
        self.registry
            .register(Box::new(ModelSeries::new(Box::new(status))))
            .expect("unique metric");
    }

    /// Adds the served adapters' series (`realm_adapters_loaded`,
    /// `realm_adapter_bytes`), read from `count` at each scrape.
    pub fn watch_adapters(&self, count: impl Fn() -> (usize, u64) + Send + Sync + 'static) {
        *self.adapters_now.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(count));
    }

    /// The text exposition of every series, or only `tenant`'s when a
    /// tenant asks.
    pub fn render(&self, tenant: Option<&str>) -> String {
        if let Some(count) = &*self.adapters_now.lock().unwrap_or_else(|e| e.into_inner()) {
            let (loaded, bytes) = count();
            self.adapters.0.set(loaded as i64);
            self.adapters.1.set(bytes as i64);
        }
        let mut families = self.registry.gather();
        if let Some(tenant) = tenant {
            for family in &mut families {
                let kept: Vec<_> = family
                    .take_metric()
                    .into_iter()
                    .filter(|m| {
                        m.get_label()
                            .iter()
                            .any(|l| l.name() == "tenant" && l.value() == tenant)
                    })
                    .collect();
                family.set_metric(kept);
            }
            families.retain(|f| !f.get_metric().is_empty());
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut out)
            .expect("text encoding to memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// The models' series, built from their status at each scrape.
struct ModelSeries {
    status: Box<dyn Fn() -> Vec<ModelStatus> + Send + Sync>,
    /// The vectors are refilled at each scrape; one scrape at a time.
    series: Mutex<ModelVecs>,
    descs: Vec<Desc>,
}

struct ModelVecs {
    loaded: IntGaugeVec,
    bytes: IntGaugeVec,
    device_bytes: IntGaugeVec,
    running: IntGaugeVec,
    waiting: IntGaugeVec,
    loads: IntCounterVec,
    unloads: IntCounterVec,
    failures: IntCounterVec,
    /// The Gateway API Inference Extension's series, under vLLM's names.
    gateway: GatewayVecs,
}

/// What the Kubernetes Gateway API Inference Extension's endpoint picker
/// reads from a model server, under the names and labels vLLM gives them
/// (the picker's defaults): requests waiting and running, and the share of
/// the KV cache in use (as a fraction, 0 to 1, as vLLM reports it; the old
/// `gpu_cache_usage_perc` name too, for older pickers).
struct GatewayVecs {
    waiting: IntGaugeVec,
    running: IntGaugeVec,
    kv_usage: GaugeVec,
    gpu_cache_usage: GaugeVec,
}

impl ModelVecs {
    fn collectors(&self) -> [&dyn Collector; 12] {
        [
            &self.loaded,
            &self.bytes,
            &self.device_bytes,
            &self.running,
            &self.waiting,
            &self.loads,
            &self.unloads,
            &self.failures,
            &self.gateway.waiting,
            &self.gateway.running,
            &self.gateway.kv_usage,
            &self.gateway.gpu_cache_usage,
        ]
    }
}

impl ModelSeries {
    fn new(status: Box<dyn Fn() -> Vec<ModelStatus> + Send + Sync>) -> Self {
        let gauge = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["model"]).expect("valid metric")
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let named = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["model_name"]).expect("valid metric")
        };
        let share = |name: &str, help: &str| {
            GaugeVec::new(Opts::new(name, help), &["model_name"]).expect("valid metric")
        };
        let gateway = GatewayVecs {
            waiting: named(
                "vllm:num_requests_waiting",
                "Requests waiting: for a slot in the batch or for the model to load",
            ),
            running: named("vllm:num_requests_running", "Generations in the batch"),
            kv_usage: share(
                "vllm:kv_cache_usage_perc",
                "Share of the batch's KV cache in use, 0 to 1",
            ),
            gpu_cache_usage: share(
                "vllm:gpu_cache_usage_perc",
                "Share of the batch's KV cache in use, 0 to 1 (the older name)",
            ),
        };
        let vecs = ModelVecs {
            gateway,
            loaded: gauge("realm_model_loaded", "1 while the model is in memory"),
            bytes: gauge(
                "realm_model_loaded_bytes",
                "Bytes the model holds in memory now (weights and prefix cache)",
            ),
            device_bytes: gauge(
                "realm_model_device_bytes",
                "Bytes the model's weights take on the GPU now (0 on the CPU)",
            ),
            running: gauge(
                "realm_model_running",
                "Generations, sessions and embeddings using the model",
            ),
            waiting: gauge(
                "realm_model_waiting",
                "Requests waiting for the model to be loaded",
            ),
            loads: counter(
                "realm_model_loads_total",
                "Times the model was loaded",
                &["model"],
            ),
            unloads: counter(
                "realm_model_unloads_total",
                "Times the model was unloaded, after keep-alive (idle) or for another model (evicted)",
                &["model", "reason"],
            ),
            failures: counter(
                "realm_model_load_failures_total",
                "Loads of the model that failed",
                &["model"],
            ),
        };
        let descs = (vecs.collectors().iter())
            .flat_map(|c| c.desc().into_iter().cloned())
            .collect();
        ModelSeries {
            status,
            series: Mutex::new(vecs),
            descs,
        }
    }
}

impl Collector for ModelSeries {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let vecs = self.series.lock().unwrap_or_else(|e| e.into_inner());
        vecs.loaded.reset();
        vecs.bytes.reset();
        vecs.device_bytes.reset();
        vecs.running.reset();
        vecs.waiting.reset();
        vecs.loads.reset();
        vecs.unloads.reset();
        vecs.failures.reset();
        vecs.gateway.waiting.reset();
        vecs.gateway.running.reset();
        vecs.gateway.kv_usage.reset();
        vecs.gateway.gpu_cache_usage.reset();
        for m in (self.status)() {
            let model = [m.model.as_str()];
            let gateway = &vecs.gateway;
            (gateway.waiting.with_label_values(&model)).set((m.waiting + m.batch.waiting) as i64);
            (gateway.running.with_label_values(&model)).set(m.batch.running as i64);
            gateway
                .kv_usage
                .with_label_values(&model)
                .set(m.batch.kv_usage);
            (gateway.gpu_cache_usage.with_label_values(&model)).set(m.batch.kv_usage);
            let loaded = matches!(m.phase, Phase::Loaded | Phase::Draining);
            vecs.loaded.with_label_values(&model).set(loaded as i64);
            let held = if loaded { m.bytes } else { 0 };
            (vecs.bytes.with_label_values(&model)).set(i64::try_from(held).unwrap_or(i64::MAX));
            (vecs.device_bytes.with_label_values(&model))
                .set(i64::try_from(m.device_bytes).unwrap_or(i64::MAX));
            vecs.running.with_label_values(&model).set(m.running as i64);
            vecs.waiting.with_label_values(&model).set(m.waiting as i64);
            vecs.loads.with_label_values(&model).inc_by(m.loads);
            (vecs.unloads.with_label_values(&[m.model.as_str(), "idle"])).inc_by(m.unloads_idle);
            (vecs
                .unloads
                .with_label_values(&[m.model.as_str(), "evicted"]))
            .inc_by(m.unloads_evicted);
            vecs.failures
                .with_label_values(&model)
                .inc_by(m.load_failures);
        }
        vecs.collectors().iter().flat_map(|c| c.collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_sees_only_its_own_series() {
        let m = Metrics::new();
        m.requests.with_label_values(&["acme", "chat"]).inc();
        m.requests.with_label_values(&["globex", "chat"]).inc();
        m.queue_depth.with_label_values(&["acme"]).set(2);
        m.queue_depth.with_label_values(&["globex"]).set(5);
        let all = m.render(None);
        assert!(all.contains("tenant=\"acme\"") && all.contains("tenant=\"globex\""));
        let acme = m.render(Some("acme"));
        assert!(
            acme.contains("realm_requests_total{kind=\"chat\",tenant=\"acme\"} 1"),
            "{acme}"
        );
        assert!(!acme.contains("globex"));
        assert!(
            acme.contains("realm_queue_depth{tenant=\"acme\"} 2"),
            "{acme}"
        );
    }

    /// The models' series, their GPU bytes among them, are host-wide: the
    /// operator's view shows them, a tenant's does not.
    #[test]
    fn models_in_memory_are_for_the_operator_only() {
        let m = Metrics::new();
        m.watch_models(|| {
            vec![ModelStatus {
                model: "small".into(),
                bytes: 100,
                device_bytes: 90,
                phase: Phase::Loaded,
                running: 1,
                waiting: 1,
                batch: crate::inference::residency::BatchView {
                    waiting: 2,
                    running: 3,
                    kv_usage: 0.25,
                },
                idle_seconds: None,
                loads: 1,
                unloads_idle: 0,
                unloads_evicted: 0,
                load_failures: 0,
            }]
        });
        m.requests.with_label_values(&["acme", "chat"]).inc();
        let all = m.render(None);
        assert!(
            all.contains("realm_model_device_bytes{model=\"small\"} 90"),
            "{all}"
        );
        // The endpoint picker's series, under vLLM's names.
        for line in [
            "vllm:num_requests_waiting{model_name=\"small\"} 3",
            "vllm:num_requests_running{model_name=\"small\"} 3",
            "vllm:kv_cache_usage_perc{model_name=\"small\"} 0.25",
            "vllm:gpu_cache_usage_perc{model_name=\"small\"} 0.25",
        ] {
            assert!(all.contains(line), "{line}: {all}");
        }
        m.set_lora_info(2, &["small:support".to_string()]);
        let all = m.render(None);
        assert!(
            all.contains("vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"small:support\",waiting_lora_adapters=\"\"}"),
            "{all}"
        );
        let acme = m.render(Some("acme"));
        assert!(acme.contains("tenant=\"acme\""), "{acme}");
        assert!(!acme.contains("realm_model"), "{acme}");
        assert!(!acme.contains("vllm:"), "{acme}");
    }

    /// The adapters in memory are host-wide: the operator's view shows
    /// them, a tenant's does not (they tell when others used theirs).
    #[test]
    fn adapters_in_memory_are_for_the_operator_only() {
        let m = Metrics::new();
        m.watch_adapters(|| (2, 4096));
        m.requests.with_label_values(&["acme", "chat"]).inc();
        let all = m.render(None);
        assert!(all.contains("realm_adapters_loaded 2"), "{all}");
        assert!(all.contains("realm_adapter_bytes 4096"), "{all}");
        let acme = m.render(Some("acme"));
        assert!(!acme.contains("realm_adapter"), "{acme}");
    }
}
