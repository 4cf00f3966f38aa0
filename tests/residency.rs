//! Many models per host within a memory budget (`[loading]` in realm.toml):
//! models load on first use, take turns when the budget fits one, and no
//! request is lost; `realm-host ps` and the operator socket show it, and a
//! tenant's `/metrics` does not.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use realm_host::home::RealmHome;
use realm_host::inference::ModelHub;
use realm_host::inference::residency::{Loader, Phase};
use realm_host::registry::ModelStore;
use realm_host::server::admin::{PsReport, get_blocking};
use realm_host::server::keys::ApiKey;
use realm_models::engine::{Engine, FakeEngine};
use serde_json::{Value, json};

/// A fake model that "holds" 60 bytes, answering `NAME: PROMPT` at 1 ms a token.
fn fake_model(hub: &ModelHub, name: &'static str) {
    let load: Loader = Box::new(move || {
        let engine = FakeEngine::new()
            .with_reply(move |prompt| format!("{name}: {prompt}"))
            .with_token_delay(Duration::from_millis(1));
        Ok(Arc::new(engine) as Arc<dyn Engine>)
    });
    hub.provide_loadable(name, Arc::new(FakeEngine::new()), 60, load)
        .unwrap();
}

struct Server {
    addr: SocketAddr,
    key: String,
    home: PathBuf,
    _dir: tempfile::TempDir,
}

/// Serves models `a` and `b` (fakes of 60 bytes each) to tenant `acme`
/// under a budget of 100 bytes: one model at a time.
async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let key = ApiKey::generate("acme").unwrap();
    let config = format!(
        "listen = \"127.0.0.1:0\"\n[models]\na = \"a\"\nb = \"b\"\n\
         [loading]\nmax-loaded-bytes = 100\nmax-wait = \"120s\"\n\
         [tenants.acme]\napi-keys = [\"{}\"]\nmodels = [\"a\", \"b\"]\n",
        key.hash().unwrap()
    );
    let path = dir.path().join("realm.toml");
    std::fs::write(&path, config).unwrap();
    let home = dir.path().join("home");
    let realm_home = RealmHome::resolve(Some(home.clone())).unwrap();
    let hub = Arc::new(ModelHub::new(
        ModelStore::new(dir.path().join("models")),
        Default::default(),
    ));
    fake_model(&hub, "a");
    fake_model(&hub, "b");
    let addr = common::serve_in_process(path, realm_home, hub).await;
    Server {
        addr,
        key: key.as_str().to_string(),
        home,
        _dir: dir,
    }
}

/// A completion of `model` for `prompt`: the status and the body.
async fn complete(addr: SocketAddr, key: &str, model: &str, prompt: &str) -> (u16, Value) {
    let body = json!({"model": model, "prompt": prompt, "max_tokens": 64});
    let url = format!("http://{addr}/v1/completions");
    common::post_status(&url, &format!("Bearer {key}"), &body).await
}

