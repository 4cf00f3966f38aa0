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

use realm_models::arch::{BatchItem, ComputeDevice, LoraAdapter, Model};
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

/// One tiny LoRA adapter for one of [`CASES`]' models: its rank, factor
/// type, `alpha` (0: none), the scale it is applied at, and the weights it
/// adapts.
struct AdapterCase {
    name: &'static str,
    base: &'static str,
    rank: usize,
    ty: GgmlType,
    alpha: f32,
    scale: f32,
    targets: &'static [&'static str],
}

const ALL_TARGETS: &[&str] = &[
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

const ADAPTERS: &[AdapterCase] = &[
    AdapterCase {
        name: "lora-llama3-f32-r8",
        base: "llama3-f32",
        rank: 8,
        ty: GgmlType::F32,
        alpha: 16.0,
        scale: 1.0,
        targets: ALL_TARGETS,
    },
    AdapterCase {
        name: "lora-llama3-f16-r4",
        base: "llama3-f32",
        rank: 4,
        ty: GgmlType::F16,
        alpha: 0.0,
        scale: 0.75,
        targets: &["attn_q", "attn_v", "attn_output", "ffn_down"],
    },
    AdapterCase {
        name: "lora-qwen2-q8_0-r16",
        base: "qwen2-q8_0",
        rank: 16,
        ty: GgmlType::F32,
        alpha: 8.0,
        scale: 1.0,
        targets: ALL_TARGETS,
    },
    AdapterCase {
        name: "lora-phi3-f32-r8",
        base: "phi3-f32",
        rank: 8,
        ty: GgmlType::F16,
        alpha: 16.0,
        scale: 1.0,
        // Phi-3's fused weights.
        targets: &["attn_qkv", "attn_output", "ffn_up", "ffn_down"],
    },
];

/// The GGUF bytes of `adapter` (llama.cpp's LoRA format), the same every time.
fn adapter_file(adapter: &AdapterCase) -> Vec<u8> {
    let base = CASES.iter().find(|c| c.name == adapter.base).unwrap();
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String(base.arch.into()))
        .meta("general.type", MetaValue::String("adapter".into()))
        .meta("general.name", MetaValue::String(adapter.name.into()))
        .meta("adapter.type", MetaValue::String("lora".into()))
        .meta("adapter.lora.alpha", MetaValue::F32(adapter.alpha));
    let (q_dim, kv_dim) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let shape = |target: &str| -> (usize, usize) {
        match target {
            "attn_q" => (EMBD, q_dim),
            "attn_k" | "attn_v" => (EMBD, kv_dim),
            "attn_qkv" => (EMBD, q_dim + 2 * kv_dim),
            "attn_output" => (q_dim, EMBD),
            "ffn_gate" => (EMBD, FF),
            "ffn_up" if base.arch == "phi3" => (EMBD, 2 * FF),
            "ffn_up" => (EMBD, FF),
            "ffn_down" => (FF, EMBD),
            other => panic!("no target {other}"),
        }
    };
    let mut rng = Rng(0x10a4 ^ adapter.name.len() as u64);
    let r = adapter.rank;
    let mut factor = |w: &mut GgufWriter, name: &str, cols: usize, rows: usize, spread: f32| {
        let values = rng.vec(cols * rows, spread);
        match adapter.ty {
            GgmlType::F16 => {
                let bytes = values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect();
                w.tensor(name, &[cols as u64, rows as u64], GgmlType::F16, bytes)
            }
            _ => w.tensor_f32(name, &[cols as u64, rows as u64], &values),
        };
    };
    for l in 0..LAYERS {
        for target in adapter.targets {
            let (cols, rows) = shape(target);
            let name = format!("blk.{l}.{target}.weight");
            // Deltas about as large as a tenth of the weights' products.
            factor(
                &mut w,
                &format!("{name}.lora_a"),
                cols,
                r,
                1.0 / (cols as f32).sqrt(),
            );
            factor(
                &mut w,
                &format!("{name}.lora_b"),
                r,
                rows,
                0.3 / (r as f32).sqrt(),
            );
        }
    }
    w.to_bytes()
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
    // Adapters go in `adapters/`, each with a JSON sidecar naming its base
    // and scale, for the script to load with `lora_path`.
    for adapter in ADAPTERS {
        let dir = out.join("adapters");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("{}.gguf", adapter.name)),
            adapter_file(adapter),
        )
        .unwrap();
        let sidecar = serde_json::json!({"base": adapter.base, "scale": adapter.scale});
        std::fs::write(
            dir.join(format!("{}.json", adapter.name)),
            sidecar.to_string(),
        )
        .unwrap();
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
            Some(common::digest(&bytes).as_str()),
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
        let seq = model.new_sequence(prompt.len());
        let (worst, positions) = common::compare(&model, seq, &prompt, reference, case.name, 0.1);
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
                assert_eq!(
                    common::argmax(&logits),
                    token,
                    "{}: greedy step {step}",
                    case.name
                );
                clear += 1;
            }
            logits = model.forward(&mut seq, &[token]).unwrap();
        }
        assert!(clear >= 3, "{}: only {clear} clear greedy steps", case.name);
        report.push(format!("{} {worst:.4}", case.name));
    }
    eprintln!("max |Δlogit| on {device}: {}", report.join(", "));
}

