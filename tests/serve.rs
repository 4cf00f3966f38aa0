//! `realm-host serve` on loopback with real clients: WebSocket (tungstenite)
//! and HTTP (ureq). Covers auth, cross-tenant isolation, every error code a
//! client can cause, rate limits and quotas, streaming, cancel and disconnect,
//! the tenant's own component, and the OpenAI-compatible routes.

mod common;

use common::ws::{Socket, recv, send};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use realm_host::home::RealmHome;
use realm_host::inference::ModelHub;
use realm_host::registry::ModelStore;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

struct Server {
    addr: SocketAddr,
    keys: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn key(&self, tenant: &str) -> &str {
        &self.keys.iter().find(|(t, _)| t == tenant).unwrap().1
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn connect(&self, tenant: Option<&str>) -> Socket {
        let mut request = format!("ws://{}/v1/ws", self.addr)
            .into_client_request()
            .unwrap();
        if let Some(tenant) = tenant {
            request.headers_mut().insert(
                "authorization",
                format!("Bearer {}", self.key(tenant)).parse().unwrap(),
            );
        }
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        if tenant.is_some() {
            let ready = recv(&mut socket).await;
            assert_eq!(ready["type"], "ready", "{ready}");
        }
        socket
    }
}

/// Starts a server for `tenants` (id, the TOML lines of its table; a key
/// is made for each), with `models` (TOML) in its `[models]`.
async fn start(models: &str, tenants: &[(&str, &str)]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let (tables, keys) = common::tenant_tables(tenants);
    let config = format!(
        "listen = \"127.0.0.1:0\"\nmax-frame = \"4KiB\"\ndrain-timeout = \"2s\"\n[models]\n{models}\n{tables}"
    );
    let path = dir.path().join("realm.toml");
    std::fs::write(&path, config).unwrap();
    let home = RealmHome::resolve(Some(dir.path().join("home"))).unwrap();
    let store = common::model_store_with("smollm2-135m-instruct")
        .unwrap_or_else(|| dir.path().join("models"));
    let hub = Arc::new(ModelHub::new(ModelStore::new(store), Default::default()));
    // Scripted engines: the server is tested apart from a real model.
    common::provide_fakes(&hub);
    let addr = common::serve_in_process(path, home, hub).await;
    Server {
        addr,
        keys,
        _dir: dir,
    }
}

fn has_model() -> bool {
    common::model_store_with("smollm2-135m-instruct").is_some()
}

const SMALL: &str = "small = \"smollm2-135m-instruct\"";
/// `small` is a fake engine that echoes the prompt at once.
const FAKE: &str = "small = \"fake\"";
/// `small` is a fake engine that takes 10 ms per token for thousands of tokens.
const SLOW: &str = "small = \"fake-slow\"";

/// POSTs `body` as JSON with `auth`; returns the response text.
async fn post_json(url: &str, auth: &str, body: &Value) -> String {
    let (url, auth, body) = (url.to_string(), auth.to_string(), body.to_string());
    tokio::task::spawn_blocking(move || {
        ureq::post(&url)
            .set("authorization", &auth)
            .set("content-type", "application/json")
            .send_string(&body)
            .unwrap()
            .into_string()
            .unwrap()
    })
    .await
    .unwrap()
}

/// Sends `frame` and returns the first reply that is not a token.
async fn call(socket: &mut Socket, frame: Value) -> Value {
    send(socket, frame).await;
    loop {
        let reply = recv(socket).await;
        if reply["type"] != "token" {
            return reply;
        }
    }
}

async fn assert_usable(socket: &mut Socket) {
    let pong = call(socket, json!({"id": "p", "type": "ping"})).await;
    assert_eq!(pong, json!({"type": "pong", "id": "p"}));
}

fn notes_component() -> PathBuf {
    common::guest("notes")
}

/// The `component` table of a Python (componentize-py) or JavaScript (jco,
/// QuickJS backend) guest under `guests/`, which the server builds on demand.
fn built_component(guest: &str) -> String {
    let dir = common::repo().join("guests").join(guest);
    let name = dir.file_name().unwrap().to_str().unwrap().to_string();
    let build = if guest.starts_with("python/") {
        format!(
            "../../../scripts/componentize-py.sh -d ../../../wit -w tenant componentize -p . -p ../common app -o target/{name}.wasm"
        )
    } else {
        format!(
            "../../../scripts/jco.sh componentize {name}.js --bundle --bundle-config ../bundle.config.mjs \
             --wit ../../../wit --world-name tenant --backend quickjs -o target/{name}.wasm"
        )
    };
    // The guest's deadline covers the generations it waits for: generous,
    // so a busy machine (or an unoptimized build) cannot fail the test.
    format!(
        "component = {{ path = \"{}\", build = \"{build}\", wasm = \"target/{name}.wasm\", watch = [\"../../../wit\", \"../common\"] }}\nlimits = {{ timeout = \"600s\" }}",
        dir.display()
    )
}

/// Sends an `invoke` of `request` and checks that the component refuses it
/// with a `guest_error` whose message contains `reason`.
async fn invoke_refused(socket: &mut Socket, request: Value, reason: &str) {
    let reply = call(
        socket,
        json!({"id": "x", "type": "invoke", "request": request}),
    )
    .await;
    assert_eq!(reply["code"], "guest_error", "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains(reason),
        "{reply}"
    );
}

/// Sends an `invoke` of `request` and returns the component's output.
async fn invoke(socket: &mut Socket, id: &str, request: Value) -> Value {
    let reply = call(
        socket,
        json!({"id": id, "type": "invoke", "request": request}),
    )
    .await;
    assert_eq!(reply["type"], "result", "{reply}");
    reply["output"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_tenant_components_are_built_and_invoked() {
    let python = format!(
        "models = [\"small\"]\n{}",
        built_component("python/assistant")
    );
    let javascript = format!("models = [\"small\"]\n{}", built_component("js/glossary"));
    let server = start(FAKE, &[("py", &python), ("js", &javascript)]).await;

    // Python: a conversation kept in the tenant's kv store across calls.
    let mut socket = server.connect(Some("py")).await;
    let say = |message: &str| json!({"op": "say", "conversation": "c1", "message": message, "max_tokens": 16});
    let first = invoke(&mut socket, "1", say("What is the capital of France?")).await;
    assert_eq!(first["turns"], 1, "{first}");
    assert_eq!(first["model"], "small", "{first}");
    // The fake echoes the chat the guest built, cut at 16 tokens.
    assert_eq!(first["reply"], "echo: system: Yo", "{first}");
    let second = invoke(&mut socket, "2", say("And of Italy?")).await;
    assert_eq!(second["turns"], 2, "{second}");
    let history = invoke(
        &mut socket,
        "3",
        json!({"op": "history", "conversation": "c1"}),
    )
    .await;
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4, "{history}");
    assert_eq!(
        messages[2],
        json!({"role": "user", "content": "And of Italy?"})
    );
    assert_eq!(messages[3]["content"], second["reply"]);
    let listed = invoke(&mut socket, "4", json!({"op": "conversations"})).await;
    assert_eq!(listed, json!({"conversations": ["c1"]}));
    // A Python exception the guest raises is the request's `guest_error`.
    invoke_refused(
        &mut socket,
        json!({"op": "sing"}),
        "`op` must be one of say, history, forget, conversations",
    )
    .await;

    // JavaScript: the model defines a term once; later calls come from kv.
    let mut socket = server.connect(Some("js")).await;
    let defined = invoke(
        &mut socket,
        "1",
        json!({"op": "define", "term": "Paris", "max_tokens": 24}),
    )
    .await;
    assert_eq!(defined["cached"], false, "{defined}");
    assert_eq!(defined["model"], "small", "{defined}");
    let definition = defined["definition"].as_str().unwrap();
    assert!(!definition.is_empty(), "{defined}");
    let again = invoke(&mut socket, "2", json!({"op": "define", "term": "Paris"})).await;
    assert_eq!(again["cached"], true, "{again}");
    assert_eq!(again["definition"], definition);
    let unicode = "a file format — für Modelle";
    invoke(
        &mut socket,
        "3",
        json!({"op": "set", "term": "GGUF", "definition": unicode}),
    )
    .await;
    let terms = invoke(&mut socket, "4", json!({"op": "terms"})).await;
    assert_eq!(terms, json!({"terms": ["GGUF", "Paris"]}));
    let gguf = invoke(&mut socket, "5", json!({"op": "define", "term": "GGUF"})).await;
    assert_eq!(gguf["definition"], unicode, "{gguf}");
    let forgot = invoke(&mut socket, "6", json!({"op": "forget", "term": "Paris"})).await;
    assert_eq!(forgot["forgotten"], true, "{forgot}");
    invoke_refused(&mut socket, json!("not an object"), "must be a JSON object").await;
    // Each tenant's kv data is its own.
    let mut socket = server.connect(Some("py")).await;
    let listed = invoke(&mut socket, "6", json!({"op": "conversations"})).await;
    assert_eq!(listed, json!({"conversations": ["c1"]}));
}

/// A Rust guest (`notes`) and a Python guest (`assistant`) ask for JSON
/// valid against a schema through the WIT `constraint`, on the real SmolLM2
/// (too small to follow a schema by itself): the host enforces it, no logit
/// crosses the sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_get_schema_valid_json_through_the_wit_constraint() {
    if !has_model() {
        return;
    }
    let rust = format!(
        "models = [\"small\"]\ncomponent = \"{}\"",
        notes_component().display()
    );
    let python = format!(
        "models = [\"small\"]\n{}",
        built_component("python/assistant")
    );
    let server = start(SMALL, &[("rs", &rust), ("py", &python)]).await;
    let schema = json!({
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20},
                       "population": {"type": "integer", "minimum": 0},
                       "tags": {"type": "array", "items": {"enum": ["big", "old", "coastal"]}, "maxItems": 3}},
        "required": ["city", "population", "tags"],
        "additionalProperties": false,
    });
    let valid = |value: &Value| {
        let object = value.as_object().unwrap();
        object.len() == 3
            && object["city"]
                .as_str()
                .is_some_and(|c| c.chars().count() <= 20)
            && object["population"].as_u64().is_some()
            && object["tags"].as_array().is_some_and(|t| {
                t.len() <= 3
                    && t.iter()
                        .all(|x| ["big", "old", "coastal"].contains(&x.as_str().unwrap()))
            })
    };
    let mut socket = server.connect(Some("rs")).await;
    let asked = invoke(
        &mut socket,
        "1",
        json!({"op": "ask", "question": "Describe Paris.", "max_tokens": 64, "schema": schema}),
    )
    .await;
    assert!(valid(&asked["value"]), "{asked}");
    let mut socket = server.connect(Some("py")).await;
    let said = invoke(
        &mut socket,
        "1",
        json!({"op": "say", "conversation": "c", "message": "Describe Rome.", "max_tokens": 64, "schema": schema}),
    )
    .await;
    assert!(valid(&said["value"]), "{said}");
    // A bad schema is the guest's error, naming the problem.
    let reply = call(
        &mut socket,
        json!({"id": "2", "type": "invoke", "request":
               {"op": "say", "conversation": "c", "message": "x", "schema": {"type": "nonsense"}}}),
    )
    .await;
    assert_eq!(reply["code"], "guest_error", "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("nonsense"),
        "{reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_checked_at_upgrade_and_by_the_first_frame() {
    let server = start("", &[("acme", "")]).await;
    // A header key.
    let mut socket = server.connect(Some("acme")).await;
    assert_usable(&mut socket).await;
    // An `auth` frame.
    let mut socket = server.connect(None).await;
    send(
        &mut socket,
        json!({"type": "auth", "key": server.key("acme")}),
    )
    .await;
    assert_eq!(
        recv(&mut socket).await,
        json!({"type": "ready", "tenant": "acme"})
    );
    // A request before `auth`: refused, with its id.
    let mut socket = server.connect(None).await;
    send(&mut socket, json!({"id": "early", "type": "ping"})).await;
    let refused = recv(&mut socket).await;
    assert_eq!(refused["code"], "unauthorized", "{refused}");
    assert_eq!(refused["id"], "early", "{refused}");
    // A wrong key in a frame: an error, then the server closes.
    let mut socket = server.connect(None).await;
    send(&mut socket, json!({"type": "auth", "key": "rk_acme_00"})).await;
    let refused = recv(&mut socket).await;
    assert_eq!(refused["code"], "unauthorized", "{refused}");
    // A wrong key in the header: the upgrade is refused with 401.
    let mut request = format!("ws://{}/v1/ws", server.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer rk_acme_bad".parse().unwrap());
    let err = tokio_tungstenite::connect_async(request).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    // HTTP routes want a key too.
    let status = ureq::get(&server.url("/v1/models")).call().unwrap_err();
    assert!(matches!(status, ureq::Error::Status(401, _)), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_error_codes_and_the_connection_stays_usable() {
    let server = start(
        "",
        &[(
            "acme",
            &format!("component = \"{}\"", notes_component().display()),
        )],
    )
    .await;
    let mut socket = server.connect(Some("acme")).await;
    // Every error answering a frame whose string `id` could be read echoes
    // it, oversized frames included; only unreadable ids are left out.
    let text = |frame: Value| Message::Text(frame.to_string().into());
    let cases = [
        (Message::Text("{not json".into()), "bad_request", None),
        (
            text(json!({"id": "1", "type": "dance"})),
            "unknown_type",
            Some("1"),
        ),
        (
            text(json!({"id": "2", "type": "generate"})),
            "bad_request",
            Some("2"),
        ),
        (
            text(json!({"id": "3", "type": "generate", "model": "nope", "prompt": "hi"})),
            "model_not_found",
            Some("3"),
        ),
        (
            text(json!({"id": "4", "type": "pipeline", "pipeline": "secret"})),
            "not_permitted",
            Some("4"),
        ),
        (
            text(json!({"id": "5", "type": "invoke", "request": {"op": "explode"}})),
            "guest_error",
            Some("5"),
        ),
        (
            text(json!({"type": "ping", "payload": "x".repeat(5000), "id": "6"})),
            "frame_too_large",
            Some("6"),
        ),
        (
            text(json!({"id": 7, "type": "ping", "payload": "x".repeat(5000)})),
            "frame_too_large",
            None,
        ),
        (
            Message::Text(format!("{{\"id\": \"8\", {}", "x".repeat(5000)).into()),
            "frame_too_large",
            None,
        ),
        (
            Message::Binary(json!({"id": "9", "type": "ping"}).to_string().into()),
            "bad_request",
            Some("9"),
        ),
    ];
    for (message, code, id) in cases {
        socket.send(message).await.unwrap();
        let reply = recv(&mut socket).await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], code, "{reply}");
        assert_eq!(reply.get("id").and_then(Value::as_str), id, "{reply}");
        assert!(!reply["message"].as_str().unwrap().is_empty());
        assert_usable(&mut socket).await;
    }
    // The tenant's component works through `invoke`, with its own kv data.
    let stored = call(
        &mut socket,
        json!({"id": "7", "type": "invoke", "request": {"op": "remember", "key": "k", "text": "v"}}),
    )
    .await;
    assert_eq!(stored["output"], json!({"stored": "k"}), "{stored}");
    let recalled = call(
        &mut socket,
        json!({"id": "8", "type": "invoke", "request": {"op": "recall", "key": "k"}}),
    )
    .await;
    assert_eq!(recalled["output"]["text"], "v", "{recalled}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated() {
    let component = format!("component = \"{}\"", notes_component().display());
    let acme_models = "models = [\"small\"]\n";
    let server = start(
        FAKE,
        &[
            ("acme", &format!("{acme_models}{component}")),
            ("globex", &component),
        ],
    )
    .await;
    let mut acme = server.connect(Some("acme")).await;
    let mut globex = server.connect(Some("globex")).await;
    call(
        &mut acme,
        json!({"id": "1", "type": "invoke", "request": {"op": "remember", "key": "plan", "text": "secret"}}),
    )
    .await;
    let theirs = call(
        &mut globex,
        json!({"id": "1", "type": "invoke", "request": {"op": "recall", "key": "plan"}}),
    )
    .await;
    assert_eq!(theirs["output"]["text"], Value::Null, "{theirs}");
    let listed = call(&mut globex, json!({"id": "2", "type": "models"})).await;
    assert_eq!(listed["models"], json!([]), "{listed}");
    let refused = call(
        &mut globex,
        json!({"id": "3", "type": "generate", "model": "small", "prompt": "hi"}),
    )
    .await;
    assert_eq!(refused["code"], "model_not_found", "{refused}");
    let mine = call(&mut acme, json!({"id": "2", "type": "models"})).await;
    assert_eq!(mine["models"][0]["name"], "small", "{mine}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rates_are_limited_with_a_retry_hint() {
    let server = start("", &[("acme", "rate = { requests-per-minute = 3 }")]).await;
    let mut socket = server.connect(Some("acme")).await;
    for i in 0..3 {
        let reply = call(&mut socket, json!({"id": i.to_string(), "type": "models"})).await;
        assert_eq!(reply["type"], "models", "{reply}");
    }
    let limited = call(&mut socket, json!({"id": "4", "type": "models"})).await;
    assert_eq!(limited["code"], "rate_limited", "{limited}");
    let retry = limited["retry_after_ms"].as_u64().unwrap();
    assert!((15_000..=20_000).contains(&retry), "{retry}");
    // Pings are free and the connection stays usable.
    assert_usable(&mut socket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_stream_in_order_and_match_the_result() {
    let server = start(FAKE, &[("acme", "models = [\"small\"]")]).await;
    let mut socket = server.connect(Some("acme")).await;
    send(
        &mut socket,
        json!({"id": "g", "type": "generate", "model": "small", "prompt": "The capital of France is",
               "max_tokens": 8, "sampling": {"temperature": 0}}),
    )
    .await;
    let mut streamed = String::new();
    let done = loop {
        let frame = recv(&mut socket).await;
        match frame["type"].as_str().unwrap() {
            "token" => streamed.push_str(frame["text"].as_str().unwrap()),
            "done" => break frame,
            other => panic!("unexpected {other}: {frame}"),
        }
    };
    // The fake's tokens are characters: eight of its echo, in order.
    assert_eq!(done["text"].as_str().unwrap(), streamed);
    assert_eq!(streamed, "echo: Th");
    assert_eq!(done["usage"]["prompt_tokens"], 24);
    assert_eq!(done["finish"], "length");
    // A chat without streaming answers with one `done`.
    let chat = call(
        &mut socket,
        json!({"id": "c", "type": "chat", "model": "small", "stream": false, "max_tokens": 200,
               "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
               "sampling": {"temperature": 0}}),
    )
    .await;
    assert_eq!(
        chat["text"],
        "echo: user: What is the capital of France? Answer in one sentence.\nassistant: ",
        "{chat}"
    );
    assert_eq!(chat["finish"], "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_disconnect_stop_generations() {
    let server = start(
        SLOW,
        &[(
            "acme",
            "models = [\"small\"]\nrate = { concurrent-streams = 1 }",
        )],
    )
    .await;
    let long = |id: &str| {
        json!({"id": id, "type": "generate", "model": "small", "prompt": "Once upon a time",
               "max_tokens": 400, "sampling": {"temperature": 0.8, "seed": 1}})
    };
    let mut socket = server.connect(Some("acme")).await;
    send(&mut socket, long("a")).await;
    let first = recv(&mut socket).await;
    assert_eq!(first["type"], "token", "{first}");
    // One stream at a time for this tenant.
    let busy = call(&mut socket, long("b")).await;
    assert_eq!(busy["code"], "too_many_streams", "{busy}");
    let dup = call(&mut socket, long("a")).await;
    assert_eq!(dup["code"], "duplicate_id", "{dup}");
    send(
        &mut socket,
        json!({"id": "x", "type": "cancel", "target": "a"}),
    )
    .await;
    let mut cancelled = false;
    loop {
        let frame = recv(&mut socket).await;
        match frame["type"].as_str().unwrap() {
            "token" => {}
            "cancelled" => {
                assert_eq!(frame["found"], true);
                cancelled = true;
            }
            "done" => {
                assert_eq!(frame["finish"], "cancelled", "{frame}");
                assert!(frame["usage"]["completion_tokens"].as_u64().unwrap() < 400);
                break;
            }
            other => panic!("unexpected {other}: {frame}"),
        }
    }
    assert!(cancelled);
    // Dropping the connection mid-stream frees the stream slot.
    send(&mut socket, long("c")).await;
    assert_eq!(recv(&mut socket).await["type"], "token");
    drop(socket);
    let mut socket = server.connect(Some("acme")).await;
    let mut freed = false;
    for attempt in 0..50 {
        let reply = call(&mut socket, long(&format!("d{attempt}"))).await;
        if reply["type"] != "error" {
            freed = true;
            break;
        }
        assert_eq!(reply["code"], "too_many_streams", "{reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "the disconnected stream was not cancelled");
}

/// Writes `frames` in one go, so the server reads them back to back.
async fn send_all(socket: &mut Socket, frames: &[Value]) {
    for frame in frames {
        socket
            .feed(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }
    socket.flush().await.unwrap();
}

/// Receives frames (tokens included) until one matching each of `wanted`
/// (`type`, `id`) has arrived; returns them in `wanted`'s order.
async fn recv_each(socket: &mut Socket, wanted: &[(&str, &str)]) -> Vec<Value> {
    let mut found: Vec<Option<Value>> = vec![None; wanted.len()];
    while found.iter().any(Option::is_none) {
        let frame = recv(socket).await;
        let slot = wanted
            .iter()
            .position(|(kind, id)| frame["type"] == *kind && frame["id"] == *id);
        match slot {
            Some(i) => {
                assert!(found[i].is_none(), "a second {frame}");
                found[i] = Some(frame);
            }
            None => assert_eq!(frame["type"], "token", "unexpected {frame}"),
        }
    }
    found.into_iter().map(Option::unwrap).collect()
}

/// A pipeline whose one step (the `abuse` guest) spins until `timeout`.
fn spin_pipeline(dir: &std::path::Path, timeout: &str) -> PathBuf {
    let wasm = common::guest("abuse");
    let body = format!(
        r#"name = "spin"

[components.abuse]
path = "{}"
wasm = "{}"
limits = {{ fuel = 1_000_000_000_000, timeout = "{timeout}" }}

[[steps]]
id = "spin"
component = "abuse"
input = {{ mode = "spin" }}
"#,
        wasm.parent().unwrap().display(),
        wasm.file_name().unwrap().to_str().unwrap(),
    );
    let file = dir.join("spin.toml");
    std::fs::write(&file, body).unwrap();
    file
}

/// `tenant`'s metrics, as Prometheus text.
async fn metrics_of(server: &Server, tenant: &str) -> String {
    common::get_with_key(server.url("/metrics"), server.key(tenant)).await
}

/// How many errors with `code` `metrics` counts for tenant acme.
fn acme_errors(metrics: &str, code: &str) -> u64 {
    let series = format!("realm_errors_total{{code=\"{code}\",tenant=\"acme\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |n| n.parse().unwrap())
}

/// A request's id stays taken until its final frame, cancelled or not: a
/// reuse before then is a `duplicate_id`, a reuse afterwards a new request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_keeps_its_id_until_its_final_frame() {
    let server = start(SLOW, &[("acme", "models = [\"small\"]")]).await;
    let mut socket = server.connect(Some("acme")).await;
    let generate = |max_tokens: u32| {
        json!({"id": "a", "type": "generate", "model": "small", "prompt": "Once upon a time",
               "max_tokens": max_tokens, "sampling": {"temperature": 0}})
    };
    // The first reuse arrives while a long generation runs; the second races
    // the cancel (either order is valid, but the id must follow the final frame).
    send_all(
        &mut socket,
        &[
            generate(200),
            generate(4),
            json!({"id": "x", "type": "cancel", "target": "a"}),
            generate(4),
        ],
    )
    .await;
    let mut frames_of_a = Vec::new();
    let mut cancelled = None;
    while frames_of_a.len() < 3 || cancelled.is_none() {
        let frame = recv(&mut socket).await;
        match (frame["type"].as_str(), frame["id"].as_str()) {
            (Some("token"), _) => {}
            (Some("cancelled"), Some("x")) => cancelled = Some(frame),
            (_, Some("a")) => frames_of_a.push(frame),
            _ => panic!("unexpected {frame}"),
        }
    }
    let cancelled = cancelled.unwrap();
    assert_eq!(cancelled["found"], true, "{cancelled}");
    let summary: Vec<String> = frames_of_a
        .iter()
        .map(|frame| match frame["type"].as_str() {
            Some("error") => format!("error:{}", frame["code"].as_str().unwrap_or("?")),
            Some("done") => format!("done:{}", frame["finish"].as_str().unwrap_or("?")),
            _ => panic!("unexpected {frame}"),
        })
        .collect();
    let reuse_refused = ["error:duplicate_id", "error:duplicate_id", "done:cancelled"];
    let reuse_accepted = ["error:duplicate_id", "done:cancelled", "done:length"];
    assert!(
        summary == reuse_refused || summary == reuse_accepted,
        "frames for id a: {frames_of_a:?}"
    );
    // After its final frame the id is free, and the old request sends nothing more.
    let again = call(&mut socket, generate(4)).await;
    assert_eq!(again["type"], "done", "{again}");
    assert_eq!(again["finish"], "length", "{again}");
    assert_usable(&mut socket).await;
}

/// `cancel` really stops pipelines and invokes (they end with a `cancelled`
/// error and their guests stop), and so does closing the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_disconnect_abort_pipelines_and_invokes() {
    let pipelines = tempfile::tempdir().unwrap();
    let spin = spin_pipeline(pipelines.path(), "1s");
    let notes = format!("component = \"{}\"", notes_component().display());
    let (models, tenant_models) = (SLOW, "models = [\"small\"]");
    let tenant = format!(
        "{tenant_models}\n{notes}\npipelines = {{ spin = \"{}\" }}",
        spin.display()
    );
    let server = start(models, &[("acme", &tenant)]).await;
    let mut socket = server.connect(Some("acme")).await;
    let spin = |id: &str| json!({"id": id, "type": "pipeline", "pipeline": "spin"});
    // Left alone, the spinning guest hits its timeout: one `guest_error`.
    let timed_out = call(&mut socket, spin("p0")).await;
    assert_eq!(timed_out["code"], "guest_error", "{timed_out}");
    assert_eq!(
        acme_errors(&metrics_of(&server, "acme").await, "guest_error"),
        1
    );

    // Cancelled: the pipeline ends at once with a `cancelled` error.
    send_all(
        &mut socket,
        &[
            spin("p1"),
            json!({"id": "c1", "type": "cancel", "target": "p1"}),
        ],
    )
    .await;
    let frames = recv_each(&mut socket, &[("cancelled", "c1"), ("error", "p1")]).await;
    assert_eq!(frames[0]["found"], true, "{}", frames[0]);
    assert_eq!(frames[1]["code"], "cancelled", "{}", frames[1]);
    // Its id is free again.
    let reused = call(&mut socket, json!({"id": "p1", "type": "models"})).await;
    assert_eq!(reused["type"], "models", "{reused}");

    // An invoke whose component is generating: cancelled the same way.
    let ask = json!({"id": "i1", "type": "invoke",
                     "request": {"op": "ask", "question": "Tell me a story.", "max_tokens": 1000}});
    send_all(
        &mut socket,
        &[ask, json!({"id": "c2", "type": "cancel", "target": "i1"})],
    )
    .await;
    let frames = recv_each(&mut socket, &[("cancelled", "c2"), ("error", "i1")]).await;
    assert_eq!(frames[0]["found"], true, "{}", frames[0]);
    assert_eq!(frames[1]["code"], "cancelled", "{}", frames[1]);

    // Hanging up mid-spin aborts the pipeline: no timeout ever follows.
    send(&mut socket, spin("p2")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(socket);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics = metrics_of(&server, "acme").await;
    assert_eq!(acme_errors(&metrics, "guest_error"), 1, "{metrics}");
    assert_eq!(acme_errors(&metrics, "cancelled"), 2, "{metrics}");
}

/// Requests refused by validation (`duplicate_id`, unknown model, pipeline
/// or component) do not use the tenant's request budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_do_not_use_the_request_budget() {
    let pipelines = tempfile::tempdir().unwrap();
    let spin = spin_pipeline(pipelines.path(), "60s");
    let tenant = format!(
        "rate = {{ requests-per-minute = 2 }}\npipelines = {{ spin = \"{}\" }}",
        spin.display()
    );
    let server = start("", &[("acme", &tenant)]).await;
    let mut socket = server.connect(Some("acme")).await;
    // The first request of the budget, still running.
    send(
        &mut socket,
        json!({"id": "s", "type": "pipeline", "pipeline": "spin"}),
    )
    .await;
    let refusals = [
        (
            json!({"id": "s", "type": "pipeline", "pipeline": "spin"}),
            "duplicate_id",
        ),
        (json!({"id": "s", "type": "models"}), "duplicate_id"),
        (
            json!({"id": "g", "type": "generate", "model": "nope", "prompt": "hi"}),
            "model_not_found",
        ),
        (
            json!({"id": "p", "type": "pipeline", "pipeline": "secret"}),
            "not_permitted",
        ),
        (
            json!({"id": "i", "type": "invoke", "request": {}}),
            "not_permitted",
        ),
    ];
    for _ in 0..2 {
        for (frame, code) in &refusals {
            let reply = call(&mut socket, frame.clone()).await;
            assert_eq!(reply["code"], *code, "{reply}");
            assert_eq!(reply["id"], frame["id"], "{reply}");
        }
    }
    send(
        &mut socket,
        json!({"id": "c", "type": "cancel", "target": "s"}),
    )
    .await;
    let frames = recv_each(&mut socket, &[("cancelled", "c"), ("error", "s")]).await;
    assert_eq!(frames[1]["code"], "cancelled", "{}", frames[1]);
    // One request of the budget is left.
    let listed = call(&mut socket, json!({"id": "m1", "type": "models"})).await;
    assert_eq!(listed["type"], "models", "{listed}");
    let limited = call(&mut socket, json!({"id": "m2", "type": "models"})).await;
    assert_eq!(limited["code"], "rate_limited", "{limited}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_quota_is_enforced() {
    // "Hello" is five of the fake's byte tokens: 5 + 4 fit in 12, twice not.
    let server = start(
        FAKE,
        &[(
            "acme",
            "models = [\"small\"]\nrate = { tokens-per-day = 12 }",
        )],
    )
    .await;
    let mut socket = server.connect(Some("acme")).await;
    let generate = |id: &str| {
        json!({"id": id, "type": "generate", "model": "small", "prompt": "Hello", "max_tokens": 4,
               "stream": false, "sampling": {"temperature": 0}})
    };
    assert_eq!(call(&mut socket, generate("1")).await["type"], "done");
    let over = call(&mut socket, generate("2")).await;
    assert_eq!(over["code"], "quota_exceeded", "{over}");
    assert!(over["retry_after_ms"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_routes_answer_and_stream() {
    let server = start(FAKE, &[("acme", "models = [\"small\"]")]).await;
    let auth = format!("Bearer {}", server.key("acme"));
    let url = server.url("/v1/chat/completions");
    let body = json!({"model": "small", "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]});
    let reply = post_json(&url, &auth, &body).await;
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["object"], "chat.completion");
    let answer = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(answer, "echo: user: What is the ", "{reply}");
    assert_eq!(reply["choices"][0]["finish_reason"], "length", "{reply}");
    // Streaming: SSE chunks whose deltas add up to the same answer.
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let text = post_json(&url, &auth, &stream_body).await;
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let mut streamed = String::new();
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(t);
        }
    }
    assert_eq!(streamed, answer);
    // Models, health, metrics (own series only).
    let auth = format!("Bearer {}", server.key("acme"));
    let (models_url, metrics_url, health) = (
        server.url("/v1/models"),
        server.url("/metrics"),
        server.url("/healthz"),
    );
    tokio::task::spawn_blocking(move || {
        let models = ureq::get(&models_url)
            .set("authorization", &auth)
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        let models: Value = serde_json::from_str(&models).unwrap();
        assert_eq!(models["data"][0]["id"], "small");
        assert_eq!(
            ureq::get(&health).call().unwrap().into_string().unwrap(),
            "ok"
        );
        let metrics = ureq::get(&metrics_url)
            .set("authorization", &auth)
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        assert!(
            metrics.contains(
                "realm_tokens_total{adapter=\"\",direction=\"out\",model=\"small\",tenant=\"acme\"}"
            ),
            "{metrics}"
        );
        assert!(metrics.contains("realm_time_to_first_token_seconds_bucket"));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_formats_are_enforced_and_bad_ones_refused() {
    let server = start(FAKE, &[("acme", "models = [\"small\"]")]).await;
    let auth = format!("Bearer {}", server.key("acme"));
    let url = server.url("/v1/chat/completions");
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}},
                        "required": ["city"], "additionalProperties": false});
    let body = json!({"model": "small", "max_tokens": 64,
        "messages": [{"role": "user", "content": "Where is the Louvre?"}],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "place", "strict": true, "schema": schema}}});
    let (status, reply) = common::post_status(&url, &auth, &body).await;
    assert_eq!(status, 200, "{reply}");
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    let place: Value = serde_json::from_str(content).unwrap();
    assert!(
        place["city"].is_string() && place.as_object().unwrap().len() == 1,
        "{reply}"
    );
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");
    // Streamed, the deltas add up to the same document.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let text = post_json(&url, &auth, &streamed).await;
    let deltas: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            let chunk: Value = serde_json::from_str(e).unwrap();
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(deltas, content);
    // The WebSocket takes the same formats, and regular expressions.
    let mut socket = server.connect(Some("acme")).await;
    let frame = json!({"id": "r", "type": "generate", "model": "small", "prompt": "1999-12-31 was",
                       "response_format": {"type": "regex", "pattern": "[0-9]{4}-[0-9]{2}-[0-9]{2}"}});
    let done = call(&mut socket, frame).await;
    assert_eq!(done["text"], "1999-12-31", "{done}");
    let frame = json!({"id": "g", "type": "chat", "model": "small",
                       "messages": [{"role": "user", "content": "Is it yes or no?"}],
                       "response_format": {"type": "grammar", "grammar": "start: \"yes\" | \"no\""}});
    let done = call(&mut socket, frame).await;
    assert_eq!(done["text"], "yes", "{done}");
    let mut object = body.clone();
    object["response_format"] = json!({"type": "json_object"});
    let (status, reply) = common::post_status(&url, &auth, &object).await;
    assert_eq!(status, 200, "{reply}");
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        serde_json::from_str::<Value>(content).unwrap().is_object(),
        "{content}"
    );

    // Refused before a token: a bad schema (named), and what is not implemented.
    let mut bad = body.clone();
    bad["response_format"]["json_schema"]["schema"] = json!({"type": "nonsense"});
    let (status, reply) = common::post_status(&url, &auth, &bad).await;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["error"]["code"], "invalid_input");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("invalid JSON schema") && message.contains("nonsense"),
        "{message}"
    );
    for (field, value) in [
        ("n", json!(2)),
        ("logprobs", json!(true)),
        (
            "functions",
            json!([{"name": "f", "parameters": {"type": "object"}}]),
        ),
    ] {
        let mut asked = body.clone();
        asked[field] = value;
        let (status, reply) = common::post_status(&url, &auth, &asked).await;
        assert_eq!(status, 400, "{field}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("`{field}` is not supported")),
            "{message}"
        );
    }
    let mut harmless = body.clone();
    harmless["n"] = json!(1);
    harmless["user"] = json!("someone");
    assert_eq!(common::post_status(&url, &auth, &harmless).await.0, 200);

    // Tools on the WebSocket: a forced call streams as a `tool_call` frame,
    // and the `done` frame lists it, its text empty.
    let tools = json!([{"type": "function", "function": {"name": "lookup",
        "parameters": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}},
                       "required": ["id"], "additionalProperties": false}}}]);
    let frame = json!({"id": "t", "type": "chat", "model": "small",
                       "messages": [{"role": "user", "content": "Look up item 3."}],
                       "tools": tools, "tool_choice": "required", "parallel_tool_calls": false});
    send(&mut socket, frame).await;
    let mut streamed = Vec::new();
    let done = loop {
        let reply = recv(&mut socket).await;
        match reply["type"].as_str() {
            Some("tool_call") => streamed.push(reply["call"].clone()),
            Some("token") => panic!("text beside a forced call: {reply}"),
            _ => break reply,
        }
    };
    assert_eq!(done["finish"], "tool_calls", "{done}");
    assert_eq!(done["text"], "");
    assert_eq!(done["tool_calls"], json!(streamed), "{done}");
    let function = &streamed[0]["function"];
    assert_eq!(function["name"], "lookup");
    let args: Value = serde_json::from_str(function["arguments"].as_str().unwrap()).unwrap();
    assert!((1..=9).contains(&args["id"].as_i64().unwrap()), "{args}");
    // A history with the call and its result goes back through the template.
    let frame = json!({"id": "t2", "type": "chat", "model": "small", "stream": false,
                       "messages": [{"role": "user", "content": "Look up item 3."},
                                    {"role": "assistant", "tool_calls": streamed},
                                    {"role": "tool", "tool_call_id": streamed[0]["id"], "content": "{\"name\": \"pen\"}"}],
                       "tools": tools});
    let done = call(&mut socket, frame).await;
    assert_eq!(done["type"], "done", "{done}");
    // Bad tools are refused by name before anything runs.
    let frame = json!({"id": "t3", "type": "chat", "model": "small",
                       "messages": [{"role": "user", "content": "hi"}],
                       "tools": tools, "tool_choice": {"type": "function", "function": {"name": "launch"}}});
    let error = call(&mut socket, frame).await;
    assert_eq!(error["code"], "invalid_input", "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("launch"),
        "{error}"
    );
}

/// The rest of the OpenAI surface clients and agent frameworks use: content
/// parts, the `developer` role, `GET /v1/models/{id}`, `POST /v1/embeddings`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_content_parts_models_by_id_and_embeddings() {
    let server = start(
        FAKE,
        &[("acme", "models = [\"small\"]"), ("globex", "models = []")],
    )
    .await;
    let auth = format!("Bearer {}", server.key("acme"));
    let body = json!({"model": "small", "max_tokens": 200, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]});
    let (status, reply) =
        common::post_status(&server.url("/v1/chat/completions"), &auth, &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        "echo: system: Be brief.\nuser: Hello\nthere\nassistant: "
    );
    for (message, refused) in [
        (
            json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}),
            "`image_url` content parts",
        ),
        (
            json!({"role": "tool", "content": "{}"}),
            "needs the `tool_call_id`",
        ),
        (
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}),
            "are not JSON",
        ),
    ] {
        let body = json!({"model": "small", "messages": [message]});
        let (status, reply) =
            common::post_status(&server.url("/v1/chat/completions"), &auth, &body).await;
        assert_eq!(status, 400, "{reply}");
        assert!(
            reply["error"]["message"]
                .as_str()
                .unwrap()
                .contains(refused),
            "{reply}"
        );
    }
    // `name` on a message goes to the template (this one does not show it).
    let body =
        json!({"model": "small", "messages": [{"role": "user", "content": "hi", "name": "bob"}]});
    let (status, reply) =
        common::post_status(&server.url("/v1/chat/completions"), &auth, &body).await;
    assert_eq!(status, 200, "{reply}");

    let get = |path: &str, key: &str| {
        let (url, auth) = (server.url(path), format!("Bearer {key}"));
        async move {
            tokio::task::spawn_blocking(move || {
                match ureq::get(&url).set("authorization", &auth).call() {
                    Ok(r) => (200, r.into_string().unwrap()),
                    Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
                    Err(e) => panic!("{e}"),
                }
            })
            .await
            .unwrap()
        }
    };
    let (status, model) = get("/v1/models/small", server.key("acme")).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&model).unwrap()["id"],
        "small"
    );
    // Another tenant's model looks like one that does not exist.
    let (status, missing) = get("/v1/models/small", server.key("globex")).await;
    assert_eq!(status, 404, "{missing}");

    let body = json!({"model": "small", "input": ["aab", "b"]});
    let (status, reply) = common::post_status(&server.url("/v1/embeddings"), &auth, &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "list");
    assert_eq!(reply["usage"]["prompt_tokens"], 4);
    let first = reply["data"][0]["embedding"].as_array().unwrap();
    assert_eq!(first.len(), 256);
    let norm: f64 = first.iter().map(|v| v.as_f64().unwrap().powi(2)).sum();
    assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    assert_eq!(reply["data"][1]["index"], 1);
    for (body, problem) in [
        (json!({"model": "small", "input": ""}), "empty string"),
        (
            json!({"model": "small", "input": [1, 2]}),
            "token ids are not taken",
        ),
        (
            json!({"model": "small", "input": "x", "dimensions": 8}),
            "256 dimensions",
        ),
        (
            json!({"model": "small", "input": "x", "encoding_format": "base64"}),
            "not supported",
        ),
    ] {
        let (status, reply) =
            common::post_status(&server.url("/v1/embeddings"), &auth, &body).await;
        assert_eq!(status, 400, "{reply}");
        assert!(
            reply["error"]["message"]
                .as_str()
                .unwrap()
                .contains(problem),
            "{reply}"
        );
    }
    let globex = format!("Bearer {}", server.key("globex"));
    let body = json!({"model": "small", "input": "x"});
    assert_eq!(
        common::post_status(&server.url("/v1/embeddings"), &globex, &body)
            .await
            .0,
        404
    );
}

