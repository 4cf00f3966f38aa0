//! Shared helpers of the end-to-end tests: the repository layout, the guest
//! components (built once per test binary), and a sandbox to run them in.

#![allow(dead_code)] // each test binary uses a different subset

pub mod postgres;
pub mod redis_server;
pub mod ws;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds the Rust guests (once per test process) and returns the path of guest `name`.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let manifest = repo().join("guests/rust/Cargo.toml");
        let output = Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--manifest-path",
            ])
            .arg(&manifest)
            .env_remove("CARGO_TARGET_DIR")
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    });
    if let Err(e) = built {
        panic!(
            "building the guests failed (is the wasm32-wasip2 target installed? `rustup target add wasm32-wasip2`):\n{e}"
        );
    }
    repo().join(format!(
        "guests/rust/target/wasm32-wasip2/release/{name}.wasm"
    ))
}

/// The `realm-host` binary built for this test run.
pub fn realm_host() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_realm-host"));
    cmd.env_remove("RUST_LOG");
    cmd
}

/// Runs `realm-host keys new` for `tenant` on `config`; returns the key.
pub fn new_key(config: &Path, tenant: &str) -> String {
    let mut cmd = realm_host();
    cmd.args(["keys", "new", "--tenant", tenant, "--config"])
        .arg(config);
    stdout_of(&mut cmd).trim().to_string()
}

/// Runs `cmd`, which must succeed (else its stderr is the panic message);
/// returns its stdout.
pub fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The model store of this machine (`$REALM_HOME/models`, default
/// `~/.realm/models`), if it holds `name`; tests that need a real model skip
/// (with a note) when it is absent — unless `REALM_REQUIRE_MODELS=1` says it
/// must be there (`scripts/test.sh` pulls the models, then sets it), when
/// they fail instead of passing empty.
pub fn model_store_with(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("REALM_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".realm")))?;
    let store = home.join("models");
    if store.join(format!("{name}.gguf")).is_file() {
        Some(store)
    } else {
        let absent = format!(
            "model {name} is not in {} (run `realm-host models pull {name}`)",
            store.display()
        );
        assert!(!models_required(), "{absent}, and REALM_REQUIRE_MODELS=1");
        eprintln!("skipping: {absent}");
        None
    }
}

/// Starts `realm-host serve` on `config` with `home` as `REALM_HOME`, its
/// log captured; waits for its "listening on" line. Returns the process, its
/// address and the log so far (growing while it runs).
pub async fn spawn_serve(
    config: &Path,
    home: &Path,
) -> (
    tokio::process::Child,
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<String>>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_realm-host"))
        .args(["serve", "--config"])
        .arg(config)
        .env("REALM_HOME", home)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sink = log.clone();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.split("listening on http://").nth(1)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(rest.split_whitespace().next().unwrap().parse().unwrap());
            }
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    let addr = tokio::time::timeout(std::time::Duration::from_secs(120), rx)
        .await
        .expect("the server listens within 120 s")
        .expect("the server printed its address");
    (child, addr, log)
}

/// Gives `hub` two scripted engines, so servers are tested apart from a
/// real model: `fake` echoes the prompt at once, `fake-slow` takes 10 ms a
/// token for thousands of tokens.
pub fn provide_fakes(hub: &realm_host::inference::ModelHub) {
    use realm_models::engine::FakeEngine;
    hub.provide("fake", std::sync::Arc::new(FakeEngine::new()));
    hub.provide(
        "fake-slow",
        std::sync::Arc::new(
            FakeEngine::new()
                .with_reply(|prompt| format!("{prompt} and then").repeat(200))
                .with_token_delay(std::time::Duration::from_millis(10)),
        ),
    );
}

/// `[tenants.ID]` tables for `tenants` (id, TOML lines), each with a new
/// key's hash; and each tenant's key.
pub fn tenant_tables(tenants: &[(&str, &str)]) -> (String, Vec<(String, String)>) {
    let mut tables = String::new();
    let mut keys = Vec::new();
    for (tenant, table) in tenants {
        let key = realm_host::server::keys::ApiKey::generate(tenant).unwrap();
        tables.push_str(&format!(
            "[tenants.{tenant}]\napi-keys = [\"{}\"]\n{table}\n",
            key.hash().unwrap()
        ));
        keys.push((tenant.to_string(), key.as_str().to_string()));
    }
    (tables, keys)
}

/// GETs `url` with `Authorization: Bearer <key>` (off the async threads);
/// the body, which must come with a success status.
pub async fn get_with_key(url: String, key: &str) -> String {
    get_text(url, Some(format!("Bearer {key}"))).await
}

/// GETs `url` with `auth` as its `Authorization`, if any (off the async
/// threads); the body, which must come with a success status.
pub async fn get_text(url: String, auth: Option<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let mut request = ureq::get(&url);
        if let Some(auth) = &auth {
            request = request.set("authorization", auth);
        }
        request.call().unwrap().into_string().unwrap()
    })
    .await
    .unwrap()
}

