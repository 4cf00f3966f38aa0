//! Prefill and decode speed of a loaded model, as `realm-host bench` reports it.

use std::time::Instant;

use super::{EngineError, LoadedModel};

/// What one benchmark run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// Prompt tokens processed.
    pub prompt_tokens: usize,
    /// Prompt tokens per second.
    pub prefill_tokens_per_second: f64,
    /// Tokens generated (greedy).
    pub generated_tokens: usize,
    /// Generated tokens per second.
    pub decode_tokens_per_second: f64,
}

/// A prompt of exactly `n` tokens: `text` repeated and cut, with BOS if the model wants one.
pub fn bench_prompt(model: &LoadedModel, text: &str, n: usize) -> Vec<u32> {
    let mut ids = model.prompt_tokens(text);
    let body = model.tokenizer().encode(text, false);
    while ids.len() < n && !body.is_empty() {
        ids.extend_from_slice(&body);
    }
    ids.truncate(n);
    ids
}

/// Runs `prompt` through `model`, then decodes `generate` tokens greedily, timing both.
pub fn bench(
    model: &LoadedModel,
    prompt: &[u32],
    generate: usize,
) -> Result<BenchReport, EngineError> {
    let m = model.model();
    let mut seq = m.new_sequence(prompt.len() + generate);
    let start = Instant::now();
    let mut logits = m.forward(&mut seq, prompt)?;
    let prefill = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..generate {
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32);
        logits = m.forward(&mut seq, &[next])?;
    }
    let decode = start.elapsed().as_secs_f64();
    Ok(BenchReport {
        prompt_tokens: prompt.len(),
        prefill_tokens_per_second: prompt.len() as f64 / prefill.max(1e-9),
        generated_tokens: generate,
        decode_tokens_per_second: generate as f64 / decode.max(1e-9),
    })
}
