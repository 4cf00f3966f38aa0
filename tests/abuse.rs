//! The abuse suite: hostile guests against every sandbox limit. Each attack
//! must end in the typed error that names the limit, within the limit, and
//! the host must serve the next call normally.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use realm_host::sandbox::{
    ByteSize, CallContext, Limits, LoadedComponent, ModelAccess, Sandbox, SandboxConfig,
    SandboxError, Tenant,
};
use serde_json::{Value, json};

struct Fixture {
    sandbox: Arc<Sandbox>,
    abuse: LoadedComponent,
    call: CallContext,
    root: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let sandbox = Arc::new(Sandbox::new(SandboxConfig::default()).unwrap());
    let abuse = sandbox
        .load("abuse", &common::guest("abuse"))
        .await
        .unwrap();
    let tenant = Tenant::open(&root.path().join("tenants"), "mallory").unwrap();
    let call = CallContext {
        tenant,
        limits: Limits {
            fuel: 50_000_000,
            memory: ByteSize(16 << 20),
            timeout: Duration::from_millis(500),
            ..Limits::default()
        },
        models: ModelAccess::default(),
    };
    Fixture {
        sandbox,
        abuse,
        call,
        root,
    }
}

impl Fixture {
    async fn attack(&self, input: Value) -> Result<Value, SandboxError> {
        self.attack_with(&self.call, input).await
    }

    async fn attack_with(&self, call: &CallContext, input: Value) -> Result<Value, SandboxError> {
        let done = self
            .sandbox
            .run_step(&self.abuse, call, &input.to_string())
            .await?;
        Ok(serde_json::from_str(&done.output).unwrap_or(Value::String(done.output)))
    }

