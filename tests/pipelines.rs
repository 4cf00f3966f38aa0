//! Pipeline validation (every bad input reported with file:line) and
//! execution (DAG order, concurrency, typed step errors), through the library.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use realm_host::inference::ModelHub;
use realm_host::pipeline::{self, PipelineError, Runner, StepError};
use realm_host::registry::ModelStore;
use realm_host::sandbox::{Sandbox, SandboxConfig, SandboxError, Tenant};
use realm_models::engine::FakeEngine;
use serde_json::{Map, Value, json};

/// Validates `body` as if read from `<dir>/p.toml`; `dir` holds a `c/` component directory.
fn check(body: &str) -> Result<pipeline::Pipeline, PipelineError> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("c")).unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, body).unwrap();
    pipeline::load(&file)
}

fn diagnostics(body: &str) -> Vec<(usize, String)> {
    match check(body) {
        Err(PipelineError::Invalid { diagnostics }) => diagnostics
            .into_iter()
            .map(|d| (d.line, d.message))
            .collect(),
        other => panic!("expected validation errors, got {other:?}"),
    }
}

const COMPONENT: &str = r#"
[components.c]
path = "c"
build = "true"
wasm = "c.wasm"
"#;

#[test]
fn unknown_keys_are_rejected_with_their_line() {
    let d = diagnostics("name = \"p\"\ncolour = \"red\"\n");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].0, 2);
    assert!(d[0].1.contains("unknown field `colour`"), "{:?}", d);

    let body = format!(
        "name = \"p\"\n{COMPONENT}\n[[steps]]\nid = \"a\"\ncomponent = \"c\"\nretries = 3\n"
    );
    let d = diagnostics(&body);
    assert!(d[0].1.contains("unknown field `retries`"), "{:?}", d);
    assert_eq!(d[0].0, 11);
}

#[test]
fn cycles_are_rejected() {
    let body = format!(
        "name = \"p\"\n{COMPONENT}\n[[steps]]\nid = \"a\"\ncomponent = \"c\"\ninput = {{ x = \"{{{{ steps.b.output }}}}\" }}\n\n\
         [[steps]]\nid = \"b\"\ncomponent = \"c\"\ninput = {{ x = \"{{{{ steps.a.output }}}}\" }}\n"
    );
    let d = diagnostics(&body);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(
        d[0].1
            .contains("steps a, b can never run: their dependencies form a cycle"),
        "{d:?}"
    );
    assert_eq!(d[0].0, 8);
}

#[test]
fn dangling_references_and_type_errors_are_rejected() {
    let body = format!(
        r#"name = "p"
[inputs]
text = {{ type = "string" }}
n = {{ type = "integer", default = "three" }}
{COMPONENT}
[models.small]
source = "smollm2-135m-instruct"

[[steps]]
id = "a"
component = "c"
input = {{ t = "{{{{ inputs.nope }}}}", u = "{{{{ steps.ghost.output }}}}", v = "{{{{ inputs.text.length }}}}" }}

[[steps]]
id = "m"
model = "small"
prompt = "{{{{ steps.a.text }}}} {{{{ steps.m.text }}}}"
sampling = {{ temperature = -1.0 }}

[[steps]]
id = "k"
model = "large"
prompt = "hi"
after = ["zzz"]

[[steps]]
id = "p"
model = "small"
prompt = "hi"
sampling = {{ presence-penalty = 3.0, frequency-penalty = 0.5 }}

[outputs]
x = "{{{{ steps.m.usage.total }}}}"
y = "{{{{ env.HOME }}}}"
"#
    );
    let d = diagnostics(&body);
    let text: Vec<String> = d.iter().map(|(l, m)| format!("{l}: {m}")).collect();
    let all = text.join("\n");
    for expected in [
        "4: default of input `n` is \"three\", which is not of type integer",
        "17: step `a`: `inputs.nope` refers to undeclared input `nope` (declared: n, text)",
        "17: step `a`: `steps.ghost.output` refers to unknown step `ghost`",
        "17: step `a`: `inputs.text.length` reaches into input `text`, which is of type string",
        "22: step `m`: `steps.a.text`: component step `a` has one field, `output`",
        "22: step `m`: `steps.m.text`: a step cannot use its own result",
        "23: step `m`: temperature must be between 0 and 10, got -1",
        "27: step `k` uses model `large`, which is not declared in [models]",
        "29: step `k` runs after unknown step `zzz`",
        "35: step `p`: presence_penalty must be between -2 and 2, got 3",
        "38: output `x`: `steps.m.usage.total`: model step `m` has `text`, `finish` and `usage`",
        "39: output `y`: `env.HOME`: references start with `inputs.` or `steps.`",
    ] {
        assert!(all.contains(expected), "missing `{expected}` in:\n{all}");
    }
}