/// Embeddings spend the tenant's token quota like prompts do: a tenant
/// cannot embed past it, and another tenant's quota is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_charged_to_the_tenants_quota() {
    let server = start(
        FAKE,
        &[
            (
                "acme",
                "models = [\"small\"]\nrate = { tokens-per-day = 6 }",
            ),
            ("globex", "models = [\"small\"]"),
        ],
    )
    .await;
    let url = server.url("/v1/embeddings");
    let acme = format!("Bearer {}", server.key("acme"));
    let body = json!({"model": "small", "input": "abcd"});
    assert_eq!(common::post_status(&url, &acme, &body).await.0, 200);
    let (status, reply) = common::post_status(&url, &acme, &body).await;
    assert_eq!(status, 429, "{reply}");
    assert_eq!(reply["error"]["code"], "quota_exceeded", "{reply}");
    let globex = format!("Bearer {}", server.key("globex"));
    assert_eq!(common::post_status(&url, &globex, &body).await.0, 200);
}

/// The official `openai` Python client against the OpenAI-compatible routes:
/// models, chat whole and streamed (with usage), completions with stop,
/// and its typed errors for unknown models, bad keys and rate limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works() {
    if !has_model() {
        return;
    }
    let python = tokio::task::spawn_blocking(common::test_python)
        .await
        .unwrap();
    let server = start(
        SMALL,
        &[
            ("acme", "models = [\"small\"]"),
            ("slow", "rate = { requests-per-minute = 1 }"),
        ],
    )
    .await;
    let summary = common::run_python(
        python,
        "openai_client.py",
        &[
            ("REALM_BASE_URL", server.url("/v1")),
            ("REALM_KEY", server.key("acme").to_string()),
            ("REALM_LIMITED_KEY", server.key("slow").to_string()),
        ],
    )
    .await;
    assert!(summary["answer"].as_str().unwrap().contains("Paris"));
}