    /// After any attack, an ordinary call on the same sandbox must succeed.
    async fn still_serves(&self) {
        let out = self
            .attack(json!({"mode": "echo", "value": [1, 2, 3]}))
            .await
            .unwrap();
        assert_eq!(out, json!([1, 2, 3]));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn infinite_loop_runs_out_of_fuel() {
    let f = fixture().await;
    // A deadline no machine reaches first: fuel must be what stops it.
    let mut call = f.call.clone();
    call.limits.timeout = Duration::from_secs(60);
    let started = Instant::now();
    let err = f
        .attack_with(&call, json!({"mode": "spin"}))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SandboxError::OutOfFuel {
                limit: 50_000_000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("ran out of fuel (limit 50000000 units)"),
        "{err}"
    );
    // Fuel, not the clock, stopped it, well before its deadline.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    f.still_serves().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn infinite_loop_hits_the_deadline_when_fuel_is_plenty() {
    let f = fixture().await;
    let mut call = f.call.clone();
    call.limits.fuel = u64::MAX / 2;
    call.limits.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = f
        .attack_with(&call, json!({"mode": "spin"}))
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, SandboxError::Timeout { .. }), "{err:?}");
    assert!(
        err.to_string().contains("exceeded its timeout of 300ms"),
        "{err}"
    );
    // Not before its deadline; the upper bound only catches a call that
    // ignores it (a busy machine delays the epoch tick, not by seconds).
    assert!(
        elapsed >= Duration::from_millis(290) && elapsed < Duration::from_secs(10),
        "{elapsed:?}"
    );
    f.still_serves().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unbounded_allocation_hits_the_memory_limit() {
    let f = fixture().await;
    let err = f.attack(json!({"mode": "alloc"})).await.unwrap_err();
    match &err {
        SandboxError::MemoryLimit {
            limit, requested, ..
        } => {
            assert_eq!(*limit, ByteSize(16 << 20));
            assert!(*requested > 16 << 20);
        }
        other => panic!("expected a memory-limit error, got {other:?}"),
    }
    assert!(
        err.to_string()
            .contains("exceeded its memory limit of 16MiB"),
        "{err}"
    );
    f.still_serves().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unbounded_recursion_overflows_the_stack() {
    let f = fixture().await;
    let err = f.attack(json!({"mode": "recurse"})).await.unwrap_err();
    assert!(matches!(err, SandboxError::StackOverflow { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("overflowed its stack (limit 1MiB)"),
        "{err}"
    );
    f.still_serves().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_is_a_trap_with_a_message() {
    let f = fixture().await;
    let err = f.attack(json!({"mode": "trap"})).await.unwrap_err();
    assert!(matches!(err, SandboxError::Trap { .. }), "{err:?}");
    assert!(err.to_string().contains("unreachable"), "{err}");
    // The guest's last stderr lines (its panic message) explain the trap.
    assert!(
        err.to_string()
            .contains("the abuse guest panics on purpose"),
        "{err}"
    );
    f.still_serves().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn escapes_from_the_tenant_directory_fail() {
    let f = fixture().await;
    let tenant_home = f.root.path().join("tenants/mallory");
    let out = f.attack(json!({"mode": "escape"})).await.unwrap();
    let attempts = out.as_object().unwrap();
    assert_eq!(attempts.len(), 7);
    for (attempt, result) in attempts {
        assert!(
            result.get("error").is_some(),
            "{attempt} should fail, got {result}"
        );
    }
    for leaked in ["escaped.txt", "../escaped.txt", "../../escaped.txt"] {
        assert!(
            !tenant_home.join(leaked).exists(),
            "{leaked} was written outside the sandbox"
        );
    }
    f.still_serves().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn files_inside_the_tenant_directory_work() {
    let f = fixture().await;
    let out = f.attack(json!({"mode": "files"})).await.unwrap();
    assert_eq!(out, json!({"read_back": "kept"}));
    let host_copy = f.call.tenant.files_dir().join("note.txt");
    assert_eq!(std::fs::read_to_string(host_copy).unwrap(), "kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_environment_arguments_or_network() {
    let f = fixture().await;
    let out = f.attack(json!({"mode": "env"})).await.unwrap();
    assert_eq!(out["vars"], json!([]));
    assert_eq!(out["args"], json!([]));
    let out = f.attack(json!({"mode": "connect"})).await.unwrap();
    assert!(out["tcp"].is_string(), "connecting must fail: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_outputs_are_refused() {
    let f = fixture().await;
    let mut call = f.call.clone();
    call.limits.output = ByteSize(64 << 10);
    let err = f
        .attack_with(&call, json!({"mode": "huge-output", "bytes": 1 << 20}))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SandboxError::OutputTooLarge {
                size: 1_048_576,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("more than its output limit of 64KiB"),
        "{err}"
    );
    // Bigger than the guest's memory: the guest itself fails inside its limit.
    let err = f
        .attack(json!({"mode": "huge-output", "bytes": 64 << 20}))
        .await
        .unwrap_err();
    assert!(matches!(err, SandboxError::MemoryLimit { .. }), "{err:?}");
    f.still_serves().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stdout_floods_are_capped_without_killing_the_guest() {
    let f = fixture().await;
    let mut call = f.call.clone();
    call.limits.fuel = 2_000_000_000;
    call.limits.timeout = Duration::from_secs(10);
    let flood = json!({"mode": "flood-stdout", "bytes": 4 << 20});
    let out = f.attack_with(&call, flood).await.unwrap();
    assert!(out["written"].as_u64().unwrap() >= 4 << 20);
    f.still_serves().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_errors_are_reported_as_such() {
    let f = fixture().await;
    let err = f.attack(json!({"mode": "nonsense"})).await.unwrap_err();
    assert!(matches!(err, SandboxError::Guest { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "component abuse failed: unknown mode `nonsense`"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn many_attacks_at_once_do_not_disturb_a_normal_call() {
    let f = Arc::new(fixture().await);
    let mut attacks = Vec::new();
    for mode in ["spin", "alloc", "recurse", "trap", "spin", "alloc"] {
        let f = f.clone();
        attacks.push(tokio::spawn(async move {
            f.attack(json!({"mode": mode})).await
        }));
    }
    f.still_serves().await;
    for attack in attacks {
        assert!(attack.await.unwrap().is_err());
    }
    f.still_serves().await;
}
