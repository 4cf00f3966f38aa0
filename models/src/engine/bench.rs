//! Prefill and decode speed of a loaded model, as `realm-host bench` reports it.

use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use crate::arch::pool::SpinPool;
use crate::arch::{BatchItem, LoraAdapter};
use crate::gguf::{GgmlType, GgufFile, GgufWriter, MetaValue};

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

/// The GGUF bytes of a LoRA adapter of `rank` for the model in `base`, as
/// llama.cpp writes adapters: random factors of type `ty` (F32 or F16) on
/// every weight of every layer, `A` of norm about one per row and `B`
/// uniform in `±strength`, alpha equal to the rank. `seed` picks the values.
/// For benchmarks and tests.
pub fn synthetic_adapter_file(
    base: &GgufFile,
    rank: usize,
    seed: u64,
    strength: f32,
    ty: GgmlType,
) -> Result<Vec<u8>, EngineError> {
    if !matches!(ty, GgmlType::F32 | GgmlType::F16) {
        return Err(EngineError::InvalidInput(format!(
            "synthetic adapters are F32 or F16, not {ty}"
        )));
    }
    let config = crate::arch::ModelConfig::from_gguf(base)?;
    let mut w = GgufWriter::new();
    w.meta(
        "general.architecture",
        MetaValue::String(config.architecture.clone()),
    )
    .meta("general.type", MetaValue::String("adapter".into()))
    .meta("adapter.type", MetaValue::String("lora".into()))
    .meta("adapter.lora.alpha", MetaValue::F32(rank as f32));
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut random = move |scale: f32| {
        // SplitMix64, mapped to [-scale, scale).
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
    };
    for l in 0..config.n_layer {
        for target in [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_qkv",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            let name = format!("blk.{l}.{target}.weight");
            let Ok(t) = base.tensor(&name) else { continue };
            let (cols, rows) = (
                t.dims[0] as usize,
                t.dims[1..].iter().product::<u64>() as usize,
            );
            let a: Vec<f32> = (0..cols * rank)
                .map(|_| random(1.0 / (cols as f32).sqrt()))
                .collect();
            let b: Vec<f32> = (0..rank * rows).map(|_| random(strength)).collect();
            for (factor, dims, values) in [
                ("lora_a", [cols as u64, rank as u64], a),
                ("lora_b", [rank as u64, rows as u64], b),
            ] {
                let name = format!("{name}.{factor}");
                match ty {
                    GgmlType::F16 => {
                        let bytes = (values.iter())
                            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                            .collect();
                        w.tensor(&name, &dims, GgmlType::F16, bytes)
                    }
                    _ => w.tensor_f32(&name, &dims, &values),
                };
            }
        }
    }
    Ok(w.to_bytes())
}

/// Aggregate decode speed, in tokens per second over all streams, of
/// `streams` sequences decoding together: each starts with `prompt`, then
/// every step runs one greedy token of each as one batch, `generate` times
/// (the batcher's decode steps, without its scheduling). With
/// `shared_prompt`, the prompt is prefilled once and every stream continues
/// from its cache, sharing it as the batcher's prefix cache does; otherwise
/// each stream prefills its own copy. With `adapters`, stream `i` runs with
/// adapter `i % adapters.len()` (and its own prompt cache).
pub fn bench_streams(
    model: &LoadedModel,
    prompt: &[u32],
    generate: usize,
    streams: usize,
    shared_prompt: bool,
    adapters: &[Arc<LoraAdapter>],
) -> Result<f64, EngineError> {
    let m = model.model();
    let capacity = prompt.len() + generate;
    let mut seqs = Vec::with_capacity(streams);
    let mut next = Vec::with_capacity(streams);
    if !adapters.is_empty() {
        for i in 0..streams {
            let adapter = adapters[i % adapters.len()].clone();
            let mut seq = m.new_adapted_sequence(capacity, adapter)?;
            next.push([argmax(&m.forward(&mut seq, prompt)?)]);
            seqs.push(seq);
        }
    } else if shared_prompt {
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
