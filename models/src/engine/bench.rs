//! Prefill and decode speed of a loaded model, as `realm-host bench` reports it.

use std::time::Instant;

use crate::arch::BatchItem;
use crate::arch::pool::SpinPool;

use super::{EngineError, LoadedModel, Prompter};

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
        logits = m.forward(&mut seq, &[argmax(&logits)])?;
    }
    let decode = start.elapsed().as_secs_f64();
    Ok(BenchReport {
        prompt_tokens: prompt.len(),
        prefill_tokens_per_second: prompt.len() as f64 / prefill.max(1e-9),
        generated_tokens: generate,
        decode_tokens_per_second: generate as f64 / decode.max(1e-9),
    })
}

/// Aggregate decode speed, in tokens per second over all streams, of
/// `streams` sequences decoding together: each starts with `prompt`, then
/// every step runs one greedy token of each as one batch, `generate` times
/// (the batcher's decode steps, without its scheduling). With
/// `shared_prompt`, the prompt is prefilled once and every stream continues
/// from its cache, sharing it as the batcher's prefix cache does; otherwise
/// each stream prefills its own copy.
pub fn bench_streams(
    model: &LoadedModel,
    prompt: &[u32],
    generate: usize,
    streams: usize,
    shared_prompt: bool,
) -> Result<f64, EngineError> {
    let m = model.model();
    let capacity = prompt.len() + generate;
    let mut seqs = Vec::with_capacity(streams);
    let mut next = Vec::with_capacity(streams);
    if shared_prompt {
        let mut first = m.new_sequence(prompt.len());
        let token = argmax(&m.forward(&mut first, prompt)?);
        let cached = first.copy_prefix(prompt.len(), prompt.len());
        for _ in 0..streams {
            seqs.push(m.continue_prefix(&cached, prompt.len(), capacity));
            next.push([token]);
        }
    } else {
        for _ in 0..streams {
            let mut seq = m.new_sequence(capacity);
            next.push([argmax(&m.forward(&mut seq, prompt)?)]);
            seqs.push(seq);
        }
    }
    let start = Instant::now();
    for _ in 0..generate {
        let mut batch: Vec<BatchItem<'_>> = seqs
            .iter_mut()
            .zip(&next)
            .map(|(seq, token)| BatchItem {
                seq,
                tokens: token,
                logits: true,
            })
            .collect();
        let logits = m.step(&mut batch)?;
        // Picked per stream across the pool, as the batcher samples.
        SpinPool::global().run_chunks(&mut next, 1, &|i, token| {
            token[0][0] = logits[i].as_deref().map_or(0, argmax);
        });
        m.recycle_logits(logits.into_iter().flatten());
    }
    let seconds = start.elapsed().as_secs_f64().max(1e-9);
    Ok((generate * streams) as f64 / seconds)
}

/// The first largest logit's token, as greedy sampling picks it.
fn argmax(logits: &[f32]) -> u32 {
    super::sampler::argmax(logits.iter().copied())
}