/// Each tiny adapter, applied by Realm, against llama.cpp with the same
/// adapter and scale (`lora_path`, `lora_scale`): the logits agree at every
/// position within the base type's bound (the deltas are small products
/// in f32; F16 factors are widened exactly), and top-1 agrees wherever
/// llama.cpp's margin is clear.
#[test]
fn lora_adapters_agree_with_llama_cpp() {
    let Some(data) = common::llama_cpp_data() else {
        return;
    };
    let all: Value =
        serde_json::from_str(include_str!("data/arch_reference.json")).expect("reference JSON");
    let device = common::device();
    let mut report = Vec::new();
    for adapter in ADAPTERS {
        let reference = &all[adapter.name];
        let bytes = adapter_file(adapter);
        assert_eq!(
            reference["digest"].as_str(),
            Some(common::digest(&bytes).as_str()),
            "{}: the adapter differs from the one the reference was made on (`just arch-reference`)",
            adapter.name
        );
        let case = CASES.iter().find(|c| c.name == adapter.base).unwrap();
        let file = Arc::new(
            GgufFile::from_bytes(model_file(case, &vocab_file(&data, case.vocab))).unwrap(),
        );
        let prompt = Tokenizer::from_gguf(&file).unwrap().encode_prompt(PROMPT);
        let model = Model::load(file, device).unwrap();
        let lora = Arc::new(
            model
                .load_adapter(&GgufFile::from_bytes(bytes).unwrap(), adapter.scale)
                .unwrap(),
        );
        let positions = reference["positions"].as_array().unwrap();
        let seq = model.new_adapted_sequence(prompt.len(), lora).unwrap();
        let (worst, _) = common::compare(&model, seq, &prompt, reference, adapter.name, 0.1);
        let bound = bound(case.ty);
        assert!(
            worst <= bound,
            "{}: max |Δlogit| {worst}, bound {bound}",
            adapter.name
        );
        // The adapter changes the model: its logits are not the base's.
        let base = &all[adapter.base]["positions"][prompt.len() - 1]["logits"];
        let adapted = &positions[prompt.len() - 1]["logits"];
        assert_ne!(
            base, adapted,
            "{}: the adapter changes nothing",
            adapter.name
        );
        report.push(format!("{} {worst:.4}", adapter.name));
    }
    eprintln!("LoRA max |Δlogit| on {device}: {}", report.join(", "));
}

