//! The forward pass on tiny random-weight models the test writes itself: no
//! download needed. Checks loading, errors, determinism, rewinding, batched
//! prefill against token-by-token, sliding windows, that quantized weights
//! give nearly the f32 weights' logits, and (with `gpu`) wgpu against the CPU.

mod common;

use std::sync::Arc;

use common::weights::{Rng, q8_0};
use realm_models::arch::{ComputeDevice, Model, ModelError};
use realm_models::gguf::{GgmlType, GgufFile, GgufWriter, MetaValue};

const EMBD: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const LAYERS: usize = 2;
const FF: usize = 128;
const VOCAB: usize = 96;

/// What tiny model to write.
#[derive(Clone, Copy)]
struct Spec {
    /// `llama` or `gemma3` (sliding window of 4, every 6th layer global).
    arch: &'static str,
    /// Matrix type: F32 or Q8_0.
    ty: GgmlType,
    context: u32,
    /// `attention.sliding_window`, if any.
    window: Option<u32>,
}

const LLAMA: Spec = Spec {
    arch: "llama",
    ty: GgmlType::F32,
    context: 64,
    window: None,
};

const GEMMA: Spec = Spec {
    arch: "gemma3",
    ty: GgmlType::F32,
    context: 64,
    window: Some(4),
};

