//! Prometheus metrics, labelled by tenant, rendered by the `prometheus` crate.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests by tenant and kind (`generate`, `chat`, `pipeline`, ...).
    pub requests: IntCounterVec,
    /// Errors by tenant and code.
    pub errors: IntCounterVec,
    /// Prompt (`in`) and generated (`out`) tokens by tenant.
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
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
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
                &["tenant", "direction"],
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
            registry,
        }
    }

    /// The text exposition of every series, or only `tenant`'s (and the
    /// unlabelled ones) when a tenant asks.
    pub fn render(&self, tenant: Option<&str>) -> String {
        let mut families = self.registry.gather();
        if let Some(tenant) = tenant {
            for family in &mut families {
                let kept: Vec<_> = family
                    .take_metric()
                    .into_iter()
                    .filter(|m| {
                        m.get_label()
                            .iter()
                            .all(|l| l.name() != "tenant" || l.value() == tenant)
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
}