/// Sequences with different adapters, and none, run in one step: each
/// gets exactly the logits it gets alone.
#[test]
fn adapted_sequences_share_a_step_without_mixing() {
    let Some(data) = common::llama_cpp_data() else {
        return;
    };
    let case = CASES.iter().find(|c| c.name == "llama3-f32").unwrap();
    let file =
        Arc::new(GgufFile::from_bytes(model_file(case, &vocab_file(&data, case.vocab))).unwrap());
    let prompt = Tokenizer::from_gguf(&file).unwrap().encode_prompt(PROMPT);
    let model = Model::load(file, common::device()).unwrap();
    let adapters: Vec<Option<Arc<LoraAdapter>>> = ADAPTERS
        .iter()
        .filter(|a| a.base == "llama3-f32")
        .map(|a| {
            let file = GgufFile::from_bytes(adapter_file(a)).unwrap();
            Some(Arc::new(model.load_adapter(&file, a.scale).unwrap()))
        })
        .chain([None])
        .collect();
    let sequence = |adapter: &Option<Arc<LoraAdapter>>| match adapter {
        Some(a) => model.new_adapted_sequence(64, a.clone()).unwrap(),
        None => model.new_sequence(64),
    };
    // Alone: the prompt, then one more token.
    let alone: Vec<(Vec<f32>, Vec<f32>)> = adapters
        .iter()
        .map(|a| {
            let mut seq = sequence(a);
            let first = model.forward(&mut seq, &prompt).unwrap();
            let next = model.forward(&mut seq, &[common::argmax(&first)]).unwrap();
            (first, next)
        })
        .collect();
    // Together, twice over (two sequences per adapter), prompts then a token.
    let mut seqs: Vec<_> = adapters.iter().chain(&adapters).map(sequence).collect();
    let mut batch: Vec<BatchItem> = seqs
        .iter_mut()
        .map(|seq| BatchItem {
            seq,
            tokens: &prompt,
            logits: true,
        })
        .collect();
    let firsts: Vec<Vec<f32>> = model
        .step(&mut batch)
        .unwrap()
        .into_iter()
        .map(Option::unwrap)
        .collect();
    let tokens: Vec<[u32; 1]> = firsts.iter().map(|l| [common::argmax(l)]).collect();
    let mut batch: Vec<BatchItem> = seqs
        .iter_mut()
        .zip(&tokens)
        .map(|(seq, t)| BatchItem {
            seq,
            tokens: t,
            logits: true,
        })
        .collect();
    let nexts: Vec<Vec<f32>> = model
        .step(&mut batch)
        .unwrap()
        .into_iter()
        .map(Option::unwrap)
        .collect();
    // The fused CPU pass sums every product in one order whatever the batch;
    // on a GPU a batch this size takes the tiled prompt product rather than
    // the decode kernel, which sums in another order (float rounding only).
    let bound = if common::device() == ComputeDevice::Gpu {
        1e-3
    } else {
        1e-4
    };
    for (k, (first, next)) in firsts.iter().zip(&nexts).enumerate() {
        let (want_first, want_next) = &alone[k % adapters.len()];
        let diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        assert!(
            diff(first, want_first) < bound,
            "sequence {k}: prompt logits differ by {}",
            diff(first, want_first)
        );
        assert!(
            diff(next, want_next) < bound,
            "sequence {k}: next logits differ by {}",
            diff(next, want_next)
        );
    }
    // And the adapters do differ from each other and from none.
    assert!(alone.windows(2).all(|w| w[0].0 != w[1].0));
}

/// Adapters that do not fit are refused, saying why.
#[test]
fn unfit_adapters_are_refused() {
    let Some(data) = common::llama_cpp_data() else {
        return;
    };
    let load = |case: &str| {
        let case = CASES.iter().find(|c| c.name == case).unwrap();
        let file = Arc::new(
            GgufFile::from_bytes(model_file(case, &vocab_file(&data, case.vocab))).unwrap(),
        );
        Model::load(file, realm_models::arch::ComputeDevice::Cpu).unwrap()
    };
    let llama = load("llama3-f32");
    let qwen_adapter = GgufFile::from_bytes(adapter_file(&ADAPTERS[2])).unwrap();
    let err = llama
        .load_adapter(&qwen_adapter, 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapts a `qwen2` model"), "{err}");
    // A model is not an adapter.
    let model =
        GgufFile::from_bytes(model_file(&CASES[0], &vocab_file(&data, CASES[0].vocab))).unwrap();
    let err = llama.load_adapter(&model, 1.0).unwrap_err().to_string();
    assert!(err.contains("not a LoRA adapter"), "{err}");
    // A factor of the wrong shape names the tensor.
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("general.type", MetaValue::String("adapter".into()))
        .meta("adapter.type", MetaValue::String("lora".into()))
        .tensor_f32(
            "blk.0.attn_q.weight.lora_a",
            &[EMBD as u64 / 2, 4],
            &vec![0.0; EMBD * 2],
        )
        .tensor_f32(
            "blk.0.attn_q.weight.lora_b",
            &[4, (HEADS * HEAD_DIM) as u64],
            &vec![0.0; 4 * HEADS * HEAD_DIM],
        );
    let err = llama
        .load_adapter(&GgufFile::from_bytes(w.to_bytes()).unwrap(), 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("blk.0.attn_q.weight.lora_a") && err.contains("shape"),
        "{err}"
    );
    // A weight the engine does not adapt.
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("general.type", MetaValue::String("adapter".into()))
        .meta("adapter.type", MetaValue::String("lora".into()))
        .tensor_f32(
            "token_embd.weight.lora_a",
            &[EMBD as u64, 4],
            &vec![0.0; EMBD * 4],
        )
        .tensor_f32("token_embd.weight.lora_b", &[4, 8], &[0.0; 32]);
    let err = llama
        .load_adapter(&GgufFile::from_bytes(w.to_bytes()).unwrap(), 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapting `token_embd.weight` is not supported"),
        "{err}"
    );
}
