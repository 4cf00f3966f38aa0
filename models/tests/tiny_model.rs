//! The forward pass on tiny random-weight models the test writes itself: no
//! download needed. Checks loading, errors, determinism, rewinding, and that
//! quantized weights give nearly the f32 weights' logits.

use std::sync::Arc;

use half::f16;
use realm_models::arch::{Model, ModelError};
use realm_models::gguf::{GgmlType, GgufFile, GgufWriter, MetaValue};

const EMBD: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const LAYERS: usize = 2;
const FF: usize = 128;
const VOCAB: usize = 96;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

fn q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in values.chunks(32) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max / 127.0;
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| {
            if d == 0.0 {
                0
            } else {
                (v / d).round() as i8 as u8
            }
        }));
    }
    out
}

/// A llama-architecture model with random weights; matrices in `ty` (F32 or Q8_0).
fn tiny_llama(ty: GgmlType, context: u32) -> Model {
    let mut rng = Rng(7);
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("llama.block_count", MetaValue::U32(LAYERS as u32))
        .meta("llama.embedding_length", MetaValue::U32(EMBD as u32))
        .meta("llama.attention.head_count", MetaValue::U32(HEADS as u32))
        .meta(
            "llama.attention.head_count_kv",
            MetaValue::U32(KV_HEADS as u32),
        )
        .meta("llama.feed_forward_length", MetaValue::U32(FF as u32))
        .meta("llama.vocab_size", MetaValue::U32(VOCAB as u32))
        .meta("llama.context_length", MetaValue::U32(context))
        .meta("llama.rope.freq_base", MetaValue::F32(10_000.0))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        );
    let head_dim = EMBD / HEADS;
    let mut matrix = |w: &mut GgufWriter, name: &str, cols: usize, rows: usize| {
        let values = rng.vec(cols * rows, 0.5 / (cols as f32).sqrt() * 3.0);
        match ty {
            GgmlType::Q8_0 => w.tensor(name, &[cols as u64, rows as u64], ty, q8_0(&values)),
            _ => w.tensor_f32(name, &[cols as u64, rows as u64], &values),
        };
    };
    matrix(&mut w, "token_embd.weight", EMBD, VOCAB);
    for l in 0..LAYERS {
        let n = |s: &str| format!("blk.{l}.{s}");
        matrix(&mut w, &n("attn_q.weight"), EMBD, HEADS * head_dim);
        matrix(&mut w, &n("attn_k.weight"), EMBD, KV_HEADS * head_dim);
        matrix(&mut w, &n("attn_v.weight"), EMBD, KV_HEADS * head_dim);
        matrix(&mut w, &n("attn_output.weight"), HEADS * head_dim, EMBD);
        matrix(&mut w, &n("ffn_gate.weight"), EMBD, FF);
        matrix(&mut w, &n("ffn_up.weight"), EMBD, FF);
        matrix(&mut w, &n("ffn_down.weight"), FF, EMBD);
        w.tensor_f32(&n("attn_norm.weight"), &[EMBD as u64], &vec![1.0; EMBD]);
        w.tensor_f32(&n("ffn_norm.weight"), &[EMBD as u64], &vec![1.0; EMBD]);
    }
    w.tensor_f32("output_norm.weight", &[EMBD as u64], &vec![1.0; EMBD]);
    Model::load(Arc::new(GgufFile::from_bytes(w.to_bytes()).unwrap())).unwrap()
}

fn run(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut seq = model.new_sequence(tokens.len());
    let mut logits = Vec::new();
    for &t in tokens {
        logits = model.forward(&mut seq, t).unwrap();
    }
    logits
}

#[test]
fn loads_and_runs_deterministically() {
    let model = tiny_llama(GgmlType::F32, 64);
    assert_eq!(model.config().head_dim, EMBD / HEADS);
    let tokens = [1, 5, 9, 42, 7];
    let a = run(&model, &tokens);
    assert_eq!(a.len(), VOCAB);
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(a, run(&model, &tokens));
    assert_ne!(a, run(&model, &[1, 5, 9, 42, 8]), "the last token matters");
    assert_ne!(
        a,
        run(&model, &[2, 5, 9, 42, 7]),
        "attention sees earlier tokens"
    );
}

#[test]
fn quantized_weights_track_f32_weights() {
    let tokens = [3, 14, 15, 92, 65];
    let exact = run(&tiny_llama(GgmlType::F32, 64), &tokens);
    let quant = run(&tiny_llama(GgmlType::Q8_0, 64), &tokens);
    let spread = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = exact
        .iter()
        .zip(&quant)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 0.05 * spread,
        "Q8_0 logits drift {worst} against a range of {spread}"
    );
}

#[test]
fn rewinding_recomputes_the_same_logits() {
    let model = tiny_llama(GgmlType::Q8_0, 64);
    let mut seq = model.new_sequence(16);
    for t in [1, 2, 3] {
        model.forward(&mut seq, t).unwrap();
    }
    let at_four = model.forward(&mut seq, 4).unwrap();
    model.forward(&mut seq, 5).unwrap();
    seq.truncate(3);
    assert_eq!(model.forward(&mut seq, 4).unwrap(), at_four);
}

#[test]
fn bad_tokens_and_full_contexts_are_errors() {
    let model = tiny_llama(GgmlType::F32, 4);
    let mut seq = model.new_sequence(100);
    assert!(matches!(
        model.forward(&mut seq, VOCAB as u32),
        Err(ModelError::BadToken(_))
    ));
    for t in 0..4 {
        model.forward(&mut seq, t).unwrap();
    }
    assert!(matches!(
        model.forward(&mut seq, 0),
        Err(ModelError::ContextFull(4))
    ));
}

#[test]
fn missing_tensors_are_named() {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("llama.block_count", MetaValue::U32(1))
        .meta("llama.embedding_length", MetaValue::U32(8))
        .meta("llama.attention.head_count", MetaValue::U32(2))
        .meta("llama.feed_forward_length", MetaValue::U32(16))
        .meta("llama.vocab_size", MetaValue::U32(4));
    let err = Model::load(Arc::new(GgufFile::from_bytes(w.to_bytes()).unwrap())).unwrap_err();
    assert_eq!(
        err.to_string(),
        "tensor `blk.0.attn_norm.weight` is missing"
    );
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("mamba".into()));
    let err = Model::load(Arc::new(GgufFile::from_bytes(w.to_bytes()).unwrap())).unwrap_err();
    assert!(err.to_string().contains("mamba"), "{err}");
}