/// Runs `tests/python/SCRIPT` against a server whose tenant `acme` may use
/// the real SmolLM2 as `small` (REALM_BASE_URL, REALM_KEY); its summary, or
/// `None` when the model is absent.
async fn small_model_script(script: &str) -> Option<Value> {
    if !has_model() {
        return None;
    }
    let python = tokio::task::spawn_blocking(common::test_python)
        .await
        .unwrap();
    let server = start(SMALL, &[("acme", "models = [\"small\"]")]).await;
    let env = [
        ("REALM_BASE_URL", server.url("/v1")),
        ("REALM_KEY", server.key("acme").to_string()),
    ];
    Some(common::run_python(python, script, &env).await)
}

/// Strict `json_schema` requests through the official `openai` client on
/// the real SmolLM2 (too small to follow a schema by itself): every reply
/// validates with Python's `jsonschema` (tests/python/structured_output.py;
/// 10 prompts × 5 schemas here, `REALM_SO_PROMPTS=50` for the full run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_json_schemas_validate_through_the_openai_client() {
    let Some(summary) = small_model_script("structured_output.py").await else {
        return;
    };
    assert_eq!(
        summary["constrained_valid"], summary["requests"],
        "{summary}"
    );
}

/// Tool calling through the official `openai` client on the real SmolLM2
/// (whose template knows no tools: the generic tool prompt): forced calls
/// validate, streamed calls reassemble to the non-streamed ones, a round
/// trip through a `tool` message gets an answer, bad tools are 400s
/// (tests/python/tool_calling.py).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_validate_stream_and_round_trip_through_the_openai_client() {
    let Some(summary) = small_model_script("tool_calling.py").await else {
        return;
    };
    assert_eq!(summary["refused"], 5, "{summary}");
}

