//! The control plane: state in SQLite and in a real PostgreSQL started by
//! the test, the usage ledger (no token lost under load, quotas surviving
//! kill -9), the admin API's changes taking effect without SIGHUP, its
//! security (tenant keys, the public port, viewers, the audit of every
//! change), and the dashboard in headless Chromium.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::postgres::TempPostgres;
use common::ws::recv;
use futures_util::StreamExt;
use realm_host::control::{Actor, ControlPlane, Db, keys, migrate, tenants};
use realm_host::home::RealmHome;
use realm_host::inference::ModelHub;
use realm_host::registry::ModelStore;
use realm_host::server::keys::ApiKey;
use realm_models::engine::FakeEngine;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The two backends: SQLite in a temporary folder, and PostgreSQL when
/// installed. The cluster stops when the value drops.
enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(TempPostgres),
}

impl Backend {
    fn all() -> Vec<Backend> {
        let mut all = vec![Backend::Sqlite(tempfile::tempdir().unwrap())];
        all.extend(TempPostgres::start().map(Backend::Postgres));
        all
    }

    fn url(&self) -> String {
        match self {
            Backend::Sqlite(dir) => dir.path().join("realm.sqlite3").display().to_string(),
            Backend::Postgres(pg) => pg.url.clone(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }
}

/// A server in this process with a database and the admin API; `small` is
/// a scripted engine.
struct Plane {
    public: SocketAddr,
    admin: SocketAddr,
    root: String,
    viewer: String,
    db: String,
    _dir: tempfile::TempDir,
}

impl Plane {
    async fn start(db: &str, tenants_toml: &str) -> Plane {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "listen = \"127.0.0.1:0\"\ndrain-timeout = \"2s\"\n[models]\nsmall = \"fake\"\nother = \"fake-other\"\n\
             [database]\nurl = \"{db}\"\nflush-interval = \"100ms\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{tenants_toml}\n"
        );
        let path = dir.path().join("realm.toml");
        std::fs::write(&path, config).unwrap();
        let control = ControlPlane::open(db).await.unwrap();
        let root = keys::create_admin_key(&control.db, &Actor::cli(), "root", "admin", "test")
            .await
            .unwrap()
            .key;
        let viewer =
            keys::create_admin_key(&control.db, &Actor::cli(), "watcher", "viewer", "test")
                .await
                .unwrap()
                .key;
        let home = RealmHome::resolve(Some(dir.path().join("home"))).unwrap();
        let hub = Arc::new(ModelHub::new(
            ModelStore::new(dir.path().join("models")),
            Default::default(),
        ));
        hub.provide("fake", Arc::new(FakeEngine::new()));
        hub.provide("fake-other", Arc::new(FakeEngine::new()));
        let bound = common::serve_bound(path, home, hub).await;
        Plane {
            public: bound.public,
            admin: bound.admin.expect("the admin API listens"),
            root,
            viewer,
            db: db.to_string(),
            _dir: dir,
        }
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    fn public_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.public)
    }

    /// An admin API call as `root`.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        request(method, &self.admin_url(path), Some(&self.root), body).await
    }
}

/// A request with an optional bearer key; the status and the JSON body.
async fn request(method: &str, url: &str, key: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let (method, url, key) = (method.to_string(), url.to_string(), key.map(String::from));
    tokio::task::spawn_blocking(move || {
        let mut r = ureq::request(&method, &url);
        if let Some(key) = key {
            r = r.set("authorization", &format!("Bearer {key}"));
        }
        let result = match body {
            Some(body) => r
                .set("content-type", "application/json")
                .send_string(&body.to_string()),
            None => r.call(),
        };
        let (status, response) = match result {
            Ok(r) => (r.status(), r),
            Err(ureq::Error::Status(code, r)) => (code, r),
            Err(e) => panic!("{method} {url}: {e}"),
        };
        let text = response.into_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    })
    .await
    .unwrap()
}