/// Serves `config` in this process with `hub` (the test's engines) and a
/// fresh sandbox; returns the bound address once it listens.
pub async fn serve_in_process(
    config: PathBuf,
    home: realm_host::home::RealmHome,
    hub: std::sync::Arc<realm_host::inference::ModelHub>,
) -> std::net::SocketAddr {
    serve_bound(config, home, hub).await.public
}

/// As [`serve_in_process`], with the admin API's address too.
pub async fn serve_bound(
    config: PathBuf,
    home: realm_host::home::RealmHome,
    hub: std::sync::Arc<realm_host::inference::ModelHub>,
) -> realm_host::server::Bound {
    use realm_host::sandbox::{Sandbox, SandboxConfig};
    let sandbox = std::sync::Arc::new(Sandbox::new(SandboxConfig { cache_dir: None }).unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let served = realm_host::server::serve(config, home, hub, sandbox, move |addr| {
            let _ = tx.send(addr);
        });
        if let Err(e) = served.await {
            eprintln!("server failed: {e}");
        }
    });
    tokio::time::timeout(std::time::Duration::from_secs(60), rx)
        .await
        .expect("server start")
        .expect("server bound")
}

/// POSTs `body` as JSON with `auth` (off the async threads); the status and
/// the body read as JSON, whatever the status.
pub async fn post_status(
    url: &str,
    auth: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let (url, auth, body) = (url.to_string(), auth.to_string(), body.to_string());
    tokio::task::spawn_blocking(move || {
        let response = match ureq::post(&url)
            .set("authorization", &auth)
            .set("content-type", "application/json")
            .send_string(&body)
        {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{e}"),
        };
        let status = response.status();
        (
            status,
            serde_json::from_str(&response.into_string().unwrap()).unwrap(),
        )
    })
    .await
    .unwrap()
}

/// A `REALM_HOME` in `dir` (`dir/home`) whose store links this machine's
/// SmolLM2, or `None` (the test skips) when the machine has none.
pub fn home_with_smollm2(dir: &Path) -> Option<PathBuf> {
    let store = model_store_with("smollm2-135m-instruct")?;
    let home = dir.join("home");
    std::fs::create_dir_all(home.join("models")).unwrap();
    std::os::unix::fs::symlink(
        store.join("smollm2-135m-instruct.gguf"),
        home.join("models/smollm2-135m-instruct.gguf"),
    )
    .unwrap();
    Some(home)
}

/// Whether `REALM_REQUIRE_MODELS=1`: tests needing a real model fail when it is absent.
pub fn models_required() -> bool {
    std::env::var("REALM_REQUIRE_MODELS").is_ok_and(|v| v == "1")
}

/// The Python interpreter of the test environment (`scripts/python-env.sh`
/// creates it on first use, with the pinned `openai` and `websockets`).
pub fn test_python() -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/python-env.sh");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run scripts/python-env.sh");
    assert!(output.status.success(), "scripts/python-env.sh failed");
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

/// Runs `tests/python/SCRIPT` with `python` and `env`; it must succeed and
/// print one JSON summary, returned.
pub async fn run_python(
    python: PathBuf,
    script: &str,
    env: &[(&str, String)],
) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/python")
        .join(script);
    let output = tokio::process::Command::new(python)
        .arg(path)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{stdout}");
    serde_json::from_str(stdout.trim()).unwrap()
}
