//! Sandbox overhead: compile time of a guest component (cold, from the disk
//! cache, from memory) and the latency of one guest call — new store,
//! instantiate from `InstancePre` with the pooling allocator, call `run` —
//! as the median and p99 of many calls.
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

fn build_guests() -> anyhow::Result<()> {
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(repo().join("guests/rust/Cargo.toml"))
        .env_remove("CARGO_TARGET_DIR")
        .status()?;
    anyhow::ensure!(status.success(), "building the guests failed");
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
    build_guests()?;
    let scratch = tempfile::tempdir()?;
    let cache = scratch.path().join("cache");
    let tenant = Tenant::open(&scratch.path().join("tenants"), "bench")?;
    let call = CallContext {
        tenant,
        limits: Limits::default(),
        models: ModelAccess::default(),
    };

    println!(
        "| guest | size | compile (cold) | compile (disk cache) | compile (memory) | call median | call p99 |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (guest, input) in [
        ("echo", r#"{"hello":"world"}"#.to_string()),
        (
            "normalize",
            r#"{"text":"Hello   “world”. Realm runs tenants!"}"#.to_string(),
        ),
    ] {
        let wasm = repo().join(format!(
            "guests/rust/target/wasm32-wasip2/release/{guest}.wasm"
        ));
        let size = std::fs::metadata(&wasm)?.len();
        let _ = std::fs::remove_dir_all(&cache);

        let cold_sandbox = Sandbox::new(SandboxConfig {
            cache_dir: Some(cache.clone()),
        })?;
        let t = Instant::now();
        cold_sandbox.load(guest, &wasm).await?;
        let cold = t.elapsed();
        let t = Instant::now();
        let component = cold_sandbox.load(guest, &wasm).await?;
        let memory = t.elapsed();
        drop(cold_sandbox);

        let sandbox = Sandbox::new(SandboxConfig {
            cache_dir: Some(cache.clone()),
        })?;
        let t = Instant::now();
        let loaded = sandbox.load(guest, &wasm).await?;
        let disk = t.elapsed();
        assert_eq!(loaded.hash(), component.hash());

        for _ in 0..50 {
            sandbox.run_step(&loaded, &call, &input).await?;
        }
        let mut samples = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let t = Instant::now();
            sandbox.run_step(&loaded, &call, &input).await?;
            samples.push(t.elapsed());
        }
        samples.sort();
        println!(
            "| {guest} | {} KB | {} | {} | {} | {} | {} |",
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
