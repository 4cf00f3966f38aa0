//! LoRA adapters on the real SmolLM2 in the batcher: sequences with
//! different adapters (and none) share one continuous batch, each getting
//! exactly what it gets alone, and the prefix cache never hands one
//! adapter's keys and values to another. (Agreement with llama.cpp is
//! checked on tiny models in `arch_vs_llama_cpp.rs`.)

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use realm_models::arch::{ComputeDevice, LoraAdapter};
use realm_models::chat::ChatMessage;
use realm_models::engine::{
    BatcherConfig, Completion, Engine, GenerateParams, LoadedModel, OnEnd, Pending, Prompter,
    Request, SamplingParams,
};
use realm_models::gguf::{GgufWriter, MetaValue};

use common::weights::Rng;

/// A random rank-`rank` adapter for SmolLM2 (576 wide, 9 query and 3 key
/// heads of 64, 1536 in the FFN, 30 layers) on every weight of every layer.
fn write_adapter(path: &Path, seed: u64, rank: usize) {
    let (embd, q, kv, ff) = (576usize, 9 * 64usize, 3 * 64usize, 1536usize);
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("general.type", MetaValue::String("adapter".into()))
        .meta("adapter.type", MetaValue::String("lora".into()))
        .meta("adapter.lora.alpha", MetaValue::F32(2.0 * rank as f32));
    let mut rng = Rng(seed);
    for l in 0..30 {
        for (target, cols, rows) in [
            ("attn_q", embd, q),
            ("attn_k", embd, kv),
            ("attn_v", embd, kv),
            ("attn_output", q, embd),
            ("ffn_gate", embd, ff),
            ("ffn_up", embd, ff),
            ("ffn_down", ff, embd),
        ] {
            let name = format!("blk.{l}.{target}.weight");
            let a = rng.vec(cols * rank, 1.0 / (cols as f32).sqrt());
            let b = rng.vec(rank * rows, 0.3 / (rank as f32).sqrt());
            w.tensor_f32(&format!("{name}.lora_a"), &[cols as u64, rank as u64], &a)
                .tensor_f32(&format!("{name}.lora_b"), &[rank as u64, rows as u64], &b);
        }
    }
    std::fs::write(path, w.to_bytes()).unwrap();
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        stop: Vec::new(),
    }
}

type Done = mpsc::Receiver<Result<Completion, String>>;

/// One adapter as loaded for each of two models (none: the base model).
type Loaded = (Option<Arc<LoraAdapter>>, Option<Arc<LoraAdapter>>);

fn submit(
    model: &LoadedModel,
    tenant: &str,
    prompt: Vec<u32>,
    adapter: Option<Arc<LoraAdapter>>,
) -> (Pending, Done) {
    let mut request = Request::new(prompt, greedy(24), tenant, 1);
    request.adapter = adapter;
    let (tx, rx) = mpsc::channel();
    let on_end: OnEnd = Box::new(move |r| {
        let _ = tx.send(match r {
            Ok(c) => Ok(c.clone()),
            Err(e) => Err(e.to_string()),
        });
    });
    (model.submit(request, Some(on_end)), rx)
}

fn wait(done: &Done) -> Completion {
    done.recv_timeout(Duration::from_secs(600))
        .expect("the generation ends")
        .expect("the generation succeeds")
}

#[test]
fn adapters_share_the_batch_and_never_the_prefix_cache() {
    let Some(path) = common::model("smollm2-135m-instruct") else {
        return;
    };
    if common::device() != ComputeDevice::Cpu {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The reference: each request alone, without a prefix cache.
    let alone = LoadedModel::open_with(
        &path,
        ComputeDevice::Cpu,
        BatcherConfig {
            prefix_cache_bytes: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let batched = LoadedModel::open(&path, ComputeDevice::Cpu).unwrap();
    let mut adapters: Vec<Loaded> = vec![(None, None)];
    for k in 0..4u64 {
        let file = dir.path().join(format!("a{k}.gguf"));
        write_adapter(&file, 0xada + k, 8);
        adapters.push((
            Some(alone.load_adapter(&file, 1.0).unwrap()),
            Some(batched.load_adapter(&file, 1.0).unwrap()),
        ));
    }
    // One long shared system prompt (the prefix cache would share it), a
    // question each.
    let system = "You are a helpful assistant for a public library. Answer questions about opening hours, loans, fines and events briefly and politely.";
    let questions = [
        "When do you open?",
        "Can I renew a book?",
        "Is there a fine?",
        "Any events?",
    ];
    let prompt = |q: &str| {
        alone
            .chat_tokens(
                &[
                    ChatMessage::new("system", system),
                    ChatMessage::new("user", q),
                ],
                &[],
            )
            .unwrap()
    };
    // 16 sequences over 4 adapters and none (the base), run alone first.
    let cases: Vec<(usize, &str)> = (0..16).map(|i| (i % 5, questions[i % 4])).collect();
    let want: Vec<String> = cases
        .iter()
        .map(|&(a, q)| {
            let (_p, done) = submit(&alone, "t", prompt(q), adapters[a].0.clone());
            wait(&done).text
        })
        .collect();
    // The adapters change what is said: each question gets more than one
    // answer over the adapters and none.
    for q in 0..4 {
        let mut answers: Vec<&String> = (q..16).step_by(4).map(|i| &want[i]).collect();
        answers.sort();
        answers.dedup();
        assert!(answers.len() > 1, "question {q}: one answer: {answers:?}");
    }
    // Together in one batch (a warm-up first fills the prefix cache with the
    // base model's and each adapter's system prompt).
    let warm: Vec<_> = (0..5)
        .map(|a| submit(&batched, "t", prompt("Hello."), adapters[a].1.clone()))
        .collect();
    for (_p, done) in &warm {
        wait(done);
    }
    let running: Vec<_> = cases
        .iter()
        .map(|&(a, q)| submit(&batched, "t", prompt(q), adapters[a].1.clone()))
        .collect();
    for (k, ((_p, done), want)) in running.iter().zip(&want).enumerate() {
        let got = wait(done);
        assert_eq!(&got.text, want, "sequence {k} (adapter {})", cases[k].0);
        assert!(
            got.cached_tokens > 0,
            "sequence {k} reused its adapter's prompt"
        );
    }
    assert!(batched.batcher().load().prefix_hits() >= 16);
}