async fn chat(plane: &Plane, key: &str, max_tokens: u32) -> (u16, Value) {
    request(
        "POST",
        &plane.public_url("/v1/chat/completions"),
        Some(key),
        Some(json!({"model": "small", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": max_tokens})),
    )
    .await
}

/// Makes tenant `id` through the API with `spec`, and a key for it.
async fn tenant_with_key(plane: &Plane, id: &str, spec: Value) -> String {
    let mut body = spec;
    body["id"] = json!(id);
    let (status, made) = plane.call("POST", "/admin/api/tenants", Some(body)).await;
    assert_eq!(status, 201, "{made}");
    let (status, key) = plane
        .call(
            "POST",
            &format!("/admin/api/tenants/{id}/keys"),
            Some(json!({"name": "test"})),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    key["key"].as_str().unwrap().to_string()
}

/// Tokens in the ledger's written rows for `tenant`.
async fn ledger_tokens(db: &str, tenant: &str) -> i64 {
    let db = Db::open(db).await.unwrap();
    let rows = db
        .query(
            "SELECT CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) FROM usage WHERE tenant_id = $1",
            vec![tenant.into()],
        )
        .await
        .unwrap();
    rows[0][0].int()
}

async fn audit_count(db: &str) -> i64 {
    let db = Db::open(db).await.unwrap();
    realm_host::control::audit::count(&db).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_from_empty_once_and_refuse_edits() {
    for backend in Backend::all() {
        let url = backend.url();
        let name = backend.name();
        let db = Db::open(&url).await.unwrap();
        assert_eq!(
            migrate::migrate(&db).await.unwrap(),
            vec![1],
            "{name}: from empty"
        );
        assert!(
            migrate::migrate(&db).await.unwrap().is_empty(),
            "{name}: again, a no-op"
        );
        let rows = db
            .query("SELECT version, name FROM schema_migrations", vec![])
            .await
            .unwrap();
        assert_eq!(
            (rows[0][0].int(), rows[0][1].text()),
            (1, "init".to_string())
        );
        // The ledger and the audit log are append-only in both databases.
        db.batch(vec![(
            "INSERT INTO usage (tenant_id, model, adapter, minute, prompt_tokens) VALUES ('a', 'm', '', 1, 5)",
            vec![],
        )])
        .await
        .unwrap();
        for (sql, what) in [
            ("UPDATE usage SET prompt_tokens = 1", "shrink the ledger"),
            ("DELETE FROM usage", "delete from the ledger"),
        ] {
            assert!(
                db.batch(vec![(sql, vec![])]).await.is_err(),
                "{name}: could {what}"
            );
        }
        db.batch(vec![realm_host::control::audit::record(
            &Actor::cli(),
            "test",
            "x",
            json!({}),
        )])
        .await
        .unwrap();
        assert!(
            db.batch(vec![("DELETE FROM audit_log", vec![])])
                .await
                .is_err(),
            "{name}: the audit log is append-only"
        );
        // A database newer than this binary is refused.
        db.batch(vec![(
            "INSERT INTO schema_migrations VALUES (99, 'future', 'x', 0)",
            vec![],
        )])
        .await
        .unwrap();
        let err = ControlPlane::open(&url).await.unwrap_err().to_string();
        assert!(err.contains("upgrade realm-host"), "{name}: {err}");
        // A migration that ran and changed since is refused at start.
        db.batch(vec![
            ("DELETE FROM schema_migrations WHERE version = 99", vec![]),
            (
                "UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1",
                vec![],
            ),
        ])
        .await
        .unwrap();
        let err = ControlPlane::open(&url).await.unwrap_err().to_string();
        assert!(err.contains("must not change"), "{name}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_key_creation_gives_distinct_working_keys() {
    for backend in Backend::all() {
        let plane = Plane::start(&backend.url(), "").await;
        let (status, _) = plane
            .call(
                "POST",
                "/admin/api/tenants",
                Some(json!({"id": "acme", "models": ["small"]})),
            )
            .await;
        assert_eq!(status, 201);
        let before = audit_count(&plane.db).await;
        let made = futures_util::future::join_all((0..32).map(|i| {
            let plane = &plane;
            async move {
                plane
                    .call(
                        "POST",
                        "/admin/api/tenants/acme/keys",
                        Some(json!({"name": format!("k{i}")})),
                    )
                    .await
            }
        }))
        .await;
        let mut ids = std::collections::HashSet::new();
        let mut texts = std::collections::HashSet::new();
        for (status, key) in &made {
            assert_eq!(*status, 201, "{}: {key}", backend.name());
            ids.insert(key["id"].as_str().unwrap().to_string());
            texts.insert(key["key"].as_str().unwrap().to_string());
        }
        assert_eq!((ids.len(), texts.len()), (32, 32), "{}", backend.name());
        assert_eq!(
            audit_count(&plane.db).await - before,
            32,
            "one audit entry per key"
        );
        for key in &texts {
            let (status, _) =
                request("GET", &plane.public_url("/v1/models"), Some(key), None).await;
            assert_eq!(status, 200, "{}: every key works at once", backend.name());
        }
    }
}

/// 64 clients at once: every token a response reports is in the ledger
/// (after the last flush) and in `realm_tokens_total`, per tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_holds_every_token_served_under_load() {
    for backend in Backend::all() {
        let plane = Plane::start(&backend.url(), "").await;
        let keys = [
            tenant_with_key(&plane, "acme", json!({"models": ["small"]})).await,
            tenant_with_key(&plane, "beta", json!({"models": ["small"]})).await,
        ];
        let served = futures_util::future::join_all((0..64).map(|client| {
            let (plane, key) = (&plane, keys[client % 2].clone());
            async move {
                let mut tokens = 0;
                for i in 0..4 {
                    let (status, reply) = chat(plane, &key, 4 + (client as u32 + i) % 12).await;
                    assert_eq!(status, 200, "{reply}");
                    tokens += reply["usage"]["total_tokens"].as_i64().unwrap();
                }
                (client % 2, tokens)
            }
        }))
        .await;
        for (t, tenant) in ["acme", "beta"].iter().enumerate() {
            let want: i64 = served.iter().filter(|(c, _)| *c == t).map(|(_, n)| n).sum();
            let mut written = 0;
            for _ in 0..100 {
                written = ledger_tokens(&plane.db, tenant).await;
                if written >= want {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(written, want, "{}: {tenant}'s ledger", backend.name());
            let metrics = common::get_with_key(plane.public_url("/metrics"), &keys[t]).await;
            let counted: i64 = metrics
                .lines()
                .filter(|l| l.starts_with("realm_tokens_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
                .sum();
            assert_eq!(counted, want, "{}: {tenant}'s metrics", backend.name());
            let (_, usage) = plane
                .call(
                    "GET",
                    &format!("/admin/api/usage?tenant={tenant}&bucket=day"),
                    None,
                )
                .await;
            let total = &usage["total"];
            assert_eq!(
                total["prompt-tokens"].as_i64().unwrap()
                    + total["completion-tokens"].as_i64().unwrap(),
                want
            );
            assert_eq!(total["requests"], 128);
        }
    }
}

/// The real binary, killed with SIGKILL and started again on the same
/// database: the daily quota carries on from the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_quotas_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let Some(home) = common::home_with_smollm2(dir.path()) else {
        assert!(!common::models_required(), "SmolLM2 is required");
        return;
    };
    for backend in Backend::all() {
        let url = backend.url();
        let config = dir.path().join(format!("{}.toml", backend.name()));
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\n[models]\nsmall = \"smollm2-135m-instruct\"\n\
                 [database]\nurl = \"{url}\"\nflush-interval = \"100ms\"\n\
                 [tenants.acme]\nmodels = [\"small\"]\nrate = {{ tokens-per-day = 300 }}\n"
            ),
        )
        .unwrap();
        let control = ControlPlane::open(&url).await.unwrap();
        // The file's tenants reach the database when the server starts;
        // the key is made once they are there.
        let (mut child, addr, _log) = common::spawn_serve(&config, &home).await;
        let key = keys::create(&control.db, &Actor::cli(), "acme", "t", None)
            .await
            .unwrap()
            .key;
        // The server polls the revision every 2 s.
        let chat_url = format!("http://{addr}/v1/chat/completions");
        let body = json!({"model": "small", "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 60});
        let mut spent = 0;
        for _ in 0..100 {
            let (status, reply) = request("POST", &chat_url, Some(&key), Some(body.clone())).await;
            if status == 401 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            assert_eq!(status, 200, "{reply}");
            spent += reply["usage"]["total_tokens"].as_i64().unwrap();
            if spent >= 150 {
                break;
            }
        }
        assert!(spent >= 150, "{spent}");
        // Wait for the flush, then kill without a chance to write more.
        for _ in 0..100 {
            if ledger_tokens(&url, "acme").await == spent {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(ledger_tokens(&url, "acme").await, spent);
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        let (_child, addr, _log) = common::spawn_serve(&config, &home).await;
        let chat_url = format!("http://{addr}/v1/chat/completions");
        let mut big = body.clone();
        big["max_tokens"] = json!(280);
        let (status, refused) = request("POST", &chat_url, Some(&key), Some(big)).await;
        assert_eq!(status, 429, "{}: {refused}", backend.name());
        assert_eq!(refused["error"]["code"], "quota_exceeded");
        let left = 300 - spent;
        assert!(
            refused["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("but {left} are left")),
            "{}: {refused}",
            backend.name()
        );
    }
}

/// Grants, limits and revocations made through the API hold for the very
/// next request, with no SIGHUP; realm.toml's tenants stay the file's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_apply_at_once_and_the_file_wins() {
    let sqlite = tempfile::tempdir().unwrap();
    let db = sqlite.path().join("c.sqlite3").display().to_string();
    let file_key = ApiKey::generate("filed").unwrap();
    let plane = Plane::start(
        &db,
        &format!(
            "[tenants.filed]\napi-keys = [\"{}\"]\nmodels = [\"small\"]\n",
            file_key.hash().unwrap()
        ),
    )
    .await;
    let key = tenant_with_key(&plane, "acme", json!({"models": ["small"]})).await;
    assert_eq!(chat(&plane, &key, 8).await.0, 200);

    // Grants: the second model appears in the tenant's list.
    let (status, _) = plane
        .call(
            "PATCH",
            "/admin/api/tenants/acme",
            Some(json!({"models": ["small", "other"]})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, models) = request("GET", &plane.public_url("/v1/models"), Some(&key), None).await;
    let names: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["other", "small"]);
    // Limits: a daily quota below what was spent refuses the next request.
    let (status, _) = plane
        .call(
            "PATCH",
            "/admin/api/tenants/acme",
            Some(json!({"rate": {"tokens-per-day": 10}})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, refused) = chat(&plane, &key, 8).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (429, Some("quota_exceeded"))
    );
    // An invalid change is refused with the configuration's own message.
    let (status, invalid) = plane
        .call(
            "PATCH",
            "/admin/api/tenants/acme",
            Some(json!({"models": ["missing"]})),
        )
        .await;
    assert_eq!(status, 422, "{invalid}");
    assert!(
        invalid["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`missing` is not in [models]")
    );
    // Revocation: the next request gets 401 and an open WebSocket closes.
    let (_, keys) = plane
        .call("GET", "/admin/api/tenants/acme/keys", None)
        .await;
    let id = keys["keys"][0]["id"].as_str().unwrap().to_string();
    let mut socket = common::ws::connect(plane.public, &key).await;
    let (status, _) = plane
        .call(
            "DELETE",
            &format!("/admin/api/tenants/acme/keys/{id}"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(chat(&plane, &key, 8).await.0, 401);
    let refused = recv(&mut socket).await;
    assert_eq!(refused["code"], "unauthorized", "{refused}");
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(_)) => {}
                other => panic!("closed without a close frame: {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(closed, 1008);

    // A key made to expire stops working when it does, with no change to
    // the database (the server reloads at the expiry).
    let (status, brief) = plane
        .call(
            "POST",
            "/admin/api/tenants/filed/keys",
            Some(json!({"name": "brief", "expires-in": "2s"})),
        )
        .await;
    assert_eq!(status, 201, "{brief}");
    let brief = brief["key"].as_str().unwrap().to_string();
    assert_eq!(chat(&plane, &brief, 2).await.0, 200);
    let mut expired = false;
    for _ in 0..100 {
        if chat(&plane, &brief, 2).await.0 == 401 {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(expired, "the key still works after its expiry");

    // realm.toml's tenant: its grants are the file's; its keys may be
    // managed here, and its file key was imported.
    let (status, conflict) = plane
        .call(
            "PATCH",
            "/admin/api/tenants/filed",
            Some(json!({"models": ["other"]})),
        )
        .await;
    assert_eq!(
        (status, conflict["error"]["code"].as_str()),
        (409, Some("managed_by_config"))
    );
    assert_eq!(
        plane
            .call("DELETE", "/admin/api/tenants/filed", None)
            .await
            .0,
        409
    );
    assert_eq!(chat(&plane, file_key.as_str(), 4).await.0, 200);
    let (_, filed_keys) = plane
        .call("GET", "/admin/api/tenants/filed/keys", None)
        .await;
    let imported = filed_keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "realm.toml #1")
        .expect("the file's key was imported");
    assert_eq!(imported["source"], "config");
    // Its last use is written with the next ledger flush.
    let mut used = false;
    for _ in 0..50 {
        let (_, listed) = plane
            .call("GET", "/admin/api/tenants/filed/keys", None)
            .await;
        used = (listed["keys"].as_array().unwrap().iter())
            .any(|k| k["name"] == "realm.toml #1" && k["last-used-at"].is_i64());
        if used {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(used, "last-used-at is recorded");
    let (status, extra) = plane
        .call(
            "POST",
            "/admin/api/tenants/filed/keys",
            Some(json!({"name": "extra"})),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(chat(&plane, extra["key"].as_str().unwrap(), 4).await.0, 200);
    // Rotation: the new key works; the old one stops (no grace).
    let (status, rotated) = plane
        .call(
            "POST",
            &format!(
                "/admin/api/tenants/filed/keys/{}/rotate",
                extra["id"].as_str().unwrap()
            ),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 201, "{rotated}");
    assert_eq!(
        chat(&plane, rotated["key"].as_str().unwrap(), 4).await.0,
        200
    );
    assert_eq!(chat(&plane, extra["key"].as_str().unwrap(), 4).await.0, 401);
}

/// realm.toml synchronised into the database: the file's tenants and keys
/// are written, replaced, and removed with it; API tenants are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_is_synchronised_into_the_database() {
    for backend in Backend::all() {
        let control = ControlPlane::open(&backend.url()).await.unwrap();
        let db = &control.db;
        let hash = ApiKey::generate("filed").unwrap().hash().unwrap();
        let file = |models: &[&str], hashes: Vec<String>| {
            let toml = format!(
                "[filed]\napi-keys = {}\nmodels = {}\nrate = {{ tokens-per-day = 100 }}\n",
                json!(hashes),
                json!(models)
            );
            toml::from_str::<std::collections::BTreeMap<String, realm_host::server::TenantConfig>>(
                &toml,
            )
            .unwrap()
        };
        assert_eq!(
            tenants::sync_config(db, &file(&["small"], vec![hash.clone()]))
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            tenants::sync_config(db, &file(&["small"], vec![hash.clone()]))
                .await
                .unwrap(),
            0,
            "an unchanged file changes nothing (and audits nothing)"
        );
        tenants::apply(
            db,
            &Actor::cli(),
            "own",
            tenants::Change::Create(tenants::TenantSpec::default()),
            |_| Vec::new(),
        )
        .await
        .unwrap();
        assert_eq!(
            tenants::sync_config(db, &file(&["small", "big"], vec![]))
                .await
                .unwrap(),
            2
        );
        let held = tenants::load_all(db).await.unwrap();
        assert_eq!(held["filed"].spec.models, ["big", "small"]);
        assert_eq!(held["filed"].spec.rate.tokens_per_day, Some(100));
        assert!(
            !keys::active_hashes(db).await.unwrap().contains_key("filed"),
            "the removed key is revoked"
        );
        assert_eq!(
            tenants::sync_config(db, &Default::default()).await.unwrap(),
            1
        );
        let held = tenants::load_all(db).await.unwrap();
        assert!(
            !held.contains_key("filed") && held.contains_key("own"),
            "{held:?}"
        );
    }
}

/// Every admin route: 401 without a key and with a tenant's key; not on the
/// public port; a viewer may read but not change; every change made by an
/// admin adds exactly one audit entry; the dashboard's headers and cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_is_locked_down_and_audited() {
    let pg = TempPostgres::start();
    let sqlite = tempfile::tempdir().unwrap();
    let db = match &pg {
        Some(pg) => pg.url.clone(),
        None => sqlite.path().join("c.sqlite3").display().to_string(),
    };
    let plane = Plane::start(&db, "").await;
    let tenant_key = tenant_with_key(&plane, "acme", json!({"models": ["small"]})).await;
    let openapi: Value = serde_json::from_str(realm_host::server::admin_api::OPENAPI).unwrap();
    let (status, served) =
        request("GET", &plane.admin_url("/admin/openapi.json"), None, None).await;
    assert_eq!((status, &served), (200, &openapi));
    let mut mutating = Vec::new();
    for (path, item) in openapi["paths"].as_object().unwrap() {
        for method in ["get", "post", "put", "patch", "delete"] {
            let Some(op) = item.get(method) else { continue };
            let public = op.get("security").is_some();
            let concrete = path
                .replace("{id}", "acme")
                .replace("{key}", "0000000000000000");
            let url = plane.admin_url(&concrete);
            let m = method.to_uppercase();
            // Not on the public port, with any key.
            let (status, _) =
                request(&m, &plane.public_url(&concrete), Some(&plane.root), None).await;
            assert_eq!(status, 404, "{m} {path} on the public port");
            if public {
                continue;
            }
            let (status, body) = request(&m, &url, None, Some(json!({}))).await;
            assert_eq!(status, 401, "{m} {path} without a key: {body}");
            // A tenant's key is refused; after a burst of such failures its
            // address is throttled (429), which refuses as well.
            let (status, body) = request(&m, &url, Some(&tenant_key), Some(json!({}))).await;
            assert!(
                status == 401 || (status == 429 && body["error"]["code"] == "rate_limited"),
                "{m} {path} with a tenant key: {status} {body}"
            );
            if method == "get" {
                let (status, _) = request(&m, &url, Some(&plane.viewer), None).await;
                assert_eq!(status, 200, "a viewer reads {path}");
            } else {
                let (status, body) = request(&m, &url, Some(&plane.viewer), Some(json!({}))).await;
                assert_eq!(status, 403, "a viewer cannot {m} {path}: {body}");
                mutating.push((m, path.clone()));
            }
        }
    }
    // Each change, made once by an admin, adds one audit entry.
    let (_, made) = plane
        .call(
            "POST",
            "/admin/api/tenants/acme/keys",
            Some(json!({"name": "spare"})),
        )
        .await;
    let spare = made["id"].as_str().unwrap().to_string();
    let (_, other) = plane
        .call(
            "POST",
            "/admin/api/admins",
            Some(json!({"id": "ops", "role": "viewer"})),
        )
        .await;
    let ops_key = other["id"].as_str().unwrap().to_string();
    let calls: Vec<(&str, String, Value)> = vec![
        (
            "POST",
            "/admin/api/tenants".into(),
            json!({"id": "tmp", "models": ["small"]}),
        ),
        (
            "PUT",
            "/admin/api/tenants/tmp".into(),
            json!({"models": ["small", "other"]}),
        ),
        (
            "PATCH",
            "/admin/api/tenants/tmp".into(),
            json!({"weight": 3}),
        ),
        ("DELETE", "/admin/api/tenants/tmp".into(), Value::Null),
        (
            "POST",
            "/admin/api/tenants/acme/keys".into(),
            json!({"name": "k"}),
        ),
        (
            "POST",
            format!("/admin/api/tenants/acme/keys/{spare}/rotate"),
            json!({"grace": "1h"}),
        ),
        (
            "DELETE",
            format!("/admin/api/tenants/acme/keys/{spare}"),
            Value::Null,
        ),
        (
            "POST",
            "/admin/api/admins".into(),
            json!({"id": "ops", "role": "viewer"}),
        ),
        (
            "DELETE",
            format!("/admin/api/admins/ops/keys/{ops_key}"),
            Value::Null,
        ),
        // Last: the server drains and stops.
        ("POST", "/admin/api/drain".into(), Value::Null),
    ];
    let covered: std::collections::HashSet<(String, String)> = calls
        .iter()
        .map(|(m, p, _)| {
            let template = openapi["paths"]
                .as_object()
                .unwrap()
                .keys()
                .find(|t| {
                    let (ts, ps): (Vec<&str>, Vec<&str>) =
                        (t.split('/').collect(), p.split('/').collect());
                    ts.len() == ps.len()
                        && ts
                            .iter()
                            .zip(&ps)
                            .all(|(t, p)| t.starts_with('{') || t == p)
                })
                .unwrap()
                .clone();
            (m.to_string(), template)
        })
        .collect();
    for (m, path) in &mutating {
        assert!(
            covered.contains(&(m.clone(), path.clone())),
            "{m} {path} is not exercised for its audit entry"
        );
    }
    // The dashboard: CSP, no inline code, nothing from elsewhere, and a
    // strict HttpOnly cookie that needs the header for changes.
    let page = ureq::get(&plane.admin_url("/admin/")).call().unwrap();
    let csp = page.header("content-security-policy").unwrap().to_string();
    assert!(
        csp.contains("default-src 'none'")
            && csp.contains("script-src 'self'")
            && !csp.contains("unsafe"),
        "{csp}"
    );
    let html = page.into_string().unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("<script>"),
        "{html}"
    );
    let root = plane.root.clone();
    let signed = ureq::post(&plane.admin_url("/admin/session"))
        .send_string(&json!({"key": root}).to_string())
        .unwrap();
    let cookie = signed.header("set-cookie").unwrap().to_string();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/admin"] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    let session = cookie.split(';').next().unwrap().to_string();
    let with_cookie =
        |m: &str, p: &str| ureq::request(m, &plane.admin_url(p)).set("cookie", &session);
    assert_eq!(
        with_cookie("GET", "/admin/api/whoami")
            .call()
            .unwrap()
            .status(),
        200
    );
    match with_cookie("POST", "/admin/api/drain").call() {
        Err(ureq::Error::Status(403, r)) => {
            assert!(r.into_string().unwrap().contains("X-Realm-Admin"))
        }
        other => panic!("a cookie change without the header: {other:?}"),
    }
    // A session ends with the key that opened it.
    let (_, temp) = plane
        .call(
            "POST",
            "/admin/api/admins",
            Some(json!({"id": "temp", "role": "viewer"})),
        )
        .await;
    let signed = ureq::post(&plane.admin_url("/admin/session"))
        .send_string(&json!({"key": temp["key"]}).to_string())
        .unwrap();
    let temp_session = signed
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let whoami = |cookie: String| {
        let url = plane.admin_url("/admin/api/whoami");
        async move {
            tokio::task::spawn_blocking(move || {
                match ureq::get(&url).set("cookie", &cookie).call() {
                    Ok(r) => r.status(),
                    Err(ureq::Error::Status(code, _)) => code,
                    Err(e) => panic!("{e}"),
                }
            })
            .await
            .unwrap()
        }
    };
    assert_eq!(whoami(temp_session.clone()).await, 200);
    let (status, _) = plane
        .call(
            "DELETE",
            &format!(
                "/admin/api/admins/temp/keys/{}",
                temp["id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(
        whoami(temp_session).await,
        401,
        "the session of a revoked key"
    );
    // Admin keys and tenant keys are told apart by their shape too.
    let (status, _) = request(
        "GET",
        &plane.public_url("/v1/models"),
        Some(&plane.root),
        None,
    )
    .await;
    assert_eq!(status, 401, "an admin key is not a tenant key");
    for (method, path, body) in calls {
        let before = audit_count(&plane.db).await;
        let (status, answer) = plane
            .call(method, &path, (!body.is_null()).then_some(body))
            .await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {answer}"
        );
        assert_eq!(audit_count(&plane.db).await - before, 1, "{method} {path}");
    }
}

/// The dashboard in headless Chromium (Selenium): sign in, make a tenant and
/// a key, use the key with the official `openai` client, see the usage in
/// the tenant's chart, revoke the key, and the client gets 401; a viewer's
/// dashboard offers no changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_headless_chromium() {
    let Some(driver) = chromedriver() else {
        assert!(
            std::env::var("REALM_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "chromium and chromium-driver are not installed; run scripts/setup.sh"
        );
        eprintln!("skipping: no chromedriver");
        return;
    };
    let sqlite = tempfile::tempdir().unwrap();
    let db = sqlite.path().join("c.sqlite3").display().to_string();
    let plane = Plane::start(&db, "").await;
    let python = tokio::task::spawn_blocking(common::test_python)
        .await
        .unwrap();
    let env = [
        ("ADMIN_URL", plane.admin_url("/admin/")),
        ("ADMIN_KEY", plane.root.clone()),
        ("VIEWER_KEY", plane.viewer.clone()),
        ("API_URL", plane.public_url("/v1")),
        ("CHROMEDRIVER", driver.display().to_string()),
        (
            "SCREENSHOTS",
            std::env::var("REALM_SCREENSHOTS").unwrap_or_default(),
        ),
    ];
    let summary = common::run_python(python, "dashboard.py", &env).await;
    assert!(
        summary["tokens_in_chart"].as_i64().unwrap() > 0,
        "{summary}"
    );
    assert_eq!(summary["after_revoke"], 401, "{summary}");
    // What the browser did is in the audit log, as `root`.
    let (_, audit) = plane.call("GET", "/admin/api/audit", None).await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"] == "root")
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in ["tenant.create", "key.create", "key.revoke"] {
        assert!(actions.contains(&action), "{action} in {actions:?}");
    }
}

fn chromedriver() -> Option<PathBuf> {
    ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .map(Path::to_path_buf)
}

/// The CLI: `admin init` and tenant changes on the database directly, and
/// tenants, keys, usage and audit through a running server's admin API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_the_control_plane() {
    let sqlite = tempfile::tempdir().unwrap();
    let db = sqlite.path().join("c.sqlite3").display().to_string();
    let plane = Plane::start(&db, "").await;
    let config = sqlite.path().join("direct.toml");
    std::fs::write(
        &config,
        format!("[models]\nsmall = \"fake\"\n[database]\nurl = \"{db}\"\n"),
    )
    .unwrap();
    let run = move |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let mut cmd = common::realm_host();
            cmd.args(&args)
                .env_remove("REALM_ADMIN_KEY")
                .env_remove("REALM_ADMIN_URL");
            common::stdout_of(&mut cmd)
        })
    };
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let cfg = config.display().to_string();
    let key = run(s(&[
        "admin",
        "init",
        "--config",
        &cfg,
        "--name",
        "cli-admin",
    ]))
    .await
    .unwrap();
    let key = key.trim().to_string();
    assert!(key.starts_with("rka_cli-admin_"), "{key}");
    // Directly on the database; the running server picks it up.
    run(s(&[
        "tenants",
        "create",
        "direct",
        "--model",
        "small",
        "--tokens-per-day",
        "500",
        "--config",
        &cfg,
    ]))
    .await
    .unwrap();
    let url = format!("http://{}", plane.admin);
    let api = |extra: &[&str]| {
        let mut v = s(extra);
        v.extend(s(&["--url", &url, "--admin-key", &key]));
        v
    };
    // The server sees the new admin key and tenant at its next revision
    // poll (every 2 s).
    let mut listed = String::new();
    for _ in 0..20 {
        if let Ok(out) = run(api(&["tenants", "list"])).await {
            listed = out;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        listed.contains("direct") && listed.contains("500"),
        "{listed}"
    );
    let tenant_key = run(api(&[
        "keys", "create", "--tenant", "direct", "--name", "ci",
    ]))
    .await
    .unwrap();
    let tenant_key = tenant_key.trim().to_string();
    assert!(tenant_key.starts_with("rk_direct_"), "{tenant_key}");
    let mut ok = false;
    for _ in 0..100 {
        if chat(&plane, &tenant_key, 4).await.0 == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the CLI's key works");
    let usage = run(api(&["usage", "--tenant", "direct", "--json"]))
        .await
        .unwrap();
    let usage: Value = serde_json::from_str(&usage).unwrap();
    assert_eq!(usage["total"]["requests"], 1, "{usage}");
    let audit = run(api(&["audit"])).await.unwrap();
    for needle in ["tenant.create", "key.create", "cli-admin", "cli "] {
        assert!(audit.contains(needle), "{needle} in {audit}");
    }
    // A viewer's key is refused changes by the CLI too (the API says so).
    let out = common::realm_host()
        .args(["tenants", "delete", "direct", "--url", &url])
        .args(["--admin-key", &plane.viewer])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("viewer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw HTTP/1.1 request sent from the local address `from` (the server
/// throttles failed keys per address); the status.
async fn status_from(
    from: [u8; 4],
    to: SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    body: &str,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    let mut stream = socket.connect(to).await.unwrap();
    let auth = if key.is_empty() {
        String::new()
    } else {
        format!("Authorization: Bearer {key}\r\n")
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {to}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Admin and tenant keys share the verifier and its failure throttles, but
/// not their names: a flood of wrong tenant keys claiming `root` cannot
/// lock the admin `root` out, nor wrong admin keys claiming `acme` the
/// tenant `acme`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_keys_of_one_kind_cannot_lock_out_the_other() {
    let sqlite = tempfile::tempdir().unwrap();
    let plane = Plane::start(&sqlite.path().join("c.sqlite3").display().to_string(), "").await;
    tenant_with_key(&plane, "acme", json!({"models": ["small"]})).await;
    // Fresh keys, not yet verified (as a new sign-in or client would be).
    let (_, admin) = plane
        .call(
            "POST",
            "/admin/api/admins",
            Some(json!({"id": "root", "role": "admin", "key-name": "fresh"})),
        )
        .await;
    let (_, tenant) = plane
        .call(
            "POST",
            "/admin/api/tenants/acme/keys",
            Some(json!({"name": "fresh"})),
        )
        .await;
    let zeros = "0".repeat(64);
    for (from, to, bad) in [
        ([127, 0, 0, 2], plane.public, format!("rk_root_{zeros}")),
        ([127, 0, 0, 4], plane.admin, format!("rka_acme_{zeros}")),
    ] {
        let path = if to == plane.public {
            "/v1/models"
        } else {
            "/admin/api/whoami"
        };
        let mut throttled = false;
        for _ in 0..40 {
            if status_from(from, to, "GET", path, &bad, "").await == 429 {
                throttled = true;
                break;
            }
        }
        assert!(throttled, "wrong keys from {from:?} are throttled");
    }
    let sign_in = json!({"key": admin["key"]}).to_string();
    assert_eq!(
        status_from(
            [127, 0, 0, 3],
            plane.admin,
            "POST",
            "/admin/session",
            "",
            &sign_in
        )
        .await,
        200,
        "the admin `root` signs in"
    );
    assert_eq!(
        status_from(
            [127, 0, 0, 5],
            plane.public,
            "GET",
            "/v1/models",
            tenant["key"].as_str().unwrap(),
            ""
        )
        .await,
        200,
        "the tenant `acme` is served"
    );
}

/// A tenant row the server cannot serve (written past the checks, say by
/// an older host) is left out and logged; it does not stop later changes,
/// such as a revocation, from being served. Two creates of one tenant
/// racing: one wins, the other gets 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_row_or_a_race_cannot_wedge_the_control_plane() {
    let sqlite = tempfile::tempdir().unwrap();
    let db = sqlite.path().join("c.sqlite3").display().to_string();
    let plane = Plane::start(&db, "").await;
    let key = tenant_with_key(&plane, "acme", json!({"models": ["small"]})).await;
    let control = ControlPlane::open(&db).await.unwrap();
    let spec = tenants::TenantSpec {
        models: vec!["no-such-model".into()],
        ..Default::default()
    };
    tenants::apply(
        &control.db,
        &Actor::cli(),
        "broken",
        tenants::Change::Create(spec),
        |_| Vec::new(),
    )
    .await
    .unwrap();
    let (_, keys) = plane
        .call("GET", "/admin/api/tenants/acme/keys", None)
        .await;
    let id = keys["keys"][0]["id"].as_str().unwrap().to_string();
    let (status, answer) = plane
        .call(
            "DELETE",
            &format!("/admin/api/tenants/acme/keys/{id}"),
            None,
        )
        .await;
    assert_eq!(status, 204, "{answer}");
    assert_eq!(
        chat(&plane, &key, 2).await.0,
        401,
        "the revocation is served"
    );
    let (_, listed) = plane.call("GET", "/admin/api/tenants/broken", None).await;
    assert_eq!(listed["served"], false, "{listed}");

    let racing = futures_util::future::join_all((0..2).map(|_| {
        plane.call(
            "POST",
            "/admin/api/tenants",
            Some(json!({"id": "twin", "models": ["small"]})),
        )
    }))
    .await;
    let mut statuses: Vec<u16> = racing.iter().map(|(s, _)| *s).collect();
    statuses.sort();
    assert_eq!(statuses, [201, 409], "{racing:?}");
}

/// PostgreSQL over TLS: `sslmode=require` connects to a server whose
/// certificate a trusted authority signed, and refuses one it cannot
/// verify (here: the same server, its authority not trusted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_use_tls_when_asked() {
    let Some(pg) = TempPostgres::start_tls() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("realm.toml");
    std::fs::write(
        &config,
        format!("[database]\nurl = \"{}\"\n", pg.url_requiring_tls()),
    )
    .unwrap();
    let audit = |ca: Option<&Path>| {
        let mut cmd = common::realm_host();
        cmd.args(["audit", "--config"]).arg(&config);
        // The system's authorities, or only the test's.
        match ca {
            Some(ca) => cmd.env("SSL_CERT_FILE", ca),
            None => cmd.env("SSL_CERT_FILE", dir.path().join("none.pem")),
        };
        cmd.output().unwrap()
    };
    let untrusted = audit(None);
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(
        !untrusted.status.success(),
        "an unverified server is refused"
    );
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    let trusted = audit(pg.ca.as_deref());
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
}

/// A realm.toml the server refuses on reload (here: a model that cannot
/// load) changes nothing, in service or in the database: it is checked and
/// put into service before it is written there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_leaves_the_database_alone() {
    use realm_host::sandbox::{Sandbox, SandboxConfig};
    use realm_host::server::{AppState, ServerConfig};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.sqlite3").display().to_string();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        ServerConfig::load(&path).unwrap()
    };
    let database = format!("[database]\nurl = \"{db}\"\n");
    let first = write(
        "first.toml",
        format!("[models]\nsmall = \"fake\"\n{database}[tenants.acme]\nmodels = [\"small\"]\n"),
    );
    let control = Arc::new(ControlPlane::open(&db).await.unwrap());
    let hub = Arc::new(ModelHub::new(
        ModelStore::new(dir.path().join("models")),
        Default::default(),
    ));
    hub.provide("fake", Arc::new(FakeEngine::new()));
    let sandbox = Arc::new(Sandbox::new(SandboxConfig { cache_dir: None }).unwrap());
    let home = RealmHome::resolve(Some(dir.path().join("home"))).unwrap();
    let state = AppState::new(first, home, hub, sandbox, Some(control.clone()))
        .await
        .unwrap();
    let second = write(
        "second.toml",
        format!(
            "[models]\nsmall = \"fake\"\nbig = \"{}/missing.gguf\"\n{database}[tenants.beta]\nmodels = [\"small\"]\n",
            dir.path().display()
        ),
    );
    let err = state.reload(second).await.unwrap_err().to_string();
    assert!(err.contains("big"), "{err}");
    let held = tenants::load_all(&control.db).await.unwrap();
    assert_eq!(
        held.keys().collect::<Vec<_>>(),
        ["acme"],
        "the database is untouched"
    );
    assert!(state.runtime().tenants.contains_key("acme"));
}
