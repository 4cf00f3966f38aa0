//! Every architecture against llama.cpp on the same file: tiny random-weight
//! models with real metadata keys, tensor names and a real vocabulary (from
//! llama.cpp's tokenizer test set, `REALM_LLAMA_CPP_DATA`), written here
//! byte for byte the same each time, and llama.cpp's logits for them in
//! `data/arch_reference.json`.
//!
//! To regenerate the reference (after changing a model below):
//! `just arch-reference` writes the files with the ignored test
//! `write_models`, then runs `scripts/arch_reference.py` on them in the
//! benchmark's llama-cpp-python environment.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use realm_models::arch::Model;
use realm_models::gguf::{GgmlType, GgufFile, GgufWriter, MetaValue};
use realm_models::tokenizer::Tokenizer;
use serde_json::Value;

use common::weights::{Rng, q8_0};

/// One tiny model: an architecture, its weight type and the vocabulary it borrows.
struct Case {
    name: &'static str,
    arch: &'static str,
    vocab: &'static str,
    ty: GgmlType,
}

const fn case(name: &'static str, arch: &'static str, vocab: &'static str, ty: GgmlType) -> Case {
    Case {
        name,
        arch,
        vocab,
        ty,
    }
}

const CASES: &[Case] = &[
    case("llama3-f32", "llama", "llama-bpe", GgmlType::F32),
    case("llama3-q8_0", "llama", "llama-bpe", GgmlType::Q8_0),
    case("qwen2-f32", "qwen2", "qwen2", GgmlType::F32),
    case("qwen2-q8_0", "qwen2", "qwen2", GgmlType::Q8_0),
    case("qwen3-f32", "qwen3", "qwen35", GgmlType::F32),
    case("qwen3-q8_0", "qwen3", "qwen35", GgmlType::Q8_0),
    case("phi3-f32", "phi3", "phi-3", GgmlType::F32),
    case("phi3-q8_0", "phi3", "phi-3", GgmlType::Q8_0),
    case("gemma2-f32", "gemma2", "llama-spm", GgmlType::F32),
    case("gemma2-q8_0", "gemma2", "llama-spm", GgmlType::Q8_0),
];

const EMBD: usize = 128;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 64;
const FF: usize = 256;
const LAYERS: usize = 2;
const CONTEXT: u32 = 256;
/// Gemma 2's window: shorter than the prompt, so it matters.
const WINDOW: u32 = 8;

/// The prompt every model reads (tokenized by its own vocabulary).
pub const PROMPT: &str = "The quick brown fox jumps over the lazy dog; then 1234 birds sing.";

