//! Shared helpers of the end-to-end tests: the repository layout, the guest
//! components (built once per test binary), and a sandbox to run them in.

#![allow(dead_code)] // each test binary uses a different subset

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
    let out = realm_host()
        .args(["keys", "new", "--tenant", tenant, "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The model store of this machine (`$REALM_HOME/models`, default
/// `~/.realm/models`), if it holds `name`; tests that need a real model skip
/// (with a note) when it is absent. `scripts/test.sh` pulls the models first.
pub fn model_store_with(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("REALM_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".realm")))?;
    let store = home.join("models");
    if store.join(format!("{name}.gguf")).is_file() {
        Some(store)
    } else {
        eprintln!(
            "skipping: model {name} is not in {} (run `realm-host models pull {name}`)",
            store.display()
        );
        None
    }
}