/// OpenAI's presence and frequency penalties steer greedy decoding away from
/// what it already said; out of range they are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_frequency_penalties_change_what_is_said() {
    if !has_model() {
        return;
    }
    let server = start(SMALL, &[("acme", "models = [\"small\"]")]).await;
    let auth = format!("Bearer {}", server.key("acme"));
    let url = server.url("/v1/completions");
    let complete = |prompt: &str, extra: Value| {
        let mut body =
            json!({"model": "small", "prompt": prompt, "max_tokens": 32, "temperature": 0});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (url, auth) = (url.clone(), auth.clone());
        async move {
            let (status, reply) = common::post_status(&url, &auth, &body).await;
            assert_eq!(status, 200, "{reply}");
            reply["choices"][0]["text"].as_str().unwrap().to_string()
        }
    };
    let story = "Once upon a time, in a small village by the sea,";
    let plain = complete(story, json!({})).await;
    for penalty in ["presence_penalty", "frequency_penalty"] {
        let steered = complete(story, json!({penalty: 2.0})).await;
        assert_ne!(steered, plain, "{penalty}");
        let body = json!({"model": "small", "prompt": story, penalty: 2.5});
        let (status, refused) = common::post_status(&url, &auth, &body).await;
        assert_eq!(status, 400, "{refused}");
        assert!(
            refused["error"]["message"]
                .as_str()
                .unwrap()
                .contains(penalty)
        );
    }
    // A count so far lowers a token more each time it is said.
    let distinct = |text: &str| {
        let mut words: Vec<&str> = text.split([',', ' ']).filter(|w| !w.is_empty()).collect();
        words.sort_unstable();
        words.dedup();
        words.len()
    };
    let counting = "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3,";
    let plain = complete(counting, json!({})).await;
    let steered = complete(counting, json!({"frequency_penalty": 2.0})).await;
    assert!(
        distinct(&steered) > distinct(&plain),
        "{steered:?} vs {plain:?}"
    );
}

