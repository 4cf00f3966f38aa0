//! Prefill and decode speed of a loaded model, as `realm-host bench` reports it.

use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use crate::arch::BatchItem;
use crate::arch::pool::SpinPool;

use super::{
    ConstraintSpec, Engine, EngineError, GenerateParams, LoadedModel, Offer, OnEnd, Prompter,
    Request, SamplingParams, TextSink,
};

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

/// Decode speed through the batcher, as requests see it: `streams` greedy
/// generations of up to `generate` tokens after `prompt`, submitted
/// together, the first `constrained` of them held to `spec`. Tokens per
/// second summed over the streams, each counted from its first piece to its
/// end (so prefill is left out).
pub fn bench_generations(
    model: &LoadedModel,
    prompt: &[u32],
    generate: usize,
    streams: usize,
    constrained: usize,
    spec: &ConstraintSpec,
) -> Result<f64, EngineError> {
    let params = GenerateParams {
        max_tokens: generate,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        stop: Vec::new(),
    };
    let (ended, ends) = mpsc::channel();
    let mut pending = Vec::with_capacity(streams);
    for i in 0..streams {
        // Each stream its own tenant: no stream reuses another's prompt cache.
        let mut request = Request::new(prompt.to_vec(), params.clone(), &format!("bench{i}"), 1);
        if i < constrained {
            request.constraint = Some(model.constrain(spec)?);
        }
        let first = Arc::new(Mutex::new(None));
        request.sink = Some(Box::new(FirstPiece(first.clone())));
        let ended = ended.clone();
        let on_end: OnEnd = Box::new(move |result| {
            let tokens = result.as_ref().map_or(0, |c| c.completion_tokens);
            let first = *first.lock().unwrap_or_else(|e| e.into_inner());
            let _ = ended.send((tokens, first, Instant::now(), result.is_ok()));
        });
        pending.push(model.submit(request, Some(on_end)));
    }
    drop(ended);
    let mut rate = 0.0;
    for (tokens, first, end, ok) in ends {
        if !ok {
            return Err(EngineError::InvalidInput(
                "a benchmark generation failed".into(),
            ));
        }
        if let Some(first) = first
            && tokens > 1
        {
            rate += (tokens - 1) as f64 / (end - first).as_secs_f64().max(1e-9);
        }
    }
    drop(pending);
    Ok(rate)
}

/// Notes when the first piece of text arrives.
struct FirstPiece(Arc<Mutex<Option<Instant>>>);

impl TextSink for FirstPiece {
    fn offer(&mut self, _piece: String) -> Offer {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Instant::now);
        Offer::Taken
    }
}

/// The first largest logit's token, as greedy sampling picks it.
fn argmax(logits: &[f32]) -> u32 {
    super::sampler::argmax(logits.iter().copied())
}