fn ps(home: &Path) -> PsReport {
    let body = get_blocking(&home.join("run/admin.sock"), "/ps").unwrap();
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_of_one_model_serves_two_to_concurrent_clients() {
    let server = start().await;
    let before = ps(&server.home);
    assert_eq!(before.max_loaded_bytes, Some(100));
    assert!(
        before.models.iter().all(|m| m.phase == Phase::Unloaded),
        "models load on first use: {before:?}"
    );
    let mut clients = Vec::new();
    for client in 0..6 {
        let (addr, key) = (server.addr, server.key.clone());
        clients.push(tokio::spawn(async move {
            for i in 0..6 {
                let model = ["a", "b"][(client + i) % 2];
                let prompt = format!("{client}.{i}");
                let (status, body) = complete(addr, &key, model, &prompt).await;
                assert_eq!(status, 200, "{body}");
                assert_eq!(body["choices"][0]["text"], format!("{model}: {prompt}"));
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let after = ps(&server.home);
    let loaded = after.models.iter().filter(|m| m.phase != Phase::Unloaded);
    assert!(loaded.count() <= 1, "{after:?}");
    let loads: u64 = after.models.iter().map(|m| m.loads).sum();
    let evictions: u64 = after.models.iter().map(|m| m.unloads_evicted).sum();
    assert!(loads >= 2 && evictions >= 1, "{after:?}");
    assert!(
        after
            .models
            .iter()
            .all(|m| m.running == 0 && m.waiting == 0)
    );

    // The operator sees the models' series; a tenant does not (they tell
    // when others used a model).
    let all = get_blocking(&server.home.join("run/admin.sock"), "/metrics").unwrap();
    assert!(
        all.contains("realm_model_loads_total{model=\"a\"}"),
        "{all}"
    );
    assert!(all.contains("realm_model_unloads_total{model=\"a\",reason=\"evicted\"}"));
    let url = format!("http://{}/metrics", server.addr);
    let tenant = common::get_with_key(url, &server.key).await;
    assert!(tenant.contains("tenant=\"acme\""), "{tenant}");
    assert!(!tenant.contains("realm_model"), "{tenant}");
}

/// Both real models under a budget that fits either but not both, served
/// by the real binary to concurrent clients; `realm-host ps` shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_models_take_turns_in_a_budget_that_fits_one() {
    let (Some(store), Some(_)) = (
        common::model_store_with("smollm2-135m-instruct"),
        common::model_store_with("gemma3-270m"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join("models")).unwrap();
    for name in ["smollm2-135m-instruct", "gemma3-270m"] {
        let file = format!("{name}.gguf");
        std::os::unix::fs::symlink(store.join(&file), home.join("models").join(&file)).unwrap();
    }
    // SmolLM2 holds ~94 MiB of weights, Gemma 3 ~241 MiB, each plus the
    // 64 MiB prefix cache: 400 MiB fits either, not both.
    let config = dir.path().join("realm.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\n[models]\nsmol = \"smollm2-135m-instruct\"\ngemma = \"gemma3-270m\"\n\
         [loading]\nmax-loaded-bytes = \"400MiB\"\nmax-wait = \"10m\"\n\
         [tenants.acme]\nmodels = [\"smol\", \"gemma\"]\n",
    )
    .unwrap();
    let key = common::new_key(&config, "acme");
    let (mut child, addr, log) = common::spawn_serve(&config, &home).await;
    let mut clients = Vec::new();
    for client in 0..4 {
        let key = key.clone();
        clients.push(tokio::spawn(async move {
            let mut texts = Vec::new();
            for i in 0..3 {
                let model = ["smol", "gemma"][(client + i) % 2];
                let url = format!("http://{addr}/v1/completions");
                let body = json!({"model": model, "prompt": "The capital of France is",
                                  "max_tokens": 4, "temperature": 0.0});
                let auth = format!("Bearer {key}");
                let (status, body) = tokio::task::spawn_blocking(move || {
                    let r = ureq::post(&url)
                        .set("authorization", &auth)
                        .set("content-type", "application/json")
                        .send_string(&body.to_string())
                        .unwrap();
                    let status = r.status();
                    let body: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
                    (status, body)
                })
                .await
                .unwrap();
                assert_eq!(status, 200, "{body}");
                texts.push((
                    model,
                    body["choices"][0]["text"].as_str().unwrap().to_string(),
                ));
            }
            texts
        }));
    }
    let mut by_model = std::collections::BTreeMap::<&str, Vec<String>>::new();
    for client in clients {
        for (model, text) in client.await.unwrap() {
            by_model.entry(model).or_default().push(text);
        }
    }
    // Greedy: each model answers every request alike, however they interleaved.
    for (model, texts) in &by_model {
        assert_eq!(texts.len(), 6, "{model}");
        assert!(
            texts.iter().all(|t| t == &texts[0] && !t.is_empty()),
            "{model}: {texts:?}"
        );
    }

    let out = common::realm_host()
        .arg("ps")
        .env("REALM_HOME", &home)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.starts_with("budget 400.0 MiB, keep-alive for ever"),
        "{table}"
    );
    for name in ["smollm2-135m-instruct", "gemma3-270m"] {
        assert!(table.lines().any(|l| l.starts_with(name)), "{table}");
    }
    let json = common::realm_host()
        .args(["ps", "--json"])
        .env("REALM_HOME", &home)
        .output()
        .unwrap();
    let report: PsReport = serde_json::from_slice(&json.stdout).unwrap();
    let loaded: u64 = (report.models.iter())
        .filter(|m| m.phase != Phase::Unloaded)
        .map(|m| m.bytes)
        .sum();
    assert!(loaded <= 400 << 20, "{report:?}");
    assert!(report.models.iter().all(|m| m.loads >= 1), "{report:?}");
    child.kill().await.unwrap();
    let log = log.lock().unwrap();
    assert!(log.contains("model unloaded to make room"), "{log}");
}
