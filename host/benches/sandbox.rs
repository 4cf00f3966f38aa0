//! Sandbox overhead: compile time of a guest component (cold, from the disk
//! cache, from memory) and the latency of one guest call — new store,
//! instantiate from `InstancePre` with the pooling allocator, call `run` —
//! as the median and p99 of many calls, for Rust guests and for the
//! interpreter-bearing Python (componentize-py) and JavaScript (jco, on the
//! StarlingMonkey and QuickJS backends) echo guests.
//!
//!     cargo bench -p realm-host --bench sandbox [-- ITERATIONS]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use realm_host::sandbox::{CallContext, Limits, ModelAccess, Sandbox, SandboxConfig, Tenant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// One guest to measure: its name in the table, its `.wasm` (relative to the
/// repository), the shell command that builds it (run in the repository) and
/// the input of each call.
struct Guest {
    name: &'static str,
    wasm: &'static str,
    build: &'static str,
    input: &'static str,
}

const RUST_BUILD: &str =
    "cd guests/rust && cargo build --release --target wasm32-wasip2 -p echo -p normalize";

const GUESTS: &[Guest] = &[
    Guest {
        name: "echo (Rust)",
        wasm: "guests/rust/target/wasm32-wasip2/release/echo.wasm",
        build: RUST_BUILD,
        input: r#"{"hello":"world"}"#,
    },
    Guest {
        name: "normalize (Rust)",
        wasm: "guests/rust/target/wasm32-wasip2/release/normalize.wasm",
        build: RUST_BUILD,
        input: r#"{"text":"Hello   “world”. Realm runs tenants!"}"#,
    },
    Guest {
        name: "echo (Python, componentize-py)",
        wasm: "guests/python/echo/target/echo.wasm",
        build: "cd guests/python/echo && ../../../scripts/componentize-py.sh -d ../../../wit \
            -w step componentize app -o target/echo.wasm",
        input: r#"{"hello":"world"}"#,
    },
    Guest {
        name: "echo (JS, jco StarlingMonkey)",
        wasm: "guests/js/echo/target/echo-starlingmonkey.wasm",
        build: "cd guests/js/echo && ../../../scripts/jco.sh componentize echo.js --wit ../../../wit \
            --world-name step --backend starlingmonkey -d http fetch-event -o target/echo-starlingmonkey.wasm",
        input: r#"{"hello":"world"}"#,
    },
    Guest {
        name: "echo (JS, jco QuickJS)",
        wasm: "guests/js/echo/target/echo-quickjs.wasm",
        build: "cd guests/js/echo && ../../../scripts/jco.sh componentize echo.js --wit ../../../wit \
            --world-name step --backend quickjs -o target/echo-quickjs.wasm",
        input: r#"{"hello":"world"}"#,
    },
];

/// Builds `guest` (cargo, componentize-py or jco; each is cheap when fresh).
fn build(guest: &Guest) -> anyhow::Result<()> {
    let status = Command::new("sh")
        .arg("-c")
        .arg(guest.build)
        .current_dir(repo())
        .env_remove("CARGO_TARGET_DIR")
        .status()?;
    anyhow::ensure!(status.success(), "building {} failed", guest.name);
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    if std::env::var_os("RUST_BACKTRACE").is_some() {
        eprintln!(
            "note: RUST_BACKTRACE is set; wasmtime then captures a backtrace for errors it \
             creates and discards internally, which adds µs per call. Unset it for production numbers."
        );
    }
    let scratch = tempfile::tempdir()?;
    let cache = scratch.path().join("cache");
    let tenant = Tenant::open(&scratch.path().join("tenants"), "bench")?;
    let call = CallContext {
        tenant,
        limits: Limits::default(),
        models: ModelAccess::default(),
    };

    println!(
        "| guest | size | compile (cold) | compile (disk cache) | compile (memory) | call median | call p99 | fuel per call |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for guest in GUESTS {
        build(guest)?;
        let wasm = repo().join(guest.wasm);
        let name = guest.name;
        let size = std::fs::metadata(&wasm)?.len();
        let _ = std::fs::remove_dir_all(&cache);

        let cold_sandbox = Sandbox::new(SandboxConfig {
            cache_dir: Some(cache.clone()),
        })?;
        let t = Instant::now();
        cold_sandbox.load(name, &wasm).await?;
        let cold = t.elapsed();
        let t = Instant::now();
        let component = cold_sandbox.load(name, &wasm).await?;
        let memory = t.elapsed();
        drop(cold_sandbox);

        let sandbox = Sandbox::new(SandboxConfig {
            cache_dir: Some(cache.clone()),
        })?;
        let t = Instant::now();
        let loaded = sandbox.load(name, &wasm).await?;
        let disk = t.elapsed();
        assert_eq!(loaded.hash(), component.hash());

        let mut fuel = 0;
        for _ in 0..50 {
            let result = sandbox.run_step(&loaded, &call, guest.input).await?;
            anyhow::ensure!(
                result.output == guest.input || !name.starts_with("echo"),
                "{name} returned {}",
                result.output
            );
            fuel = result.fuel_used;
        }
        let mut samples = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let t = Instant::now();
            sandbox.run_step(&loaded, &call, guest.input).await?;
            samples.push(t.elapsed());
        }
        samples.sort();
        println!(
            "| {name} | {} KB | {} | {} | {} | {} | {} | {fuel} |",
            size / 1000,
            millis(cold),
            millis(disk),
            micros(memory),
            micros(percentile(&samples, 0.5)),
            micros(percentile(&samples, 0.99)),
        );
    }
    Ok(())
}