/// The GGUF bytes of a random-weight model.
fn tiny_model_file(spec: Spec) -> Vec<u8> {
    let mut rng = Rng(7);
    let mut w = GgufWriter::new();
    let arch = spec.arch;
    let gemma = arch == "gemma3";
    let layers = if gemma { 6 } else { LAYERS };
    let key = |k: &str| format!("{arch}.{k}");
    w.meta("general.architecture", MetaValue::String(arch.into()))
        .meta(&key("block_count"), MetaValue::U32(layers as u32))
        .meta(&key("embedding_length"), MetaValue::U32(EMBD as u32))
        .meta(&key("attention.head_count"), MetaValue::U32(HEADS as u32))
        .meta(
            &key("attention.head_count_kv"),
            MetaValue::U32(KV_HEADS as u32),
        )
        .meta(&key("feed_forward_length"), MetaValue::U32(FF as u32))
        .meta(&key("vocab_size"), MetaValue::U32(VOCAB as u32))
        .meta(&key("context_length"), MetaValue::U32(spec.context))
        .meta(&key("rope.freq_base"), MetaValue::F32(100_000.0))
        .meta(
            &key("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(1e-5),
        );
    if let Some(window) = spec.window {
        w.meta(&key("attention.sliding_window"), MetaValue::U32(window));
    }
    let head_dim = EMBD / HEADS;
    let mut matrix = |w: &mut GgufWriter, name: &str, cols: usize, rows: usize| {
        let values = rng.vec(cols * rows, 0.5 / (cols as f32).sqrt() * 3.0);
        match spec.ty {
            GgmlType::Q8_0 => w.tensor(name, &[cols as u64, rows as u64], spec.ty, q8_0(&values)),
            _ => w.tensor_f32(name, &[cols as u64, rows as u64], &values),
        };
    };
    matrix(&mut w, "token_embd.weight", EMBD, VOCAB);
    let mut norms = Rng(11);
    let mut norm = |w: &mut GgufWriter, name: &str, len: usize| {
        let values: Vec<f32> = norms.vec(len, 0.2).iter().map(|v| 1.0 + v).collect();
        w.tensor_f32(name, &[len as u64], &values);
    };
    for l in 0..layers {
        let n = |s: &str| format!("blk.{l}.{s}");
        matrix(&mut w, &n("attn_q.weight"), EMBD, HEADS * head_dim);
        matrix(&mut w, &n("attn_k.weight"), EMBD, KV_HEADS * head_dim);
        matrix(&mut w, &n("attn_v.weight"), EMBD, KV_HEADS * head_dim);
        matrix(&mut w, &n("attn_output.weight"), HEADS * head_dim, EMBD);
        matrix(&mut w, &n("ffn_gate.weight"), EMBD, FF);
        matrix(&mut w, &n("ffn_up.weight"), EMBD, FF);
        matrix(&mut w, &n("ffn_down.weight"), FF, EMBD);
        norm(&mut w, &n("attn_norm.weight"), EMBD);
        norm(&mut w, &n("ffn_norm.weight"), EMBD);
        if gemma {
            norm(&mut w, &n("attn_q_norm.weight"), head_dim);
            norm(&mut w, &n("attn_k_norm.weight"), head_dim);
            norm(&mut w, &n("post_attention_norm.weight"), EMBD);
            norm(&mut w, &n("post_ffw_norm.weight"), EMBD);
        }
    }
    norm(&mut w, "output_norm.weight", EMBD);
    w.to_bytes()
}

fn load(spec: Spec, device: ComputeDevice) -> Model {
    let file = GgufFile::from_bytes(tiny_model_file(spec)).unwrap();
    Model::load(Arc::new(file), device).unwrap()
}

fn tiny(spec: Spec) -> Model {
    load(spec, ComputeDevice::Cpu)
}

/// Logits after `tokens`, fed one at a time.
fn run(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut seq = model.new_sequence(tokens.len());
    let mut logits = Vec::new();
    for &t in tokens {
        logits = model.forward(&mut seq, &[t]).unwrap();
    }
    logits
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn spread(a: &[f32]) -> f32 {
    a.iter().fold(0f32, |m, v| m.max(v.abs()))
}

#[test]
fn loads_and_runs_deterministically() {
    for spec in [LLAMA, GEMMA] {
        let model = tiny(spec);
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
}

#[test]
fn a_mistral_style_window_bounds_what_every_layer_sees() {
    // Two layers that each see 4 tokens reach 6 back: a change 10 tokens
    // back cannot matter at all, one 2 tokens back does.
    let model = tiny(Spec {
        window: Some(4),
        ..LLAMA
    });
    assert_eq!(model.config().sliding_window, Some(4));
    let base: Vec<u32> = (1..=12).collect();
    let (mut early, mut late) = (base.clone(), base.clone());
    early[1] = 50;
    late[9] = 50;
    let logits = run(&model, &base);
    assert_eq!(logits, run(&model, &early));
    assert_ne!(logits, run(&model, &late));
}

#[test]
fn sliding_window_layers_forget_old_tokens() {
    // Every layer but the last of six sees 4 tokens; the global one sees all,
    // so a change 10 tokens back still matters, but less than a recent one.
    let model = tiny(GEMMA);
    let base: Vec<u32> = (1..=12).collect();
    let mut early = base.clone();
    early[1] = 50;
    let mut late = base.clone();
    late[10] = 50;
    let logits = run(&model, &base);
    assert_ne!(logits, run(&model, &early));
    assert!(max_diff(&logits, &run(&model, &early)) < max_diff(&logits, &run(&model, &late)));
}

#[test]
fn a_batched_prompt_matches_token_by_token() {
    for spec in [
        LLAMA,
        GEMMA,
        Spec {
            ty: GgmlType::Q8_0,
            ..LLAMA
        },
    ] {
        let model = tiny(spec);
        let tokens: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
        let one_by_one = run(&model, &tokens);
        let mut seq = model.new_sequence(tokens.len());
        let batched = model.forward(&mut seq, &tokens).unwrap();
        assert_eq!(seq.len(), tokens.len());
        assert!(
            max_diff(&batched, &one_by_one) < 1e-4 * spread(&one_by_one).max(1.0),
            "{}: batched {:?}… vs one by one {:?}…",
            spec.arch,
            &batched[..4],
            &one_by_one[..4]
        );
        // A prompt split across two calls continues the same sequence.
        let mut seq = model.new_sequence(tokens.len());
        model.forward(&mut seq, &tokens[..13]).unwrap();
        let split = model.forward(&mut seq, &tokens[13..]).unwrap();
        assert!(max_diff(&split, &one_by_one) < 1e-4 * spread(&one_by_one).max(1.0));
    }
}

#[test]
fn hidden_states_cover_every_token() {
    let model = tiny(LLAMA);
    let mut seq = model.new_sequence(8);
    let states = model.hidden_states(&mut seq, &[4, 8, 15, 16, 23]).unwrap();
    assert_eq!(states.len(), 5 * EMBD);
    assert!(states.iter().all(|v| v.is_finite()));
}

#[test]
fn quantized_weights_track_f32_weights() {
    let tokens = [3, 14, 15, 92, 65];
    let exact = run(&tiny(LLAMA), &tokens);
    let quant = run(
        &tiny(Spec {
            ty: GgmlType::Q8_0,
            ..LLAMA
        }),
        &tokens,
    );
    let worst = max_diff(&exact, &quant);
    assert!(
        worst < 0.05 * spread(&exact),
        "Q8_0 logits drift {worst} against a range of {}",
        spread(&exact)
    );
}

#[test]
fn rewinding_recomputes_the_same_logits() {
    let model = tiny(Spec {
        ty: GgmlType::Q8_0,
        ..LLAMA
    });
    let mut seq = model.new_sequence(16);
    model.forward(&mut seq, &[1, 2, 3]).unwrap();
    let at_four = model.forward(&mut seq, &[4]).unwrap();
    model.forward(&mut seq, &[5]).unwrap();
    seq.truncate(3);
    assert_eq!(model.forward(&mut seq, &[4]).unwrap(), at_four);
}

#[test]
fn long_sequences_grow_their_cache() {
    let model = tiny(Spec {
        context: 600,
        ..LLAMA
    });
    let tokens: Vec<u32> = (0..600).map(|i| (i * 13 + 1) % VOCAB as u32).collect();
    let mut seq = model.new_sequence(600);
    // Past the first allocation (256) and the prefill chunk (256), in uneven steps.
    model.forward(&mut seq, &tokens[..300]).unwrap();
    let mut logits = Vec::new();
    for &t in &tokens[300..] {
        logits = model.forward(&mut seq, &[t]).unwrap();
    }
    let mut again = model.new_sequence(600);
    let batched = model.forward(&mut again, &tokens).unwrap();
    assert!(max_diff(&logits, &batched) < 1e-3 * spread(&batched).max(1.0));
}

#[test]
fn bad_tokens_and_full_contexts_are_errors() {
    let model = tiny(Spec {
        context: 4,
        ..LLAMA
    });
    let mut seq = model.new_sequence(100);
    assert!(matches!(
        model.forward(&mut seq, &[VOCAB as u32]),
        Err(ModelError::BadToken(_))
    ));
    assert!(matches!(
        model.forward(&mut seq, &[]),
        Err(ModelError::NoTokens)
    ));
    model.forward(&mut seq, &[0, 1, 2]).unwrap();
    assert!(matches!(
        model.forward(&mut seq, &[0, 1]),
        Err(ModelError::ContextFull(4))
    ));
    assert_eq!(seq.len(), 3, "a refused run leaves the sequence as it was");
    model.forward(&mut seq, &[3]).unwrap();
}

#[test]
fn a_gpu_without_the_feature_is_a_clear_error() {
    let file = GgufFile::from_bytes(tiny_model_file(LLAMA)).unwrap();
    let result = Model::load(Arc::new(file), ComputeDevice::Gpu);
    if cfg!(feature = "gpu") {
        return;
    }
    let err = result.unwrap_err().to_string();
    assert!(err.contains("--features gpu"), "{err}");
}

/// The wgpu backend (lavapipe in CI) against the CPU backend.
#[cfg(feature = "gpu")]
#[test]
fn the_gpu_agrees_with_the_cpu() {
    for spec in [
        LLAMA,
        GEMMA,
        Spec {
            ty: GgmlType::Q8_0,
            ..LLAMA
        },
    ] {
        let (cpu, gpu) = (tiny(spec), load(spec, ComputeDevice::Gpu));
        assert_eq!(gpu.device(), ComputeDevice::Gpu);
        let tokens: Vec<u32> = (0..10).map(|i| (i * 5 + 2) % VOCAB as u32).collect();
        let want = run(&cpu, &tokens);
        let mut seq = gpu.new_sequence(tokens.len() + 1);
        gpu.forward(&mut seq, &tokens[..9]).unwrap();
        let got = gpu.forward(&mut seq, &tokens[9..]).unwrap();
        // The CPU quantizes activations to 8 bits for Q8_0 weights; the GPU does not.
        let tolerance = if spec.ty == GgmlType::Q8_0 {
            0.05
        } else {
            1e-3
        };
        assert!(
            max_diff(&got, &want) < tolerance * spread(&want).max(1.0),
            "{}: gpu {:?}… vs cpu {:?}…",
            spec.arch,
            &got[..4],
            &want[..4]
        );
    }
}

/// The fused CPU pass against the same graph as Burn operations (on Burn's
/// CPU backend): prompt chunks, decode tokens past the sliding window, and a
/// batched step of sequences at different positions.
#[test]
fn the_fused_cpu_pass_agrees_with_the_burn_graph() {
    use realm_models::arch::BatchItem;
    for spec in [
        LLAMA,
        GEMMA,
        Spec {
            ty: GgmlType::Q8_0,
            ..LLAMA
        },
        Spec {
            ty: GgmlType::Q8_0,
            ..GEMMA
        },
    ] {
        let (fused, graph) = (tiny(spec), load(spec, ComputeDevice::BurnCpu));
        assert_eq!(graph.device(), ComputeDevice::BurnCpu);
        let tokens: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
        let check = |got: &[f32], want: &[f32], what: &str| {
            let diff = max_diff(got, want);
            // Both passes cache keys and values rounded to f16 by the same
            // operations, but a last-bit difference in a key can round it to
            // the neighbouring f16 (1/2048 apart): up to ~1e-4 measured.
            assert!(
                diff < 5e-4 * spread(want).max(1.0),
                "{} {:?} {what}: {diff}",
                spec.arch,
                spec.ty
            );
        };
        let (mut a, mut b) = (fused.new_sequence(40), graph.new_sequence(40));
        check(
            &fused.hidden_states(&mut a, &tokens[..12]).unwrap(),
            &graph.hidden_states(&mut b, &tokens[..12]).unwrap(),
            "prompt hidden states",
        );
        for (i, &t) in tokens[12..].iter().enumerate() {
            check(
                &fused.forward(&mut a, &[t]).unwrap(),
                &graph.forward(&mut b, &[t]).unwrap(),
                &format!("decode token {i}"),
            );
        }
        // Rewound, then a batch of that sequence and a fresh one.
        a.truncate(5);
        b.truncate(5);
        let (mut fresh_a, mut fresh_b) = (fused.new_sequence(40), graph.new_sequence(40));
        let step = |model: &realm_models::arch::Model, seq: &mut _, fresh: &mut _| {
            model
                .step(&mut [
                    BatchItem {
                        seq,
                        tokens: &tokens[5..9],
                        logits: true,
                    },
                    BatchItem {
                        seq: fresh,
                        tokens: &tokens[..3],
                        logits: true,
                    },
                ])
                .unwrap()
        };
        let (got, want) = (
            step(&fused, &mut a, &mut fresh_a),
            step(&graph, &mut b, &mut fresh_b),
        );
        for (i, (got, want)) in got.iter().zip(&want).enumerate() {
            check(
                got.as_ref().unwrap(),
                want.as_ref().unwrap(),
                &format!("batched item {i}"),
            );
        }
    }
}

/// A sequence only runs on a model of the shape and device that made it.
#[test]
fn another_models_sequence_is_an_error() {
    let (llama, gemma, graph) = (
        tiny(LLAMA),
        tiny(GEMMA),
        load(LLAMA, ComputeDevice::BurnCpu),
    );
    for (model, other) in [(&llama, &gemma), (&llama, &graph), (&graph, &llama)] {
        let mut seq = other.new_sequence(8);
        let err = model.forward(&mut seq, &[1, 2]).unwrap_err();
        assert!(matches!(err, ModelError::ForeignSequence), "{err}");
        assert!(seq.is_empty(), "nothing ran");
    }
    let mut own = llama.new_sequence(8);
    assert!(llama.forward(&mut own, &[1, 2]).is_ok());
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
    let err = Model::load(
        Arc::new(GgufFile::from_bytes(w.to_bytes()).unwrap()),
        ComputeDevice::Cpu,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "tensor `blk.0.attn_norm.weight` is missing"
    );
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("mamba".into()));
    let err = Model::load(
        Arc::new(GgufFile::from_bytes(w.to_bytes()).unwrap()),
        ComputeDevice::Cpu,
    )
    .unwrap_err();
    assert!(err.to_string().contains("mamba"), "{err}");
}

/// `Model::step` runs sequences at different positions as one batch: the
/// same logits as running each alone, for prompt chunks and decode tokens
/// mixed, on both architectures (gemma3 with its sliding window).
#[test]
fn a_batched_step_matches_separate_runs() {
    use realm_models::arch::BatchItem;
    for spec in [LLAMA, GEMMA] {
        let model = tiny(spec);
        let history: [&[u32]; 3] = [&[1, 2, 3, 4, 5, 6, 7], &[9], &[]];
        let next: [&[u32]; 3] = [&[8], &[10, 11, 12, 13, 14], &[20, 21, 22]];
        let mut alone = Vec::new();
        for (h, n) in history.iter().zip(&next) {
            let mut seq = model.new_sequence(32);
            if !h.is_empty() {
                model.forward(&mut seq, h).unwrap();
            }
            alone.push(model.forward(&mut seq, n).unwrap());
        }
        let mut seqs: Vec<_> = history
            .iter()
            .map(|h| {
                let mut seq = model.new_sequence(32);
                if !h.is_empty() {
                    model.forward(&mut seq, h).unwrap();
                }
                seq
            })
            .collect();
        let mut batch: Vec<BatchItem<'_>> = seqs
            .iter_mut()
            .zip(&next)
            .enumerate()
            .map(|(i, (seq, tokens))| BatchItem {
                seq,
                tokens,
                logits: i != 1,
            })
            .collect();
        let logits = model.step(&mut batch).unwrap();
        assert!(logits[1].is_none(), "logits only where asked");
        assert!(
            model.step(&mut []).unwrap().is_empty(),
            "an empty step runs nothing"
        );
        for i in [0, 2] {
            let diff = max_diff(logits[i].as_ref().unwrap(), &alone[i]);
            assert!(diff < 1e-4, "{} item {i}: {diff}", spec.arch);
        }
        assert_eq!(seqs[1].len(), 6);
        // A bad item fails the whole step before anything runs.
        let mut seq = model.new_sequence(4);
        let before = seqs[0].len();
        let err = model
            .step(&mut [
                BatchItem {
                    seq: &mut seqs[0],
                    tokens: &[1],
                    logits: true,
                },
                BatchItem {
                    seq: &mut seq,
                    tokens: &[1, 2, 3, 4, 5],
                    logits: true,
                },
            ])
            .unwrap_err();
        assert!(matches!(err, ModelError::ContextFull(4)), "{err}");
        assert_eq!(seqs[0].len(), before);
    }
}

/// Logits handed back for reuse are overwritten whole: a step writing into
/// recycled rows gives what it gives on fresh memory, and rows of another
/// length are dropped.
#[test]
fn recycled_logits_are_overwritten() {
    use realm_models::arch::BatchItem;
    for spec in [LLAMA, GEMMA] {
        let model = tiny(spec);
        let prompts: [&[u32]; 3] = [&[3, 1, 4], &[1, 5], &[9, 2, 6, 5]];
        let step = || {
            let mut seqs: Vec<_> = prompts.iter().map(|_| model.new_sequence(8)).collect();
            let mut batch: Vec<BatchItem<'_>> = seqs
                .iter_mut()
                .zip(prompts)
                .map(|(seq, tokens)| BatchItem {
                    seq,
                    tokens,
                    logits: true,
                })
                .collect();
            let rows: Vec<Vec<f32>> = model
                .step(&mut batch)
                .unwrap()
                .into_iter()
                .flatten()
                .collect();
            rows
        };
        let fresh = step();
        assert_eq!(fresh.len(), 3);
        let vocab = fresh[0].len();
        model.recycle_logits([vec![f32::NAN; 2], vec![f32::NAN; vocab]]);
        model.recycle_logits((0..3).map(|_| vec![f32::NAN; vocab]));
        // Three rows kept (the step's), every one written over.
        assert_eq!(step(), fresh, "{}", spec.arch);
        model.recycle_logits(vec![vec![f32::NAN; vocab]; 3]);
        let mut seq = model.new_sequence(8);
        let single = model.forward(&mut seq, prompts[0]).unwrap();
        assert_eq!(single, fresh[0], "{}", spec.arch);
    }
}

/// A sequence continued from a copied prefix gives the logits of one that
/// ran the whole prompt (the prefix cache's promise).
#[test]
fn a_copied_prefix_continues_like_the_original() {
    for spec in [LLAMA, GEMMA] {
        let model = tiny(spec);
        let prompt: Vec<u32> = (1..=20).collect();
        let mut whole = model.new_sequence(32);
        let want = model.forward(&mut whole, &prompt).unwrap();
        let mut prefix = model.new_sequence(32);
        model.forward(&mut prefix, &prompt[..12]).unwrap();
        model.forward(&mut prefix, &[90, 91, 92]).unwrap(); // diverges after 12
        let mut copy = model.continue_prefix(&prefix, 12, 32);
        assert_eq!(copy.len(), 12);
        let got = model.forward(&mut copy, &prompt[12..]).unwrap();
        assert!(max_diff(&got, &want) < 1e-4, "{}", spec.arch);
        // The original is untouched by the copy's writes.
        let mut again = model.continue_prefix(&prefix, 15, 32);
        let a = model.forward(&mut again, &[5]).unwrap();
        let b = model.forward(&mut prefix, &[5]).unwrap();
        assert!(max_diff(&a, &b) < 1e-5, "{}", spec.arch);
    }
}

/// Sequences continued from a frozen prefix (the prefix cache's entries)
/// share its cached keys and values, and decode together, past the sliding
/// window, exactly as sequences holding their own copies do.
#[test]
fn sequences_sharing_a_frozen_prefix_decode_like_copies() {
    use realm_models::arch::BatchItem;
    for spec in [LLAMA, GEMMA] {
        let model = tiny(spec);
        let prompt: Vec<u32> = (1..=10).collect();
        let mut original = model.new_sequence(32);
        model.forward(&mut original, &prompt).unwrap();
        let frozen = original.copy_prefix(10, 10);
        let mut shared = [8, 10].map(|len| model.continue_prefix(&frozen, len, 32));
        let mut copies = [8, 10].map(|len| {
            let mut seq = model.new_sequence(32);
            model.forward(&mut seq, &prompt[..len]).unwrap();
            seq
        });
        let mut tokens = [vec![40, 41, 42], vec![43]];
        for _ in 0..6 {
            let step = |seqs: &mut [realm_models::arch::Sequence; 2]| {
                let [a, b] = seqs;
                let mut batch = [
                    BatchItem {
                        seq: a,
                        tokens: &tokens[0],
                        logits: true,
                    },
                    BatchItem {
                        seq: b,
                        tokens: &tokens[1],
                        logits: true,
                    },
                ];
                model.step(&mut batch).unwrap()
            };
            let (got, want) = (step(&mut shared), step(&mut copies));
            assert_eq!(got, want, "{}", spec.arch);
            tokens = [vec![got[0].as_ref().unwrap()[0] as u32 % 90 + 1], vec![7]];
        }
        assert_eq!(shared.each_ref().map(|s| s.len()), [8 + 3 + 5, 10 + 1 + 5]);
    }
}