/// The GGUF bytes of `case`'s model, the same every time.
fn model_file(case: &Case, vocab: &GgufFile) -> Vec<u8> {
    let arch = case.arch;
    let key = |k: &str| format!("{arch}.{k}");
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String(arch.into()))
        .meta("general.name", MetaValue::String(case.name.into()))
        .meta(&key("block_count"), MetaValue::U32(LAYERS as u32))
        .meta(&key("context_length"), MetaValue::U32(CONTEXT))
        .meta(&key("embedding_length"), MetaValue::U32(EMBD as u32))
        .meta(&key("feed_forward_length"), MetaValue::U32(FF as u32))
        .meta(&key("attention.head_count"), MetaValue::U32(HEADS as u32))
        .meta(
            &key("attention.head_count_kv"),
            MetaValue::U32(KV_HEADS as u32),
        )
        .meta(
            &key("attention.key_length"),
            MetaValue::U32(HEAD_DIM as u32),
        )
        .meta(
            &key("attention.value_length"),
            MetaValue::U32(HEAD_DIM as u32),
        )
        .meta(
            &key("rope.dimension_count"),
            MetaValue::U32(HEAD_DIM as u32),
        )
        .meta(&key("rope.freq_base"), MetaValue::F32(10_000.0))
        .meta(
            &key("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(1e-6),
        );
    if arch == "gemma2" {
        w.meta(&key("attention.sliding_window"), MetaValue::U32(WINDOW))
            // Caps far below Gemma 2's (50, 30), so that they bite.
            .meta(&key("attn_logit_softcapping"), MetaValue::F32(1.5))
            .meta(&key("final_logit_softcapping"), MetaValue::F32(4.0));
    }
    for (k, v) in vocab.metadata() {
        if k.starts_with("tokenizer.") {
            w.meta(k, v.clone());
        }
    }
    let n_vocab = vocab.get_array("tokenizer.ggml.tokens").unwrap().len();

    let mut rng = Rng(0x5eed ^ case.name.len() as u64);
    let ty = case.ty;
    let mut matrix = |w: &mut GgufWriter, name: &str, cols: usize, rows: usize| {
        let values = rng.vec(cols * rows, 1.5 / (cols as f32).sqrt());
        match ty {
            GgmlType::Q8_0 => w.tensor(name, &[cols as u64, rows as u64], ty, q8_0(&values)),
            _ => w.tensor_f32(name, &[cols as u64, rows as u64], &values),
        };
    };
    let mut small = Rng(0xb1a5);
    let mut vector = |w: &mut GgufWriter, name: &str, len: usize, around: f32, spread: f32| {
        let values: Vec<f32> = small.vec(len, spread).iter().map(|v| around + v).collect();
        w.tensor_f32(name, &[len as u64], &values);
    };
    matrix(&mut w, "token_embd.weight", EMBD, n_vocab);
    let (q_dim, kv_dim) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    for l in 0..LAYERS {
        let n = |s: &str| format!("blk.{l}.{s}");
        vector(&mut w, &n("attn_norm.weight"), EMBD, 1.0, 0.2);
        vector(&mut w, &n("ffn_norm.weight"), EMBD, 1.0, 0.2);
        if arch == "phi3" {
            matrix(&mut w, &n("attn_qkv.weight"), EMBD, q_dim + 2 * kv_dim);
            matrix(&mut w, &n("ffn_up.weight"), EMBD, 2 * FF);
        } else {
            matrix(&mut w, &n("attn_q.weight"), EMBD, q_dim);
            matrix(&mut w, &n("attn_k.weight"), EMBD, kv_dim);
            matrix(&mut w, &n("attn_v.weight"), EMBD, kv_dim);
            matrix(&mut w, &n("ffn_gate.weight"), EMBD, FF);
            matrix(&mut w, &n("ffn_up.weight"), EMBD, FF);
        }
        matrix(&mut w, &n("attn_output.weight"), q_dim, EMBD);
        matrix(&mut w, &n("ffn_down.weight"), FF, EMBD);
        if arch == "qwen2" {
            vector(&mut w, &n("attn_q.bias"), q_dim, 0.0, 0.5);
            vector(&mut w, &n("attn_k.bias"), kv_dim, 0.0, 0.5);
            vector(&mut w, &n("attn_v.bias"), kv_dim, 0.0, 0.5);
        }
        if arch == "qwen3" {
            vector(&mut w, &n("attn_q_norm.weight"), HEAD_DIM, 1.0, 0.2);
            vector(&mut w, &n("attn_k_norm.weight"), HEAD_DIM, 1.0, 0.2);
        }
        if arch == "gemma2" {
            vector(&mut w, &n("post_attention_norm.weight"), EMBD, 1.0, 0.2);
            vector(&mut w, &n("post_ffw_norm.weight"), EMBD, 1.0, 0.2);
        }
    }
    vector(&mut w, "output_norm.weight", EMBD, 1.0, 0.2);
    match arch {
        // Llama 3's rope factors: low frequencies slowed down.
        "llama" => vector(&mut w, "rope_freqs.weight", HEAD_DIM / 2, 2.0, 1.0),
        // Phi-3's LongRoPE: the short factors apply within the trained context.
        "phi3" => {
            vector(&mut w, "rope_factors_short.weight", HEAD_DIM / 2, 1.5, 0.4);
            vector(&mut w, "rope_factors_long.weight", HEAD_DIM / 2, 8.0, 2.0);
            w.meta(
                &key("rope.scaling.original_context_length"),
                MetaValue::U32(CONTEXT),
            );
        }
        // Separate output weights (gemma2 ties them to the embeddings).
        "qwen2" | "qwen3" => matrix(&mut w, "output.weight", EMBD, n_vocab),
        _ => {}
    }
    w.to_bytes()
}

/// FNV-1a over `bytes`, hex: ties a reference to the exact file it came from.
fn digest(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    format!("{hash:016x}")
}

fn vocab_file(dir: &Path, name: &str) -> GgufFile {
    GgufFile::open(&dir.join(format!("ggml-vocab-{name}.gguf"))).unwrap()
}

