//! `abuse`: a deliberately hostile guest for the sandbox tests. Each `mode`
//! attacks one limit; the host must stop it with the right typed error and
//! keep serving.
//!
//! Input: `{"mode": "...", ...}` — modes: `spin`, `alloc`, `recurse`, `trap`,
//! `escape`, `huge-output` (`bytes`), `flood-stdout` (`bytes`), `env`,
//! `connect`, `files`, `sleep` (`ms`), `echo` (`value`).

use std::hint::black_box;

use serde_json::{Value, json};

wit_bindgen::generate!({ path: "../../../wit", world: "step" });

struct Abuse;

impl Guest for Abuse {
    fn run(input: String) -> Result<String, String> {
        let input: Value = serde_json::from_str(&input).map_err(|e| e.to_string())?;
        let bytes = input
            .get("bytes")
            .and_then(Value::as_u64)
            .unwrap_or(1 << 20) as usize;
        match input.get("mode").and_then(Value::as_str).unwrap_or("") {
            "spin" => {
                let mut x: u64 = 0;
                loop {
                    x = black_box(x.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            "recurse" => Ok(recurse(0, black_box(u64::MAX)).to_string()),
            "trap" => panic!("the abuse guest panics on purpose"),
            "escape" => Ok(escape().to_string()),
            "huge-output" => Ok("x".repeat(bytes)),
            "flood-stdout" => {
                let line = "flood ".repeat(16);
                let mut written = 0;
                while written < bytes {
                    println!("{line}");
                    written += line.len() + 1;
                }
                Ok(json!({"written": written}).to_string())
            }
            "env" => Ok(json!({
                "vars": std::env::vars().map(|(k, _)| k).collect::<Vec<_>>(),
                "args": std::env::args().collect::<Vec<_>>(),
                "cwd": std::env::current_dir().ok().map(|p| p.display().to_string()),
            })
            .to_string()),
            "connect" => Ok(json!({
                "tcp": std::net::TcpStream::connect("127.0.0.1:9").err().map(|e| e.to_string()),
            })
            .to_string()),
            "files" => {
                std::fs::write("/note.txt", b"kept").map_err(|e| e.to_string())?;
                let back = std::fs::read_to_string("note.txt").map_err(|e| e.to_string())?;
                Ok(json!({"read_back": back}).to_string())
            }
            "sleep" => {
                let ms = input.get("ms").and_then(Value::as_u64).unwrap_or(100);
                // Wall-clock bounds of the sleep, so tests can tell whether
                // two calls overlapped without timing them.
                let now = || {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as u64)
                };
                let started_ns = now();
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(
                    json!({"slept_ms": ms, "started_ns": started_ns, "ended_ns": now()})
                        .to_string(),
                )
            }
            "echo" => Ok(input
                .get("value")
                .cloned()
                .unwrap_or(Value::Null)
                .to_string()),
            other => Err(format!("unknown mode `{other}`")),
        }
    }
}

/// Recursion that only ends at `limit`; not a tail call, so it cannot become a loop.
#[inline(never)]
fn recurse(depth: u64, limit: u64) -> u64 {
    if depth == limit {
        return depth;
    }
    recurse(depth + 1, limit)
        .wrapping_mul(3)
        .wrapping_add(depth)
}

/// Tries to leave the tenant directory; returns what each attempt got.
fn escape() -> Value {
    let mut results = serde_json::Map::new();
    for path in [
        "/etc/passwd",
        "../../../../etc/passwd",
        "/../outside.txt",
        "../outside.txt",
    ] {
        results.insert(
            format!("read {path}"),
            match std::fs::read(path) {
                Ok(bytes) => json!({"ok": bytes.len()}),
                Err(e) => json!({"error": e.to_string()}),
            },
        );
    }
    for path in ["../escaped.txt", "/../escaped.txt", "../../escaped.txt"] {
        results.insert(
            format!("write {path}"),
            match std::fs::write(path, b"escaped") {
                Ok(()) => json!({"ok": true}),
                Err(e) => json!({"error": e.to_string()}),
            },
        );
    }
    Value::Object(results)
}

export!(Abuse);
