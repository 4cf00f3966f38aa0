//! The deployment artifacts (`deploy/`) against realm-host itself: the
//! realm.toml files they ship pass Realm's own validator, and every metric
//! the Grafana dashboard and the alert rules name is one a host exports on
//! its `metrics-listen` port. (`scripts/check-deploy.sh` checks the same
//! files against Kubernetes', Compose's, HAProxy's, Prometheus's and
//! Grafana's own schemas and tools.)

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use realm_host::home::RealmHome;
use realm_host::inference::ModelHub;
use realm_host::registry::ModelStore;
use realm_host::server::config::ServerConfig;
use realm_host::server::keys::ApiKey;
use serde_json::json;

/// The realm.toml embedded in the ConfigMap (its `realm.toml: |` block).
fn configmap_realm_toml() -> String {
    let yaml =
        std::fs::read_to_string(common::repo().join("deploy/kubernetes/configmap.yaml")).unwrap();
    let (_, block) = yaml.split_once("realm.toml: |\n").unwrap();
    block
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_shipped_configurations_pass_realms_validator() {
    let dir = tempfile::tempdir().unwrap();
    let configmap = dir.path().join("realm.toml");
    std::fs::write(&configmap, configmap_realm_toml()).unwrap();
    for path in [common::repo().join("deploy/compose/realm.toml"), configmap] {
        let config =
            ServerConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(config.fleet.is_some(), "{}: no [fleet]", path.display());
        assert!(config.metrics_listen.is_some(), "{}", path.display());
        assert!(config.database.is_some(), "{}", path.display());
    }
}

/// The metric names in `text`: `realm_…` and `vllm:…` words.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for start in ["realm_", "vllm:"] {
        for (at, _) in text.match_indices(start) {
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            names.insert(name);
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_name_is_exported() {
    let dir = tempfile::tempdir().unwrap();
    // The models' series are those of models the host loads itself.
    let Some(store) = common::model_store_with("smollm2-135m-instruct") else {
        return;
    };
    let key = ApiKey::generate("acme").unwrap();
    // A fleet whose Redis is not there (failing open): its series exist.
    let config = format!(
        "listen = \"127.0.0.1:0\"\nmetrics-listen = \"127.0.0.1:0\"\n\
         [models]\nsmall = \"smollm2-135m-instruct\"\n\
         [fleet]\nredis = \"redis://127.0.0.1:1\"\ntimeout = \"100ms\"\n\
         [tenants.acme]\napi-keys = [\"{}\"]\nmodels = [\"small\"]\n",
        key.hash().unwrap()
    );
    let path = dir.path().join("realm.toml");
    std::fs::write(&path, config).unwrap();
    let home = RealmHome::resolve(Some(dir.path().join("home"))).unwrap();
    let hub = Arc::new(ModelHub::new(ModelStore::new(store), Default::default()));
    let bound = common::serve_bound(path, home, hub).await;
    let metrics_at = bound.metrics.expect("metrics-listen is bound");
    // Traffic, so that the labelled series exist: a chat, and an error.
    let url = format!("http://{}/v1/chat/completions", bound.public);
    let auth = format!("Bearer {}", key.as_str());
    let chat = json!({"model": "small", "max_tokens": 4,
                      "messages": [{"role": "user", "content": "Hello"}]});
    let (status, reply) = common::post_status(&url, &auth, &chat).await;
    assert_eq!(status, 200, "{reply}");
    let (status, _) = common::post_status(&url, &auth, &json!({"model": "nope"})).await;
    assert!(status >= 400);
    let metrics = common::get_text(format!("http://{metrics_at}/metrics"), None).await;
    let exported: BTreeSet<String> = (metrics.lines())
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    for file in ["deploy/grafana/realm.json", "deploy/prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(common::repo().join(file)).unwrap();
        let named = metric_names(&text);
        assert!(!named.is_empty(), "{file} names no metric");
        for name in named {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|base| exported.contains(*base))
                .unwrap_or(&name);
            assert!(
                exported.contains(base),
                "{file} names {name}, which /metrics does not export:\n{metrics}"
            );
        }
    }
    // The endpoint picker's series, under vLLM's names.
    for name in [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
    ] {
        assert!(
            metrics.contains(&format!("{name}{{model_name=\"smollm2-135m-instruct\"}}")),
            "{name}:\n{metrics}"
        );
    }
}