/// An agent framework's tool loop (LangChain's `ChatOpenAI`, pointed at
/// Realm): the model is made to call a tool, the framework runs it and
/// sends the result back, and the model answers (tests/python/agent_loop.py).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_framework_runs_a_tool_loop() {
    let Some(summary) = small_model_script("agent_loop.py").await else {
        return;
    };
    assert_eq!(summary["tool_runs"], 1, "{summary}");
}

/// 64 WebSocket clients, each with two requests in flight at a time, for
/// `REALM_LOAD_SECONDS` (default 5; the benchmark in docs/benchmarks.md uses
/// 60). Every request's token frames must add up to its `done` text exactly
/// (nothing lost or duplicated), arrive before its `done`, and never follow
/// it. The server keeps a usage ledger (SQLite), which must end up holding
/// exactly the tokens the `done` frames report. Prints throughput and
/// time-to-first-token percentiles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_64_clients_lose_and_mix_nothing() {
    if !has_model() {
        return;
    }
    let ledger_dir = tempfile::tempdir().unwrap();
    let ledger = ledger_dir
        .path()
        .join("realm.sqlite3")
        .display()
        .to_string();
    let seconds: u64 = std::env::var("REALM_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    // REALM_LOAD_MAX_SEQUENCES=1 runs the same load without batching, for comparison.
    let models = match std::env::var("REALM_LOAD_MAX_SEQUENCES") {
        Ok(n) => format!("{SMALL}\n[batching]\nmax-sequences = {n}"),
        Err(_) => SMALL.to_string(),
    };
    let models = format!("{models}\n[database]\nurl = \"{ledger}\"\nflush-interval = \"200ms\"");
    let server = Arc::new(start(&models, &[("acme", "models = [\"small\"]")]).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut clients = Vec::new();
    for client in 0..64 {
        let server = server.clone();
        clients.push(tokio::spawn(async move {
            let mut socket = server.connect(Some("acme")).await;
            // requests, tokens, ttfts, (prompt tokens, cached prompt tokens)
            let mut stats = (0usize, 0usize, Vec::new(), (0u64, 0u64));
            let mut next = 0;
            // id -> (sent at, first token at, streamed text)
            let mut open: std::collections::HashMap<
                String,
                (std::time::Instant, Option<Duration>, String),
            > = Default::default();
            loop {
                while open.len() < 2 && tokio::time::Instant::now() < deadline {
                    let id = format!("{client}-{next}");
                    next += 1;
                    send(
                        &mut socket,
                        json!({"id": id, "type": "generate", "model": "small",
                               // Each client's prompts share a beginning: its
                               // later ones reuse the cached prefix.
                               "prompt": format!("Client {client} of the load test counts upward, one number after another, separated by commas: {next},"),
                               "max_tokens": 8, "sampling": {"temperature": 0.7, "seed": next}}),
                    )
                    .await;
                    open.insert(id, (std::time::Instant::now(), None, String::new()));
                }
                if open.is_empty() {
                    break;
                }
                let frame = recv(&mut socket).await;
                let id = frame["id"]
                    .as_str()
                    .expect("every frame has an id")
                    .to_string();
                let entry = open
                    .get_mut(&id)
                    .unwrap_or_else(|| panic!("frame for a finished or unknown request: {frame}"));
                match frame["type"].as_str().unwrap() {
                    "token" => {
                        entry.1.get_or_insert_with(|| entry.0.elapsed());
                        entry.2.push_str(frame["text"].as_str().unwrap());
                    }
                    "done" => {
                        let (_, ttft, text) = open.remove(&id).unwrap();
                        assert_eq!(frame["text"].as_str().unwrap(), text, "request {id}");
                        stats.0 += 1;
                        stats.1 += frame["usage"]["completion_tokens"].as_u64().unwrap() as usize;
                        stats.3.0 += frame["usage"]["prompt_tokens"].as_u64().unwrap();
                        stats.3.1 += frame["usage"]["cached_tokens"].as_u64().unwrap();
                        if let Some(t) = ttft {
                            stats.2.push(t);
                        }
                    }
                    other => panic!("unexpected {other}: {frame}"),
                }
            }
            stats
        }));
    }
    let started = std::time::Instant::now();
    let (mut requests, mut tokens, mut ttfts) = (0, 0, Vec::new());
    let (mut prompt, mut cached) = (0, 0);
    for client in clients {
        let (r, t, f, (p, c)) = client.await.unwrap();
        requests += r;
        tokens += t;
        ttfts.extend(f);
        prompt += p;
        cached += c;
    }
    let elapsed = started.elapsed().as_secs_f64();
    ttfts.sort();
    let pct = |p: f64| ttfts[((ttfts.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0;
    assert!(requests >= 64, "every client finished at least one request");
    // Every token served is in the ledger once its last flush is written.
    let served = prompt as i64 + tokens as i64;
    let db = realm_host::control::Db::open(&ledger).await.unwrap();
    let mut written = 0;
    for _ in 0..100 {
        let rows = db
            .query(
                "SELECT CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(requests), 0) AS BIGINT) FROM usage WHERE tenant_id = 'acme'",
                vec![],
            )
            .await
            .unwrap();
        written = rows[0][0].int();
        if written == served {
            assert_eq!(
                rows[0][1].int(),
                requests as i64,
                "one ledger request per request"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(written, served, "the ledger holds every token served");
    assert!(
        cached > 0,
        "clients' later prompts reuse their cached beginnings"
    );
    eprintln!(
        "load: 64 clients x 2 in flight, {elapsed:.1} s: {requests} requests, {tokens} tokens \
         ({:.1} tok/s), time to first token p50 {:.0} ms, p99 {:.0} ms; \
         prefix cache: {cached} of {prompt} prompt tokens ({:.0}%)",
        tokens as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        100.0 * cached as f64 / prompt.max(1) as f64
    );
}

/// A `realm-host serve` process started from the real binary.
struct ServeProcess {
    child: tokio::process::Child,
    addr: SocketAddr,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl ServeProcess {
    /// Starts the binary on `config` with `home` as `REALM_HOME` and waits
    /// for its "listening on" line.
    async fn start(config: &std::path::Path, home: &std::path::Path) -> ServeProcess {
        let (child, addr, log) = common::spawn_serve(config, home).await;
        ServeProcess { child, addr, log }
    }

    /// Waits until the log has `count` lines containing `text`.
    async fn wait_for_log(&self, text: &str, count: usize) {
        for _ in 0..200 {
            if self.log.lock().unwrap().matches(text).count() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no {text:?} (x{count}) in:\n{}", self.log.lock().unwrap());
    }

    /// Removes `tenant` from `config`, sends SIGHUP and waits for the
    /// `reloads`-th reload.
    async fn remove_tenant(&self, config: &std::path::Path, tenant: &str, reloads: usize) {
        let mut doc: toml_edit::DocumentMut =
            std::fs::read_to_string(config).unwrap().parse().unwrap();
        doc["tenants"]
            .as_table_mut()
            .unwrap()
            .remove(tenant)
            .unwrap();
        std::fs::write(config, doc.to_string()).unwrap();
        self.signal("HUP");
        self.wait_for_log("configuration reloaded", reloads).await;
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    async fn connect(&self, key: &str) -> Socket {
        common::ws::connect(self.addr, key).await
    }
}

/// The real binary: SIGHUP loads a new tenant's key while a stream on an
/// existing connection goes on untouched; SIGTERM stops new work, lets the
/// running stream finish, and exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_sigterm_drains_the_real_binary() {
    let dir = tempfile::tempdir().unwrap();
    let Some(home) = common::home_with_smollm2(dir.path()) else {
        return;
    };
    let config = dir.path().join("realm.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\ndrain-timeout = \"60s\"\n[models]\nsmall = \"smollm2-135m-instruct\"\n\
         [tenants.acme]\nmodels = [\"small\"]\n",
    )
    .unwrap();
    let acme = common::new_key(&config, "acme");
    let server = ServeProcess::start(&config, &home).await;
    let mut socket = server.connect(&acme).await;
    let long = |id: &str| {
        json!({"id": id, "type": "generate", "model": "small", "max_tokens": 48,
               "prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
               "sampling": {"temperature": 0.0}})
    };
    send(&mut socket, long("a")).await;
    let first = recv(&mut socket).await;
    assert_eq!(first["type"], "token", "{first}");

    // SIGHUP: a tenant added to the file (by `keys new`) can connect without
    // a restart, and the running stream is not disturbed.
    let beta = common::new_key(&config, "beta");
    server.signal("HUP");
    server.wait_for_log("configuration reloaded", 1).await;
    let mut second = server.connect(&beta).await;
    assert_eq!(
        call(&mut second, json!({"id": "m", "type": "models"})).await["type"],
        "models"
    );
    // A reload that removes the tenant revokes its key: its connection is
    // told so and closed (policy violation).
    server.remove_tenant(&config, "beta", 2).await;
    let refused = recv(&mut second).await;
    assert_eq!(refused["code"], "unauthorized", "{refused}");
    assert_closed_with(&mut second, 1008).await;
    let finished = loop {
        let frame = recv(&mut socket).await;
        if frame["type"] != "token" {
            break frame;
        }
    };
    assert_eq!(finished["type"], "done", "{finished}");

    // SIGTERM mid-stream: the stream finishes while new requests on its
    // connection are answered with `shutting_down` (pings still pong); then
    // the server closes the connection, and the process exits 0.
    send(&mut socket, long("b")).await;
    let first = recv(&mut socket).await;
    assert_eq!(first["type"], "token", "{first}");
    server.signal("TERM");
    server.wait_for_log("shutting down", 1).await;
    send_all(
        &mut socket,
        &[
            json!({"id": "late", "type": "models"}),
            json!({"id": "alive", "type": "ping"}),
        ],
    )
    .await;
    let frames = recv_each(
        &mut socket,
        &[("error", "late"), ("pong", "alive"), ("done", "b")],
    )
    .await;
    assert_eq!(frames[0]["code"], "shutting_down", "{}", frames[0]);
    let finished = &frames[2];
    assert_eq!(finished["usage"]["completion_tokens"], 48, "{finished}");
    assert_going_away(&mut socket).await;
    let mut server = server;
    let status = tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .expect("the process exits after draining")
        .unwrap();
    assert!(status.success(), "{status}\n{}", server.log.lock().unwrap());
    assert!(
        tokio::net::TcpStream::connect(server.addr).await.is_err(),
        "the port is closed"
    );
}

/// Writes a config for the real binary whose tenants (`names`) may run the
/// `spin` pipeline (spinning up to 30 s), adds a key for each, and starts it.
async fn spin_process(dir: &std::path::Path, names: &[&str]) -> (ServeProcess, Vec<String>) {
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let spin = spin_pipeline(dir, "30s");
    let mut body = "listen = \"127.0.0.1:0\"\ndrain-timeout = \"60s\"\n".to_string();
    for name in names {
        body.push_str(&format!(
            "[tenants.{name}]\npipelines = {{ spin = \"{}\" }}\n",
            spin.display()
        ));
    }
    let config = dir.join("realm.toml");
    std::fs::write(&config, body).unwrap();
    let keys = names.iter().map(|n| common::new_key(&config, n)).collect();
    (ServeProcess::start(&config, &home).await, keys)
}

/// Sends `spin` as request `id` and waits until it runs (frames on a
/// connection are handled in order, so the pong follows its start).
async fn start_spin(socket: &mut Socket, id: &str) {
    send(
        socket,
        json!({"id": id, "type": "pipeline", "pipeline": "spin"}),
    )
    .await;
    assert_usable(socket).await;
}

/// Cancels the running `target` and checks both final frames.
async fn cancel_spin(socket: &mut Socket, target: &str) {
    send(
        socket,
        json!({"id": "c", "type": "cancel", "target": target}),
    )
    .await;
    let frames = recv_each(socket, &[("cancelled", "c"), ("error", target)]).await;
    assert_eq!(frames[0]["found"], true, "{}", frames[0]);
    assert_eq!(frames[1]["code"], "cancelled", "{}", frames[1]);
}

/// A tenant removed by a reload: its connection is told `unauthorized` and
/// closed, and what it had started stops; another tenant's goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_tenants_connections_close_and_their_work_stops() {
    let dir = tempfile::tempdir().unwrap();
    let (server, keys) = spin_process(dir.path(), &["acme", "beta"]).await;
    let mut socket = server.connect(&keys[1]).await;
    let mut other = server.connect(&keys[0]).await;
    start_spin(&mut socket, "s").await;
    start_spin(&mut other, "t").await;

    let config = dir.path().join("realm.toml");
    server.remove_tenant(&config, "beta", 1).await;
    let refused = recv(&mut socket).await;
    assert_eq!(refused["code"], "unauthorized", "{refused}");
    assert_closed_with(&mut socket, 1008).await;
    assert_usable(&mut other).await;
    cancel_spin(&mut other, "t").await;
}

/// Waits for the server to close `socket` with close code `code`.
async fn assert_closed_with(socket: &mut Socket, code: u16) {
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(Message::Text(text))) => panic!("a frame after the refusal: {text}"),
                Some(Ok(_)) => {}
                other => panic!("closed without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("the server closes the connection");
    assert_eq!(closed, code);
}

/// Waits for the server to close `socket` and checks it said 1001
/// (going away) with reason `shutting_down`.
async fn assert_going_away(socket: &mut Socket) {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let closed = tokio::time::timeout(Duration::from_secs(30), socket.next())
        .await
        .expect("the server closes the drained connection");
    let Some(Ok(Message::Close(Some(frame)))) = closed else {
        panic!("not a close frame with a status: {closed:?}");
    };
    assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
    assert_eq!(frame.reason, "shutting_down", "{frame:?}");
}

/// SIGTERM: an idle connection is closed at once with 1001; while a running
/// request keeps another one open, the port answers `/readyz` and upgrades
/// with 503; once that request ends (here cancelled), its connection is
/// closed with 1001 too and the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_drained_connections_with_1001_and_refuses_upgrades_with_503() {
    let dir = tempfile::tempdir().unwrap();
    let (server, keys) = spin_process(dir.path(), &["acme"]).await;
    let mut busy = server.connect(&keys[0]).await;
    let mut idle = server.connect(&keys[0]).await;
    start_spin(&mut busy, "s").await;
    server.signal("TERM");
    server.wait_for_log("shutting down", 1).await;
    assert_going_away(&mut idle).await;

    let url = format!("http://{}/readyz", server.addr);
    let readyz = tokio::task::spawn_blocking(move || match ureq::get(&url).call() {
        Err(ureq::Error::Status(status, response)) => (status, response.into_string().unwrap()),
        other => panic!("{other:?}"),
    })
    .await
    .unwrap();
    assert_eq!(readyz, (503, "draining".to_string()));
    let mut request = format!("ws://{}/v1/ws", server.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", keys[0]).parse().unwrap(),
    );
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default());
            assert!(body.contains("shutting_down"), "{body}");
        }
        other => panic!("{other:?}"),
    }

    cancel_spin(&mut busy, "s").await;
    assert_going_away(&mut busy).await;
    let mut server = server;
    let status = tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .expect("the process exits after draining")
        .unwrap();
    assert!(status.success(), "{status}\n{}", server.log.lock().unwrap());
}