#[test]
fn bad_limits_and_step_shapes_are_rejected() {
    let body = r#"name = "p"
[components.c]
path = "c"
build = "true"
wasm = "c.wasm"
limits = { memory = "4GiB", timeout = "5s" }

[components.missing]
path = "nowhere"
wasm = "x.wasm"

[[steps]]
id = "a"
component = "c"
prompt = "not for components"

[[steps]]
id = "a"
model = "m"
component = "c"

[[steps]]
id = "empty"
"#;
    let all: Vec<String> = diagnostics(body)
        .into_iter()
        .map(|(l, m)| format!("{l}: {m}"))
        .collect();
    let all = all.join("\n");
    for expected in [
        "6: component `c`: memory must be between 1 byte and 1GiB, got 4GiB",
        "8: component `missing`: `path`",
        "does not exist and no `build` command is given",
        "15: step `a` is a component step: `prompt` belongs to model steps",
        "18: duplicate step id `a`",
        "20: step `a` sets both `model` and `component`",
        "needs either `model` (with `prompt`) or `component`",
    ] {
        assert!(all.contains(expected), "missing `{expected}` in:\n{all}");
    }
}

#[test]
fn schemas_are_checked_at_load_with_their_place() {
    let model = "[models.m]\nsource = \"x\"\n";
    let d = diagnostics(&format!(
        "name = \"p\"\n{model}[[steps]]\nid = \"a\"\nmodel = \"m\"\nprompt = \"x\"\nschema = {{ type = \"nonsense\" }}\n\
         [[steps]]\nid = \"b\"\nmodel = \"m\"\nprompt = \"x\"\nschema = \"@missing.json\"\n\
         [[steps]]\nid = \"c\"\nmodel = \"m\"\nprompt = \"{{{{ steps.d.value }}}}\"\n\
         [[steps]]\nid = \"d\"\nmodel = \"m\"\nprompt = \"x\"\n"
    ));
    let found = |line: usize, text: &str| d.iter().any(|(l, m)| *l == line && m.contains(text));
    assert!(found(8, "step `a` schema: invalid JSON schema"), "{d:?}");
    assert!(found(13, "missing.json"), "{d:?}");
    assert!(found(17, "`value` only with a `schema`"), "{d:?}");
    let d = diagnostics(&format!(
        "name = \"p\"\n{COMPONENT}[[steps]]\nid = \"a\"\ncomponent = \"c\"\nschema = {{ type = \"object\" }}\n"
    ));
    assert!(
        d.iter()
            .any(|(_, m)| m.contains("`schema` belongs to model steps")),
        "{d:?}"
    );
    let ok = check(&format!(
        "name = \"p\"\n{model}[[steps]]\nid = \"a\"\nmodel = \"m\"\nprompt = \"x\"\nschema = {{ type = \"object\" }}\n\
         [outputs]\nv = \"{{{{ steps.a.value.deep.field }}}}\"\n"
    ));
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn malformed_toml_and_templates_are_rejected() {
    let d = diagnostics("name = \"p\"\nsteps = [\n");
    assert!(!d.is_empty());
    let body = format!(
        "name = \"p\"\n{COMPONENT}\n[[steps]]\nid = \"a\"\ncomponent = \"c\"\ninput = {{ x = \"{{{{ inputs.x\" }}\n"
    );
    let d = diagnostics(&body);
    assert!(d[0].1.contains("unclosed `{{`"), "{d:?}");
}

fn abuse_pipeline(dir: &Path, steps: &str) -> pipeline::Pipeline {
    let wasm = common::guest("abuse");
    let body = format!(
        r#"name = "abuse"
[inputs]
ms = {{ type = "integer", default = 300 }}

[components.abuse]
path = "{}"
wasm = "{}"
limits = {{ fuel = 100_000_000, memory = "16MiB", timeout = "2s" }}

{steps}"#,
        wasm.parent().unwrap().display(),
        wasm.file_name().unwrap().to_str().unwrap(),
    );
    let file = dir.join("abuse.toml");
    std::fs::write(&file, body).unwrap();
    pipeline::load(&file).unwrap()
}

fn runner(dir: &Path) -> Runner {
    runner_with_models(dir, dir.join("models"))
}

fn runner_with_models(dir: &Path, store: std::path::PathBuf) -> Runner {
    runner_on(
        dir,
        Arc::new(ModelHub::new(ModelStore::new(store), Default::default())),
    )
}

fn runner_on(dir: &Path, models: Arc<ModelHub>) -> Runner {
    let sandbox = Arc::new(Sandbox::new(SandboxConfig::default()).unwrap());
    Runner::new(
        sandbox,
        models,
        Tenant::open(&dir.join("tenants"), "test").unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn independent_steps_run_concurrently_and_dependents_wait() {
    let dir = tempfile::tempdir().unwrap();
    let p = abuse_pipeline(
        dir.path(),
        r#"
[[steps]]
id = "left"
component = "abuse"
input = { mode = "sleep", ms = "{{ inputs.ms }}" }

[[steps]]
id = "right"
component = "abuse"
input = { mode = "sleep", ms = "{{ inputs.ms }}" }

[[steps]]
id = "join"
component = "abuse"
input = { mode = "echo", value = ["{{ steps.left.output }}", "{{ steps.right.output }}"] }

[outputs]
joined = "{{ steps.join.output }}"
"#,
    );
    let runner = runner(dir.path());
    runner.run(&p, Map::new()).await.unwrap(); // compiles the component
    let out = runner.run(&p, Map::new()).await.unwrap();
    // The join ran after both (it read their outputs); left and right ran
    // at once: each started before the other ended. Told by the guests'
    // clocks, not by timing the run, so a busy machine cannot fail it.
    let [left, right] = [0, 1].map(|i| out["joined"][i].clone());
    for step in [&left, &right] {
        assert_eq!(step["slept_ms"], 300, "{out}");
    }
    let at = |v: &Value, k: &str| v[k].as_u64().unwrap();
    assert!(
        at(&left, "started_ns") < at(&right, "ended_ns")
            && at(&right, "started_ns") < at(&left, "ended_ns"),
        "left and right must overlap: {out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_step_names_itself_and_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let p = abuse_pipeline(
        dir.path(),
        "[[steps]]\nid = \"hog\"\ncomponent = \"abuse\"\ninput = { mode = \"alloc\" }\n",
    );
    let err = runner(dir.path()).run(&p, Map::new()).await.unwrap_err();
    match &err {
        PipelineError::Step {
            step,
            error: StepError::Sandbox(SandboxError::MemoryLimit { .. }),
        } => assert_eq!(step, "hog"),
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string()
            .starts_with("step `hog` failed: component abuse exceeded its memory limit of 16MiB"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn inputs_are_checked_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let p = abuse_pipeline(
        dir.path(),
        "[[steps]]\nid = \"a\"\ncomponent = \"abuse\"\ninput = { mode = \"echo\", value = \"{{ inputs.ms }}\" }\n",
    );
    let r = runner(dir.path());
    let mut wrong = Map::new();
    wrong.insert("ms".into(), Value::String("soon".into()));
    let err = r.run(&p, wrong).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "input `ms`: expected integer, got \"soon\""
    );
    let mut unknown = Map::new();
    unknown.insert("speed".into(), json!(1));
    let err = r.run(&p, unknown).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "input `speed`: pipeline `abuse` has no such input (it takes: ms)"
    );
    let out = r.run(&p, Map::new()).await.unwrap();
    assert_eq!(
        out,
        json!({"a": {"output": 300}}),
        "without [outputs], every step's result"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unavailable_models_fail_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let p = abuse_pipeline(
        dir.path(),
        "[models.small]\nsource = \"no-such-model\"\n\n[[steps]]\nid = \"a\"\nmodel = \"small\"\nprompt = \"hi\"\n\n\
         [[steps]]\nid = \"b\"\ncomponent = \"abuse\"\ninput = { mode = \"files\" }\n",
    );
    let err = runner(dir.path()).run(&p, Map::new()).await.unwrap_err();
    assert!(matches!(err, PipelineError::Model { .. }), "{err:?}");
    assert!(
        err.to_string().contains("model `small` (source `no-such-model`) cannot be loaded: model `no-such-model` is not in the store"),
        "{err}"
    );
    assert!(
        !dir.path().join("tenants/test/files/note.txt").exists(),
        "no step may run"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn llm_calls_are_scoped_and_typed() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = common::guest("router");
    let body = format!(
        r#"name = "route"
[models.small]
source = "smollm2-135m-instruct"

[components.allowed]
path = "{dir}"
wasm = "router.wasm"
models = ["small"]
limits = {{ timeout = "60s" }}

[components.denied]
path = "{dir}"
wasm = "router.wasm"

[[steps]]
id = "{{STEP}}"
component = "{{STEP}}"
input = {{ text = "What is the capital of France?", model = "small" }}
"#,
        dir = wasm.parent().unwrap().display()
    );
    let write = |component: &str| {
        let file = dir.path().join(format!("{component}.toml"));
        std::fs::write(&file, body.replace("{STEP}", component)).unwrap();
        pipeline::load(&file).unwrap()
    };

    // A component without the model in its `models` cannot reach it.
    let err = runner(dir.path())
        .run(&write("denied"), Map::new())
        .await
        .unwrap_err();
    match err {
        PipelineError::Step {
            error: StepError::Sandbox(SandboxError::Guest { message, .. }),
            ..
        } => assert_eq!(
            message,
            "model-not-found: model `small` is not available to this component (it may use: none)"
        ),
        other => panic!("{other:?}"),
    }

    // With the model granted, the guest's chat call reaches the real model.
    let Some(store) = common::model_store_with("smollm2-135m-instruct") else {
        return;
    };
    let out = runner_with_models(dir.path(), store)
        .run(&write("allowed"), Map::new())
        .await
        .unwrap();
    let answer = out["allowed"]["output"]["answer"].as_str().unwrap();
    assert!(answer.contains("Paris"), "{out}");
    assert_eq!(out["allowed"]["output"]["route"], "question");
}

/// A guest built against the frozen `realm:inference@0.1.0` contract (the
/// `legacy` guest) still runs: its chat reaches the model, its kv works.
#[tokio::test(flavor = "multi_thread")]
async fn a_guest_built_for_the_old_contract_still_runs() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = common::guest("legacy");
    let Some(store) = common::model_store_with("smollm2-135m-instruct") else {
        return;
    };
    let file = dir.path().join("legacy.toml");
    std::fs::write(
        &file,
        format!(
            r#"name = "legacy"
[models.small]
source = "smollm2-135m-instruct"

[components.legacy]
path = "{}"
wasm = "legacy.wasm"
models = ["small"]
limits = {{ timeout = "60s" }}

[[steps]]
id = "ask"
component = "legacy"
input = {{ question = "What is the capital of France?" }}
"#,
            wasm.parent().unwrap().display()
        ),
    )
    .unwrap();
    let pipeline = pipeline::load(&file).unwrap();
    let runner = runner_with_models(dir.path(), store);
    for runs in 1..=2 {
        let out = runner.run(&pipeline, Map::new()).await.unwrap();
        let output = &out["ask"]["output"];
        assert!(
            output["answer"].as_str().unwrap().contains("Paris"),
            "{out}"
        );
        assert_eq!(output["runs"], runs, "{out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_run_stops_its_model_steps() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("long.toml");
    std::fs::write(
        &file,
        r#"name = "long"
[models.small]
source = "storyteller"
[[steps]]
id = "story"
model = "small"
prompt = "Once upon a time"
sampling = { max-tokens = 2000, temperature = 0.8, seed = 7 }
"#,
    )
    .unwrap();
    // A scripted engine that would take 2000 × 2 ms to finish.
    let fake = Arc::new(
        FakeEngine::new()
            .with_reply(|_| "and then ".repeat(1000))
            .with_token_delay(Duration::from_millis(2)),
    );
    let hub = Arc::new(ModelHub::new(
        ModelStore::new(dir.path().join("models")),
        Default::default(),
    ));
    hub.provide("storyteller", fake.clone());
    let runner = runner_on(dir.path(), hub);
    let pipeline = pipeline::load(&file).unwrap();
    // The run is abandoned (a client cancels or hangs up) while generating:
    // polled until its generation runs, however slow the machine.
    let mut run = Box::pin(runner.run(&pipeline, Map::new()));
    while fake.running() == 0 {
        tokio::select! {
            _ = &mut run => panic!("the run ended before it was abandoned"),
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
    drop(run);
    while fake.running() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Its generation ended cancelled instead of running on to its 2000 tokens.
    assert_eq!((fake.started(), fake.cancelled()), (1, 1));
}
