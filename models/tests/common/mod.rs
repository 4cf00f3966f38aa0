//! Finding the real models and llama.cpp's reference outputs.

#![allow(dead_code)] // each test binary uses a different subset

pub mod batch;
pub mod weights;

use std::path::PathBuf;

use realm_models::arch::Sequence;
use serde_json::Value;

/// The store entry names of the reference models, with their key in the reference file.
pub const MODELS: &[(&str, &str)] = &[
    ("smollm2-135m-instruct", "smollm2-135m-instruct-q4_1"),
    ("gemma3-270m", "gemma3-270m-q4_k_m"),
];

/// The model file `name` in the store (`$REALM_HOME/models`, default `~/.realm/models`),
/// or `None` (with a note on stderr) when it has not been pulled — a failure
/// instead when `REALM_REQUIRE_MODELS=1` (as `scripts/test.sh` sets after
/// pulling them), so the suite cannot pass without running these tests.
pub fn model(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("REALM_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".realm")))?;
    let path = home.join("models").join(format!("{name}.gguf"));
    if path.is_file() {
        Some(path)
    } else {
        let absent = format!(
            "{} is absent (run `realm-host models pull {name}`)",
            path.display()
        );
        let required = std::env::var("REALM_REQUIRE_MODELS").is_ok_and(|v| v == "1");
        assert!(!required, "{absent}, and REALM_REQUIRE_MODELS=1");
        eprintln!("skipping: {absent}");
        None
    }
}

/// llama.cpp's greedy reference for the model stored under `key`.
pub fn reference(key: &str) -> Value {
    let text = include_str!("../data/llama_cpp_greedy.json");
    let all: Value = serde_json::from_str(text).expect("reference JSON");
    all[key].clone()
}

/// A JSON array of numbers as token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The device the real-model tests run on: `REALM_TEST_DEVICE` (`cpu`, the
/// default; `burn-cpu`, the Burn graph on Burn's CPU backend; or `gpu`,
/// which needs the `gpu` feature).
pub fn device() -> realm_models::arch::ComputeDevice {
    match std::env::var("REALM_TEST_DEVICE") {
        Ok(name) => name.parse().expect("REALM_TEST_DEVICE"),
        Err(_) => realm_models::arch::ComputeDevice::Cpu,
    }
}

/// llama.cpp's test data (`REALM_LLAMA_CPP_DATA`, fetched by
/// `scripts/llama-cpp-testdata.sh`), or `None` (with a note) when absent —
/// a failure when `REALM_REQUIRE_MODELS=1`, as `scripts/test.sh` sets after
/// fetching it.
pub fn llama_cpp_data() -> Option<PathBuf> {
    let dir = std::env::var_os("REALM_LLAMA_CPP_DATA").map(PathBuf::from);
    match dir.filter(|d| d.join("ggml-vocab-gpt-2.gguf").is_file()) {
        Some(dir) => Some(dir),
        None => {
            let required = std::env::var("REALM_REQUIRE_MODELS").is_ok_and(|v| v == "1");
            let absent = "llama.cpp's test data is absent (run \
                          `export REALM_LLAMA_CPP_DATA=$(scripts/llama-cpp-testdata.sh)`)";
            assert!(!required, "{absent}, and REALM_REQUIRE_MODELS=1");
            eprintln!("skipping: {absent}");
            None
        }
    }
}

/// Feeds the prompt one token at a time into `seq` and compares each
/// position's logits with the reference; returns the largest difference and
/// the positions compared. Top-1 must agree wherever the reference's margin
/// is at least `clear`.
pub fn compare(
    model: &realm_models::arch::Model,
    mut seq: Sequence,
    prompt: &[u32],
    reference: &Value,
    name: &str,
    clear: f64,
) -> (f32, usize) {
    let positions = reference["positions"].as_array().unwrap();
    assert_eq!(positions.len(), prompt.len(), "{name}: positions");
    let mut worst = 0f32;
    for (i, (&token, want)) in prompt.iter().zip(positions).enumerate() {
        let logits = model.forward(&mut seq, &[token]).unwrap();
        for pair in want["logits"].as_array().unwrap() {
            let (id, value) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap(),
            );
            worst = worst.max((logits[id] - value as f32).abs());
        }
        if want["margin"].as_f64().unwrap() >= clear {
            assert_eq!(
                argmax(&logits) as u64,
                want["top"].as_u64().unwrap(),
                "{name}: top-1 at position {i}"
            );
        }
    }
    (worst, positions.len())
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// FNV-1a over `bytes`, hex: ties a reference to the exact file it came
/// from (`scripts/arch_reference.py` computes the same).
pub fn digest(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    format!("{hash:016x}")
}
