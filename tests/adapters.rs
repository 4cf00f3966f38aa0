//! Per-tenant LoRA adapters through the real `realm-host serve` on the real
//! SmolLM2: tenants stream with their own adapters at once and each gets
//! its adapter's output; nobody can name another tenant's adapter; SIGHUP
//! adds and removes adapters without disturbing a running generation.

mod common;

use common::ws::{Socket, recv, send};

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use realm_models::engine::synthetic_adapter_file;
use realm_models::gguf::{GgmlType, GgufFile};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Writes a random rank-8 adapter of SmolLM2 (`seed`) to `dir/name.gguf`.
fn write_adapter(dir: &Path, base: &GgufFile, name: &str, seed: u64) {
    let bytes = synthetic_adapter_file(base, 8, seed, 0.1, GgmlType::F32).unwrap();
    std::fs::write(dir.join(format!("{name}.gguf")), bytes).unwrap();
}

/// Writes the header of a LoRA adapter for Gemma 3 (no tensors) to `path`:
/// an adapter for another model than SmolLM2.
fn write_gemma3_adapter(path: &Path) {
    let mut w = realm_models::gguf::GgufWriter::new();
    for (key, value) in [
        ("general.architecture", "gemma3"),
        ("general.type", "adapter"),
        ("adapter.type", "lora"),
    ] {
        w.meta(key, realm_models::gguf::MetaValue::String(value.into()));
    }
    std::fs::write(path, w.to_bytes()).unwrap();
}

async fn connect(addr: std::net::SocketAddr, key: &str) -> Socket {
    let mut request = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(recv(&mut socket).await["type"], "ready");
    socket
}

/// A greedy chat of 16 tokens on `model`, as a WebSocket frame.
fn chat(id: &str, model: &str) -> Value {
    json!({"id": id, "type": "chat", "model": model, "max_tokens": 16,
           "sampling": {"temperature": 0.0},
           "messages": [{"role": "user", "content": "Tell me about the sea."}]})
}

/// The streamed text of request `id` and its `done` frame.
async fn streamed(socket: &mut Socket, id: &str) -> (String, Value) {
    let mut text = String::new();
    loop {
        let frame = recv(socket).await;
        assert_eq!(frame["id"], id, "{frame}");
        match frame["type"].as_str() {
            Some("token") => text.push_str(frame["text"].as_str().unwrap()),
            Some("done") => return (text, frame),
            _ => panic!("{frame}"),
        }
    }
}

/// The reply text of a non-streamed OpenAI chat on `model` (with
/// `adapter`, if given), or the error.
async fn http_chat(
    addr: std::net::SocketAddr,
    key: &str,
    model: &str,
    adapter: Option<&str>,
) -> (u16, Value) {
    let mut body = json!({"model": model, "max_tokens": 16, "temperature": 0,
                          "messages": [{"role": "user", "content": "Tell me about the sea."}]});
    if let Some(adapter) = adapter {
        body["adapter"] = json!(adapter);
    }
    let url = format!("http://{addr}/v1/chat/completions");
    common::post_status(&url, &format!("Bearer {key}"), &body).await
}