/// Writes every case's model into `$REALM_ARCH_OUT` for the reference script.
#[test]
#[ignore = "writes the models scripts/arch_reference.py reads; run by `just arch-reference`"]
fn write_models() {
    let data = common::llama_cpp_data().expect("llama.cpp's test data");
    let out = PathBuf::from(std::env::var("REALM_ARCH_OUT").expect("REALM_ARCH_OUT"));
    std::fs::create_dir_all(&out).unwrap();
    for case in CASES {
        let bytes = model_file(case, &vocab_file(&data, case.vocab));
        std::fs::write(out.join(format!("{}.gguf", case.name)), bytes).unwrap();
    }
    std::fs::write(out.join("prompt.txt"), PROMPT).unwrap();
}

/// The largest |Δlogit| each weight type may show. Both engines read the
/// same weights and keep keys and values in f16; they differ in summation
/// order, and for Q8_0 in how activations are rounded to 8 bits before the
/// integer products (llama.cpp rounds per 32-value block as Realm does, but
/// not in the same order of operations), which moves logits of a few units
/// by up to a few hundredths.
fn bound(ty: GgmlType) -> f32 {
    match ty {
        GgmlType::Q8_0 => 0.08,
        _ => 0.005,
    }
}

#[test]
fn architectures_agree_with_llama_cpp() {
    let Some(data) = common::llama_cpp_data() else {
        return;
    };
    let all: Value =
        serde_json::from_str(include_str!("data/arch_reference.json")).expect("reference JSON");
    let device = common::device();
    let mut report = Vec::new();
    for case in CASES {
        let reference = &all[case.name];
        let vocab = vocab_file(&data, case.vocab);
        let bytes = model_file(case, &vocab);
        assert_eq!(
            reference["digest"].as_str(),
            Some(digest(&bytes).as_str()),
            "{}: the model differs from the one the reference was made on (`just arch-reference`)",
            case.name
        );
        let file = Arc::new(GgufFile::from_bytes(bytes).unwrap());
        let tokenizer = Tokenizer::from_gguf(&file).unwrap();
        let prompt = tokenizer.encode_prompt(PROMPT);
        assert_eq!(
            prompt,
            common::ids(&reference["prompt_ids"]),
            "{}: tokens",
            case.name
        );
        let model = Model::load(file, device).unwrap();
        let (worst, positions) = compare(&model, &prompt, reference, case);
        assert!(
            worst <= bound(case.ty),
            "{}: max |Δlogit| {worst} over {positions} positions, bound {}",
            case.name,
            bound(case.ty)
        );
        // llama.cpp's greedy continuation, fed token by token after a
        // batched prefill: Realm must pick the same token wherever
        // llama.cpp's pick was clear (margin ≥ 0.1; after a near-tie either
        // pick is right).
        let want = common::ids(&reference["greedy_ids"]);
        let margins = reference["greedy_margins"].as_array().unwrap();
        let mut seq = model.new_sequence(prompt.len() + want.len());
        let mut logits = model.forward(&mut seq, &prompt).unwrap();
        let mut clear = 0;
        for (step, (&token, margin)) in want.iter().zip(margins).enumerate() {
            if margin.as_f64().unwrap() >= 0.1 {
                assert_eq!(argmax(&logits), token, "{}: greedy step {step}", case.name);
                clear += 1;
            }
            logits = model.forward(&mut seq, &[token]).unwrap();
        }
        assert!(clear >= 3, "{}: only {clear} clear greedy steps", case.name);
        report.push(format!("{} {worst:.4}", case.name));
    }
    eprintln!("max |Δlogit| on {device}: {}", report.join(", "));
}

/// Feeds the prompt one token at a time and compares each position's logits
/// with the reference; returns the largest difference and the positions
/// compared. Top-1 must agree wherever the reference's margin is ≥ 0.1.
fn compare(model: &Model, prompt: &[u32], reference: &Value, case: &Case) -> (f32, usize) {
    let positions = reference["positions"].as_array().unwrap();
    assert_eq!(positions.len(), prompt.len(), "{}: positions", case.name);
    let mut seq = model.new_sequence(prompt.len());
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
        if want["margin"].as_f64().unwrap() >= 0.1 {
            assert_eq!(
                argmax(&logits) as u64,
                want["top"].as_u64().unwrap(),
                "{}: top-1 at position {i}",
                case.name
            );
        }
    }
    (worst, positions.len())
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}
