//! The real `realm-host` binary on the example pipelines and on bad input.

mod common;

use serde_json::{Value, json};

fn run_pipeline(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    common::guest("normalize"); // make sure the guests are fresh before the binary checks them
    common::realm_host()
        .env("REALM_HOME", home)
        .arg("run")
        .args(args)
        .current_dir(common::repo())
        .output()
        .unwrap()
}

fn json_stdout(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

#[test]
fn text_report_runs_and_its_tally_survives_restarts() {
    let home = tempfile::tempdir().unwrap();
    let text = "Realm runs tenants. Tenants share models! Realm meters tenants.";
    let first = json_stdout(&run_pipeline(
        home.path(),
        &[
            "pipelines/text-report.toml",
            "--input",
            &format!("text={text}"),
        ],
    ));
    assert_eq!(
        first["stats"],
        json!({"chars": 63, "words": 9, "sentences": 3})
    );
    assert_eq!(first["chunks"], json!([text]));
    assert_eq!(first["documents_seen"], json!(1));
    assert_eq!(first["top_words"][0], json!(["tenants", 3]));

    // A new process: the kv store on disk carries the tally forward.
    let second = json_stdout(&run_pipeline(
        home.path(),
        &[
            "pipelines/text-report.toml",
            "--input",
            &format!("text={text}"),
        ],
    ));
    assert_eq!(second["documents_seen"], json!(2));
    assert_eq!(second["top_words"][0], json!(["tenants", 6]));

    // Another tenant starts from nothing.
    let other = json_stdout(&run_pipeline(
        home.path(),
        &[
            "pipelines/text-report.toml",
            "--tenant",
            "other",
            "--input",
            &format!("text={text}"),
        ],
    ));
    assert_eq!(other["documents_seen"], json!(1));
}

#[test]
fn extract_json_finds_and_validates_records() {
    let home = tempfile::tempdir().unwrap();
    let out = json_stdout(&run_pipeline(
        home.path(),
        &[
            "pipelines/extract-json.toml",
            "--input",
            r#"text=Sure! ```json {"name": "Ada", "age": "36"} ``` Anything else?"#,
        ],
    ));
    assert_eq!(out["valid"], json!(false));
    assert_eq!(out["record"], json!({"name": "Ada", "age": "36"}));
    assert_eq!(
        out["errors"],
        json!(["field `age` should be integer, got \"36\""])
    );

    let inputs = home.path().join("inputs.json");
    std::fs::write(
        &inputs,
        r#"{"text": "{\"id\": 7}", "schema": {"id": "integer"}}"#,
    )
    .unwrap();
    let out = json_stdout(&run_pipeline(
        home.path(),
        &[
            "pipelines/extract-json.toml",
            "--input-json",
            inputs.to_str().unwrap(),
        ],
    ));
    assert_eq!(out["valid"], json!(true));
    assert_eq!(out["record"], json!({"id": 7}));
}

#[test]
fn bad_pipelines_fail_with_file_and_line() {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("bad.toml");
    std::fs::write(
        &file,
        "name = \"bad\"\n[[steps]]\nid = \"a\"\nmodle = \"x\"\n",
    )
    .unwrap();
    let out = run_pipeline(home.path(), &[file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:4:1: unknown field `modle`", file.display())),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    let out = run_pipeline(home.path(), &["pipelines/text-report.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("input `text`: required; pass it with --input text=VALUE"),
        "{stderr}"
    );

    let out = run_pipeline(
        home.path(),
        &[
            "pipelines/text-report.toml",
            "--input",
            "text=x",
            "--input",
            "chunk_chars=many",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--input chunk_chars: `many` is not a valid integer"),
        "{stderr}"
    );

    let out = run_pipeline(home.path(), &["does-not-exist.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read pipeline does-not-exist.toml"),
        "{stderr}"
    );
}

#[test]
fn check_validates_without_running() {
    let home = tempfile::tempdir().unwrap();
    let out = run_pipeline(
        home.path(),
        &["pipelines/text-report.toml", "--check", "--input", "text=x"],
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ok (2 steps)"));
    assert!(
        !home.path().join("tenants").exists(),
        "--check must not touch tenant data"
    );
}

#[test]
fn component_inspect_shows_worlds() {
    let home = tempfile::tempdir().unwrap();
    let out = common::realm_host()
        .env("REALM_HOME", home.path())
        .args(["component", "inspect", "--json"])
        .arg(common::guest("tally"))
        .output()
        .unwrap();
    let report = json_stdout(&out);
    assert_eq!(report["worlds"], json!(["step"]));
    assert_eq!(report["exports"], json!(["run"]));
    let imports: Vec<&str> = report["imports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(imports.contains(&"realm:inference/kv@0.2.0"), "{imports:?}");
    // A guest built against the frozen 0.1.0 contract still fits.
    let out = common::realm_host()
        .env("REALM_HOME", home.path())
        .args(["component", "inspect", "--json"])
        .arg(common::guest("legacy"))
        .output()
        .unwrap();
    let report = json_stdout(&out);
    assert_eq!(report["worlds"], json!(["step"]), "{report}");
    assert!(
        report["imports"]
            .as_array()
            .unwrap()
            .contains(&json!("realm:inference/llm@0.1.0")),
        "{report}"
    );

    let not_wasm = home.path().join("x.wasm");
    std::fs::write(&not_wasm, b"not wasm").unwrap();
    let out = common::realm_host()
        .env("REALM_HOME", home.path())
        .args(["component", "inspect"])
        .arg(&not_wasm)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a valid WebAssembly component"));
}

#[test]
fn help_teaches() {
    let out = common::realm_host().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in ["run", "component", "REALM_HOME", "Examples:"] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

/// A fresh `$REALM_HOME` that shares this machine's model store, if it holds the default model.
fn home_with_default_model() -> Option<tempfile::TempDir> {
    let store = common::model_store_with("smollm2-135m-instruct")?;
    let home = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&store, home.path().join("models")).unwrap();
    Some(home)
}

#[test]
fn hello_completes_on_the_default_model() {
    let Some(home) = home_with_default_model() else {
        return;
    };
    let out = json_stdout(&run_pipeline(
        home.path(),
        &[
            "pipelines/hello.toml",
            "--input",
            "prompt=The capital of France is",
        ],
    ));
    assert_eq!(out["text"], json!(" Paris."));
    assert_eq!(out["finish"], json!("stop"));
    assert_eq!(
        out["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 4})
    );
}

/// `bench --adapters` times decoding with synthetic LoRA adapters beside
/// the same decoding without (numbers in docs/benchmarks.md).
#[test]
fn bench_measures_adapters() {
    let Some(home) = home_with_default_model() else {
        return;
    };
    let out = common::realm_host()
        .env("REALM_HOME", home.path())
        .args([
            "bench",
            "--model",
            "smollm2-135m-instruct",
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "2",
            "--repeat",
            "1",
            "--streams",
            "2",
            "--adapters",
            "2",
            "--adapter-rank",
            "4",
            "--json",
        ])
        .output()
        .unwrap();
    let report = json_stdout(&out);
    for key in [
        "stream_decode_tokens_per_second",
        "adapted_stream_decode_tokens_per_second",
        "streams_decode_tokens_per_second",
        "adapted_streams_decode_tokens_per_second",
    ] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key}: {report}");
    }
    assert_eq!(report["adapters"], 2);
    assert_eq!(report["adapter_rank"], 4);
}

/// `models inspect` on a LoRA adapter shows its rank, alpha and what it adapts.
#[test]
fn models_inspect_describes_an_adapter() {
    use realm_models::gguf::{GgufWriter, MetaValue};
    let home = tempfile::tempdir().unwrap();
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("general.type", MetaValue::String("adapter".into()))
        .meta("adapter.type", MetaValue::String("lora".into()))
        .meta("adapter.lora.alpha", MetaValue::F32(16.0));
    for l in 0..2 {
        for target in ["attn_q", "attn_v"] {
            let name = format!("blk.{l}.{target}.weight");
            w.tensor_f32(&format!("{name}.lora_a"), &[64, 8], &[0.0; 512])
                .tensor_f32(&format!("{name}.lora_b"), &[8, 64], &[0.0; 512]);
        }
    }
    let path = home.path().join("tiny-lora.gguf");
    std::fs::write(&path, w.to_bytes()).unwrap();
    let out = common::realm_host()
        .env("REALM_HOME", home.path())
        .args(["models", "inspect", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    let report = json_stdout(&out);
    assert_eq!(
        report["adapter"],
        json!({"kind": "lora", "alpha": 16.0, "ranks": [8],
               "targets": {"attn_q.weight": 2, "attn_v.weight": 2}}),
        "{report}"
    );
    let out = common::realm_host()
        .env("REALM_HOME", home.path())
        .args(["models", "inspect"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("adapter:       lora, rank 8, alpha 16"),
        "{text}"
    );
}

#[test]
fn tokenize_prints_ids_and_chat_keeps_the_conversation() {
    let Some(home) = home_with_default_model() else {
        return;
    };
    let tokenize = |args: &[&str]| {
        let mut cmd = common::realm_host();
        cmd.env("REALM_HOME", home.path())
            .arg("tokenize")
            .args(args);
        common::stdout_of(&mut cmd)
    };
    // SmolLM2 splits digits, adds no BOS and reads control tokens.
    assert_eq!(
        tokenize(&["--json", "Hello world 12"]).trim(),
        "[19556,905,216,33,34]"
    );
    let lines = tokenize(&["<|im_start|>Hi"]);
    assert_eq!(lines, "     1 -> \"<|im_start|>\"\n 26843 -> \"Hi\"\n");
    assert_eq!(
        tokenize(&["--json", "--no-parse-special", "<|im_start|>"]).trim(),
        "[44,108,306,79,3738,108,46]"
    );

    // Two turns (the second written over two lines), then /bye: the
    // second prompt holds the first turn and its reply.
    let mut child = common::realm_host()
        .env("REALM_HOME", home.path())
        .args(["chat", "--temperature", "0", "--max-tokens", "12"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"My name is Ada. Say hello to me.\nWhat is my \\\nname?\n/bye\nnever read\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replies = String::from_utf8(out.stdout).unwrap();
    assert_eq!(replies.lines().count(), 2, "{replies:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let turns: Vec<(usize, usize)> = stderr
        .lines()
        .filter_map(|l| l.split_once('[').map(|(_, stats)| stats))
        .map(|l| {
            let n: Vec<usize> = l.split(' ').filter_map(|w| w.parse().ok()).collect();
            (n[0], n[1])
        })
        .collect();
    assert_eq!(turns.len(), 2, "{stderr}");
    let (first_prompt, first_reply) = turns[0];
    assert!(turns[1].0 > first_prompt + first_reply, "{stderr}");
}

#[test]
fn model_pipelines_run_end_to_end() {
    let Some(home) = home_with_default_model() else {
        return;
    };
    let out = json_stdout(&run_pipeline(
        home.path(),
        &[
            "pipelines/route.toml",
            "--input",
            "text=What is the capital of France?",
        ],
    ));
    assert_eq!(out["route"], json!("question"));
    assert!(out["answer"].as_str().unwrap().contains("Paris"), "{out}");

    let text = "Realm runs many tenants on one machine. Each tenant's logic is a WebAssembly component. \
                The models are loaded once and shared by everyone.";
    let out = json_stdout(&run_pipeline(
        home.path(),
        &[
            "pipelines/summarize-and-label.toml",
            "--input",
            &format!("text={text}"),
        ],
    ));
    assert!(!out["summary"].as_str().unwrap().trim().is_empty(), "{out}");
    assert_eq!(out["words"], json!(23));
    assert_eq!(out["top_words"].as_array().unwrap().len(), 3, "{out}");

    // A schema step's `value` keeps its types through the templates.
    let text = "Ada Lovelace is 36 and lives in London, where she writes programs.";
    let out = json_stdout(&run_pipeline(
        home.path(),
        &[
            "pipelines/extract-fields.toml",
            "--input",
            &format!("text={text}"),
        ],
    ));
    let person = out["person"].as_object().unwrap();
    assert_eq!(person.len(), 3, "{out}");
    assert!(
        person["name"].is_string() && person["city"].is_string(),
        "{out}"
    );
    let age = out["age"].as_i64().unwrap();
    assert!((0..=130).contains(&age), "{out}");
    assert_eq!(out["age"], person["age"]);
    assert!(!out["greeting"].as_str().unwrap().is_empty(), "{out}");
}

#[test]
fn polyglot_pipeline_runs_rust_python_and_javascript_steps() {
    let Some(home) = home_with_default_model() else {
        return;
    };
    // The Python and JavaScript components are built by the pipeline's
    // `build` commands (componentize-py, jco) when missing or stale.
    let text = "Paris is the capital and largest city of France. It is known for the Eiffel Tower, \
                museums like the Louvre, and its cafes.";
    let run = || {
        json_stdout(&run_pipeline(
            home.path(),
            &[
                "pipelines/polyglot.toml",
                "--input",
                &format!("text={text}"),
            ],
        ))
    };
    let out = run();
    assert_eq!(out["words"], json!(23), "{out}");
    assert!(out["summary"].as_str().unwrap().contains("Paris"), "{out}");
    assert!(out["headline"].as_str().unwrap().contains("Paris"), "{out}");
    // Greedy decoding and the Python step's kv cache: the same answer again.
    assert_eq!(run(), out);
}

#[test]
fn keys_new_prints_a_key_once_and_stores_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("realm.toml");
    std::fs::write(&config, "# my server\n[tenants.acme]\nmodels = []\n").unwrap();
    let new_key = || common::new_key(&config, "acme");
    let (first, second) = (new_key(), new_key());
    assert!(first.starts_with("rk_acme_") && first != second);
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.starts_with("# my server"), "comments survive: {text}");
    assert!(!text.contains(&first), "the key itself is never stored");
    let loaded = realm_host::server::ServerConfig::load(&config).unwrap();
    let hashes = loaded.tenants["acme"].api_keys.clone();
    assert_eq!(hashes.len(), 2);
    let ring = realm_host::server::keys::KeyRing::new([("acme".to_string(), hashes)].into());
    assert_eq!(ring.tenant_of(&first).as_deref(), Some("acme"));
    assert_eq!(ring.tenant_of(&second).as_deref(), Some("acme"));
    // A bad tenant id is refused before anything is written.
    let out = common::realm_host()
        .args(["keys", "new", "--tenant", "../x", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid tenant id"));
}

/// Ten `keys new` at once on one config: every key is kept (they take turns
/// on a lock and each replaces the file atomically).
#[test]
fn concurrent_keys_new_lose_no_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("realm.toml");
    std::fs::write(&config, "[tenants.acme]\nmodels = []\n").unwrap();
    let keys: Vec<String> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..10)
            .map(|_| s.spawn(|| common::new_key(&config, "acme")))
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let loaded = realm_host::server::ServerConfig::load(&config).unwrap();
    assert_eq!(loaded.tenants["acme"].api_keys.len(), 10);
    let ring = realm_host::server::keys::KeyRing::new(
        [("acme".to_string(), loaded.tenants["acme"].api_keys.clone())].into(),
    );
    for key in &keys {
        assert_eq!(ring.tenant_of(key).as_deref(), Some("acme"));
    }
}

/// `models pull` stores a LoRA adapter like a model, and `models list`
/// shows it under the model it fits (checked from the headers).
#[test]
fn models_list_shows_adapters_under_their_base() {
    // Its own store (the model linked in), so the pull writes nothing shared.
    let dir = tempfile::tempdir().unwrap();
    let Some(home) = common::home_with_smollm2(dir.path()) else {
        return;
    };
    let base = realm_models::gguf::GgufFile::open(&home.join("models/smollm2-135m-instruct.gguf"))
        .unwrap();
    let bytes = realm_models::engine::synthetic_adapter_file(
        &base,
        4,
        1,
        0.01,
        realm_models::gguf::GgmlType::F16,
    )
    .unwrap();
    let path = dir.path().join("support-lora.gguf");
    std::fs::write(&path, bytes).unwrap();
    let pulled = common::stdout_of(
        common::realm_host()
            .env("REALM_HOME", &home)
            .args(["models", "pull"])
            .arg(&path),
    );
    assert!(pulled.starts_with("support-lora\t"), "{pulled}");
    let listed = common::stdout_of(
        common::realm_host()
            .env("REALM_HOME", &home)
            .args(["models", "list"]),
    );
    let lines: Vec<&str> = listed.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("smollm2-135m-instruct "))
        .unwrap();
    assert!(
        lines[at + 1].starts_with("  └ support-lora (LoRA rank 4)"),
        "{listed}"
    );
}