fn text_of(reply: &Value) -> String {
    reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_run_their_own_adapters_in_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let Some(home) = common::home_with_smollm2(dir.path()) else {
        return;
    };
    let base = GgufFile::open(&home.join("models/smollm2-135m-instruct.gguf")).unwrap();
    for (name, seed) in [("a1", 1), ("a2", 2), ("a3", 3)] {
        write_adapter(dir.path(), &base, name, seed);
    }
    let config = dir.path().join("realm.toml");
    let adapters = |names: &[&str]| -> String {
        (names.iter())
            .map(|n| format!("[adapters.{n}]\nmodel = \"small\"\nsource = \"{n}.gguf\"\n"))
            .collect()
    };
    let notes = common::guest("notes").display().to_string();
    let write = |adapters: &str, acme: &str| {
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\n[models]\nsmall = \"smollm2-135m-instruct\"\n{adapters}\
                 [tenants.acme]\nmodels = [\"small\"]\nadapters = {acme}\ncomponent = \"{notes}\"\n\
                 [tenants.globex]\nmodels = [\"small\"]\nadapters = [\"a2\"]\ndefault-adapter = \"a2\"\n"
            ),
        )
        .unwrap()
    };
    write(&adapters(&["a1", "a2"]), "[\"a1\"]");
    let acme = common::new_key(&config, "acme");
    let globex = common::new_key(&config, "globex");
    let (child, addr, log) = common::spawn_serve(&config, &home).await;

    // Alone: the base model and each adapter answer differently. globex's
    // plain `small` runs its default adapter.
    let (status, plain) = http_chat(addr, &acme, "small", None).await;
    assert_eq!(status, 200, "{plain}");
    let (status, a1) = http_chat(addr, &acme, "small:a1", None).await;
    assert_eq!(status, 200, "{a1}");
    let (status, a1_field) = http_chat(addr, &acme, "small", Some("a1")).await;
    assert_eq!(status, 200, "{a1_field}");
    let (status, a2) = http_chat(addr, &globex, "small", None).await;
    assert_eq!(status, 200, "{a2}");
    let used = |reply: &Value| reply["usage"]["completion_tokens"].as_u64().unwrap();
    let (plain_used, a1_used) = (used(&plain), used(&a1) + used(&a1_field));
    let (plain, a1, a2) = (text_of(&plain), text_of(&a1), text_of(&a2));
    assert_eq!(text_of(&a1_field), a1, "`adapter` is `model: small:a1`");
    assert!(
        plain != a1 && plain != a2 && a1 != a2,
        "each adapter changes the output:\nbase: {plain:?}\na1: {a1:?}\na2: {a2:?}"
    );

    // Both streaming at once, in one batch: each gets its adapter's output.
    let (mut sa, mut sg) = (connect(addr, &acme).await, connect(addr, &globex).await);
    send(&mut sa, chat("x", "small:a1")).await;
    send(&mut sg, chat("y", "small:a2")).await;
    let ((text_a, done_a), (text_g, done_g)) =
        tokio::join!(streamed(&mut sa, "x"), streamed(&mut sg, "y"));
    assert_eq!(text_a, a1, "{done_a}");
    assert_eq!(text_g, a2, "{done_g}");

    // Another tenant's adapter looks like one that does not exist, however
    // it is named, and the refusal names nothing of the other tenant's.
    for (model, adapter) in [
        ("small:a1", None),
        ("small", Some("a1")),
        ("small:zz", None),
    ] {
        let (status, error) = http_chat(addr, &globex, model, adapter).await;
        assert_eq!(status, 404, "{error}");
        assert_eq!(error["error"]["code"], "model_not_found", "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        let offered = message.split("(available:").nth(1).unwrap();
        assert_eq!(offered, " small, small:a2)", "{message}");
    }
    send(&mut sa, chat("z", "small:a2")).await;
    let refused = recv(&mut sa).await;
    assert_eq!(refused["code"], "model_not_found", "{refused}");
    let (status, error) = http_chat(addr, &acme, "small:a1", Some("a2")).await;
    assert_eq!(status, 400, "two adapters named: {error}");

    // Listed as models, each tenant its own.
    let models = common::get_with_key(format!("http://{addr}/v1/models"), &acme).await;
    let ids: Vec<String> = (serde_json::from_str::<Value>(&models).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter())
    .map(|m| m["id"].as_str().unwrap().to_string())
    .collect();
    assert_eq!(ids, ["small", "small:a1"]);

    // Embeddings come from the base model, default adapter or not.
    let embed = |model: &str| {
        let url = format!("http://{addr}/v1/embeddings");
        let body = json!({"model": model, "input": "the sea"});
        let auth = format!("Bearer {globex}");
        async move { common::post_status(&url, &auth, &body).await }
    };
    let (status, vectors) = embed("small").await;
    assert_eq!(status, 200, "{vectors}");
    let (status, refused) = embed("small:a2").await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused
            .to_string()
            .contains("embeddings come from base models"),
        "{refused}"
    );

    // Usage by adapter, in the tenant's own metrics.
    let metrics = common::get_with_key(format!("http://{addr}/metrics"), &acme).await;
    let out = |adapter: &str| {
        let series = format!(
            "realm_tokens_total{{adapter=\"{adapter}\",direction=\"out\",model=\"small\",tenant=\"acme\"}} "
        );
        (metrics.lines())
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0, |v| v.parse::<u64>().unwrap())
    };
    let streamed_used = done_a["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(out("a1"), a1_used + streamed_used, "{metrics}");
    assert_eq!(out(""), plain_used, "{metrics}");
    assert!(!metrics.contains("globex"), "{metrics}");
    assert!(
        !metrics.contains("realm_adapter_bytes"),
        "host-wide: {metrics}"
    );

    // The tenant's component (WIT `chat`) names the adapter the same way
    // and gets the same reply; another tenant's is not found.
    let ask = |id: &str, model: &str| {
        json!({"id": id, "type": "invoke", "request": {"op": "ask", "model": model,
               "question": "Tell me about the sea.", "max_tokens": 16}})
    };
    send(&mut sa, ask("g1", "small:a1")).await;
    let guest = recv(&mut sa).await;
    assert_eq!(guest["type"], "result", "{guest}");
    let (_, direct) = common::post_status(
        &format!("http://{addr}/v1/chat/completions"),
        &format!("Bearer {acme}"),
        &json!({"model": "small:a1", "max_tokens": 16, "temperature": 0, "messages": [
            {"role": "system", "content": "Answer briefly using these notes:\n"},
            {"role": "user", "content": "Tell me about the sea."}]}),
    )
    .await;
    assert_eq!(
        guest["output"]["answer"].as_str().unwrap(),
        text_of(&direct).trim(),
        "{guest}"
    );
    send(&mut sa, ask("g2", "small:a2")).await;
    let refused = recv(&mut sa).await;
    assert!(refused.to_string().contains("model-not-found"), "{refused}");

    // SIGHUP: a1 is removed and a3 granted while a1 streams; the running
    // generation finishes, new requests see the new grants.
    let long = json!({"id": "long", "type": "generate", "model": "small:a1", "max_tokens": 48,
                      "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "sampling": {"temperature": 0.0}});
    send(&mut sa, long).await;
    assert_eq!(recv(&mut sa).await["type"], "token");
    // Keys stay as `keys new` wrote them: only the adapters change.
    let mut doc: toml_edit::DocumentMut =
        std::fs::read_to_string(&config).unwrap().parse().unwrap();
    let fresh: toml_edit::DocumentMut = adapters(&["a2", "a3"]).parse().unwrap();
    doc["adapters"] = fresh["adapters"].clone();
    doc["tenants"]["acme"]["adapters"] = toml_edit::value(toml_edit::Array::from_iter(["a3"]));
    std::fs::write(&config, doc.to_string()).unwrap();
    let pid = child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    for _ in 0..400 {
        if log.lock().unwrap().contains("configuration reloaded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(log.lock().unwrap().contains("configuration reloaded"));
    let (_, done) = streamed(&mut sa, "long").await;
    assert!(
        done["usage"]["completion_tokens"].as_u64().unwrap() > 1,
        "{done}"
    );
    let (status, gone) = http_chat(addr, &acme, "small:a1", None).await;
    assert_eq!(status, 404, "{gone}");
    let (status, a3) = http_chat(addr, &acme, "small:a3", None).await;
    assert_eq!(status, 200, "{a3}");
    assert_ne!(text_of(&a3), a1);
    drop(child);
}

/// The adapter cache keeps what fits `max-adapter-bytes`, drops the least
/// recently used idle adapter to make room, never drops one in use (a
/// request for another then waits for a retry instead of memory growing),
/// and refuses an adapter larger than the whole budget.
#[test]
fn adapters_stay_within_their_memory_budget() {
    use realm_host::inference::adapters::{AdapterCache, AdapterError, AdapterSource};
    let dir = tempfile::tempdir().unwrap();
    let Some(store) = common::model_store_with("smollm2-135m-instruct") else {
        return;
    };
    let base_path = store.join("smollm2-135m-instruct.gguf");
    let base = GgufFile::open(&base_path).unwrap();
    let source = |name: &str, seed| {
        write_adapter(dir.path(), &base, name, seed);
        AdapterSource {
            base: base_path.clone(),
            file: dir.path().join(format!("{name}.gguf")),
            scale: 1.0,
        }
    };
    let (s1, s2, s3) = (source("a1", 1), source("a2", 2), source("a3", 3));
    let (shape, k1) = s1.check().unwrap();
    let ((_, k2), (_, k3)) = (s2.check().unwrap(), s3.check().unwrap());
    let bytes = shape.bytes as u64;
    assert_eq!(shape.rank, 8);
    assert_eq!(shape.targets.len(), 30 * 7, "every weight of every layer");

    let cache = AdapterCache::default();
    cache.set_budget(Some(bytes * 2));
    let a1 = cache.get(&s1, &k1, bytes).unwrap();
    assert_eq!(a1.bytes() as u64, bytes, "the header tells the loaded size");
    let again = cache.get(&s1, &k1, bytes).unwrap();
    assert!(Arc::ptr_eq(&a1, &again), "read once");
    let a2 = cache.get(&s2, &k2, bytes).unwrap();
    // Both in use: a third does not fit, and nothing in use is dropped.
    let full = cache.get(&s3, &k3, bytes).unwrap_err();
    assert!(matches!(full, AdapterError::Full { .. }), "{full}");
    assert_eq!(cache.bytes(), bytes * 2);
    // a1 finished (and was used before a2): it makes room for a3.
    drop((a1, again));
    let a3 = cache.get(&s3, &k3, bytes).unwrap();
    assert_eq!(cache.bytes(), bytes * 2);
    let reread = cache.get(&s2, &k2, bytes).unwrap();
    assert!(Arc::ptr_eq(&a2, &reread), "a2 stayed");
    // A reload that removes every adapter keeps those in use counted until
    // they are idle; a smaller budget drops idle ones at once.
    cache.retain(|_| false);
    assert_eq!(cache.bytes(), bytes * 2, "a2 and a3 are in use");
    drop(a3);
    cache.set_budget(Some(bytes));
    assert_eq!(cache.bytes(), bytes, "a3 was idle");
    drop((a2, reread));
    cache.retain(|_| false);
    assert_eq!(cache.bytes(), 0);
    cache.set_budget(Some(bytes * 2));

    // A file changed on disk is another version: read afresh.
    std::thread::sleep(Duration::from_millis(20));
    write_adapter(dir.path(), &base, "a1", 9);
    let (_, changed) = s1.check().unwrap();
    assert_ne!(changed, k1);

    cache.set_budget(Some(bytes - 1));
    let too_large = cache.get(&s1, &k1, bytes).unwrap_err();
    assert!(
        matches!(too_large, AdapterError::TooLarge { .. }),
        "{too_large}"
    );

    // Another model's adapter is refused from the headers, naming why.
    let tiny = dir.path().join("tiny.gguf");
    write_gemma3_adapter(&tiny);
    let other = AdapterSource {
        file: tiny,
        ..s1.clone()
    };
    let unfit = other.check().unwrap_err().to_string();
    assert!(unfit.contains("adapts a `gemma3` model"), "{unfit}");
}

/// A pipeline's model can carry an adapter: its steps run with it, the
/// same model without one runs bare, and a misplaced `scale` is refused.
#[test]
fn pipeline_models_take_an_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let Some(home) = common::home_with_smollm2(dir.path()) else {
        return;
    };
    let base = GgufFile::open(&home.join("models/smollm2-135m-instruct.gguf")).unwrap();
    write_adapter(dir.path(), &base, "tuned", 1);
    let pipeline = dir.path().join("pipeline.toml");
    let write = |models: &str| {
        std::fs::write(
            &pipeline,
            format!(
                "name = \"tuned\"\n{models}\n\
                 [[steps]]\nid = \"plain\"\nmodel = \"plain\"\nprompt = \"The sea is\"\nsampling = {{ max-tokens = 12, temperature = 0.0 }}\n\
                 [[steps]]\nid = \"tuned\"\nmodel = \"tuned\"\nprompt = \"The sea is\"\nsampling = {{ max-tokens = 12, temperature = 0.0 }}\n"
            ),
        )
        .unwrap()
    };
    write(
        "[models.plain]\nsource = \"smollm2-135m-instruct\"\n\
         [models.tuned]\nsource = \"smollm2-135m-instruct\"\nadapter = \"tuned.gguf\"\nscale = 1.0\n",
    );
    let run = || {
        let mut cmd = common::realm_host();
        cmd.args(["run"]).arg(&pipeline).env("REALM_HOME", &home);
        cmd.output().unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (plain, tuned) = (&result["plain"]["text"], &result["tuned"]["text"]);
    assert!(plain.is_string() && tuned.is_string(), "{result}");
    assert_ne!(plain, tuned, "{result}");

    write(
        "[models.plain]\nsource = \"smollm2-135m-instruct\"\nscale = 2.0\n[models.tuned]\nsource = \"smollm2-135m-instruct\"\nadapter = \"missing.gguf\"\n",
    );
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("has a `scale` but no `adapter`"), "{err}");
}

/// An adapter that does not fit its model stops the server at start, naming
/// the adapter and why.
#[test]
fn a_bad_adapter_stops_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let Some(home) = common::home_with_smollm2(dir.path()) else {
        return;
    };
    write_gemma3_adapter(&dir.path().join("other.gguf"));
    let config = dir.path().join("realm.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\n[models]\nsmall = \"smollm2-135m-instruct\"\n\
         [adapters.wrong]\nmodel = \"small\"\nsource = \"other.gguf\"\n",
    )
    .unwrap();
    let out = common::realm_host()
        .args(["serve", "--config"])
        .arg(&config)
        .env("REALM_HOME", &home)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("adapter `wrong`") && err.contains("adapts a `gemma3` model"),
        "{err}"
    );
}

/// `max-adapter-bytes` must hold every adapter of any one tenant and the
/// largest adapter besides: else one tenant, its adapters in use, could keep
/// every other tenant's adapter out. Such a budget stops the config.
#[test]
fn a_budget_one_tenant_could_fill_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let Some(home) = common::home_with_smollm2(dir.path()) else {
        return;
    };
    let base_path = home.join("models/smollm2-135m-instruct.gguf");
    let base = GgufFile::open(&base_path).unwrap();
    for (name, seed) in [("a1", 1), ("a2", 2), ("b1", 3)] {
        write_adapter(dir.path(), &base, name, seed);
    }
    let source = realm_host::inference::adapters::AdapterSource {
        base: base_path,
        file: dir.path().join("a1.gguf"),
        scale: 1.0,
    };
    let bytes = source.check().unwrap().0.bytes as u64;
    let serve = |budget: u64| {
        let config = dir.path().join("realm.toml");
        let mut text = format!(
            "listen = \"127.0.0.1:0\"\n[models]\nsmall = \"smollm2-135m-instruct\"\n\
             [loading]\nmax-adapter-bytes = {budget}\n"
        );
        for name in ["a1", "a2", "b1"] {
            text.push_str(&format!(
                "[adapters.{name}]\nmodel = \"small\"\nsource = \"{name}.gguf\"\n"
            ));
        }
        for (tenant, adapters) in [("acme", "[\"a1\", \"a2\"]"), ("globex", "[\"b1\"]")] {
            let key = realm_host::server::keys::ApiKey::generate(tenant).unwrap();
            text.push_str(&format!(
                "[tenants.{tenant}]\napi-keys = [\"{}\"]\nmodels = [\"small\"]\nadapters = {adapters}\n",
                key.hash().unwrap()
            ));
        }
        std::fs::write(&config, text).unwrap();
        // Runs until it listens or fails.
        let mut child = common::realm_host()
            .args(["serve", "--config"])
            .arg(&config)
            .env("REALM_HOME", &home)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = String::new();
        let mut stderr = child.stderr.take().unwrap();
        let mut buf = [0u8; 4096];
        loop {
            use std::io::Read;
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => err.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
            if err.contains("listening on") {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        err
    };
    let err = serve(bytes * 3 - 1);
    assert!(
        err.contains("cannot hold tenant `acme`'s adapters")
            && err.contains(&format!("at least {}", bytes * 3)),
        "{err}"
    );
    let err = serve(bytes * 3);
    assert!(err.contains("listening on"), "{err}");
}

/// A guest's decoding session (WIT `open-session`) on `MODEL:ADAPTER` runs
/// every token with the adapter, read when the session first decodes: its
/// logits are the engine's own with that adapter, not the base model's.
#[test]
fn sessions_on_an_adapted_model_run_its_adapter() {
    use realm_host::inference::adapters::{AdaptedModel, AdapterCache, AdapterSource};
    use realm_models::engine::{Engine, LoadedModel, Prompter};
    let dir = tempfile::tempdir().unwrap();
    let Some(store) = common::model_store_with("smollm2-135m-instruct") else {
        return;
    };
    let base_path = store.join("smollm2-135m-instruct.gguf");
    let model = Arc::new(LoadedModel::open(&base_path, Default::default()).unwrap());
    write_adapter(dir.path(), model.model().file(), "a1", 1);
    let file = dir.path().join("a1.gguf");
    let cache = Arc::new(AdapterCache::default());
    let source = AdapterSource {
        base: base_path,
        file: file.clone(),
        scale: 1.0,
    };
    let adapted = AdaptedModel::new("small:a1", model.clone(), source, cache.clone()).unwrap();
    let tokens = model.prompt_tokens("The sea is");
    let mut session = adapted.decoder(None).unwrap();
    assert_eq!(cache.bytes(), 0, "read at the first forward, not before");
    let got = session.forward(&tokens).unwrap();
    assert!(cache.bytes() > 0);
    let lora = model.load_adapter(&file, 1.0).unwrap();
    let want = model.decoder(Some(lora)).unwrap().forward(&tokens).unwrap();
    let base = model.decoder(None).unwrap().forward(&tokens).unwrap();
    assert_eq!(got, want);
    assert_ne!(got, base);
    // A session on it takes no second adapter, and it embeds nothing.
    let another = model.load_adapter(&file, 1.0).unwrap();
    assert!(adapted.decoder(Some(another)).is_err());
    assert!(adapted.embed("the sea").is_err());
}
