//! Generation on the real models: raw completion, streaming, stop strings, chat.

mod common;

use realm_models::arch::ComputeDevice;
use realm_models::chat::ChatMessage;
use realm_models::engine::{
    Engine, FinishReason, GenerateParams, LoadedModel, Prompter, SamplingParams,
};

fn greedy(max_tokens: usize, stop: &[&str]) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        stop: stop.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn completes_streams_and_stops() {
    let Some(path) = common::model("smollm2-135m-instruct") else {
        return;
    };
    let model = LoadedModel::open(&path, common::device()).unwrap();
    let prompt = model.prompt_tokens("The capital of France is");
    let mut pieces = Vec::new();
    let done = model
        .generate(&prompt, &greedy(12, &[]), &mut |p| {
            pieces.push(p.to_string());
            true
        })
        .unwrap();
    assert!(done.text.starts_with(" Paris."), "{:?}", done.text);
    assert_eq!(pieces.concat(), done.text);
    assert_eq!(
        (done.prompt_tokens, done.completion_tokens, done.finish),
        (5, 12, FinishReason::Length)
    );

    let stopped = model
        .generate(&prompt, &greedy(32, &["\n"]), &mut |_| true)
        .unwrap();
    assert_eq!(stopped.text, " Paris.");
    assert_eq!(stopped.finish, FinishReason::Stop);

    let mut n = 0;
    let cancelled = model
        .generate(&prompt, &greedy(32, &[]), &mut |_| {
            n += 1;
            n < 3
        })
        .unwrap();
    assert_eq!(cancelled.finish, FinishReason::Cancelled);
    // The batcher runs ahead of a reader by at most its stream buffer (16).
    assert!(
        (3..=3 + 16).contains(&cancelled.completion_tokens),
        "{cancelled:?}"
    );
}

#[test]
fn chats_with_the_template() {
    let Some(path) = common::model("smollm2-135m-instruct") else {
        return;
    };
    let model = LoadedModel::open(&path, common::device()).unwrap();
    let messages = [ChatMessage::new(
        "user",
        "What is the capital of France? Answer in one sentence.",
    )];
    let ids = model.chat_tokens(&messages, &[]).unwrap();
    let text = model.tokenizer().decode(&ids);
    assert!(
        text.ends_with("Answer in one sentence.\nassistant\n"),
        "{text:?}"
    );
    let done = model
        .generate(&ids, &greedy(24, &[]), &mut |_| true)
        .unwrap();
    assert!(done.text.contains("Paris"), "{:?}", done.text);
    assert_eq!(
        done.finish,
        FinishReason::Stop,
        "the reply ends with <|im_end|>: {:?}",
        done.text
    );
}

#[test]
fn sampled_generation_is_reproducible_by_seed() {
    let Some(path) = common::model("gemma3-270m") else {
        return;
    };
    let model = LoadedModel::open(&path, common::device()).unwrap();
    let prompt = model.prompt_tokens("Once upon a time");
    let params = |seed| GenerateParams {
        max_tokens: 12,
        sampling: SamplingParams {
            temperature: 0.9,
            seed,
            ..Default::default()
        },
        stop: Vec::new(),
    };
    let a = model.generate(&prompt, &params(1), &mut |_| true).unwrap();
    let b = model.generate(&prompt, &params(1), &mut |_| true).unwrap();
    assert_eq!(a.text, b.text);
    assert!(!a.text.is_empty());
}

#[test]
fn embeddings_are_normalized_and_meaningful() {
    let Some(path) = common::model("smollm2-135m-instruct") else {
        return;
    };
    let model = LoadedModel::open(&path, common::device()).unwrap();
    let cat = model.embed("The cat sat on the mat.").unwrap();
    let kitten = model.embed("A kitten was sitting on the rug.").unwrap();
    let tax = model
        .embed("Quarterly tax filings are due in April.")
        .unwrap();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!((dot(&cat, &cat) - 1.0).abs() < 1e-4);
    assert!(
        dot(&cat, &kitten) > dot(&cat, &tax),
        "similar sentences should be closer"
    );
}

#[test]
fn rewinding_a_sequence_reproduces_logits() {
    let Some(path) = common::model("smollm2-135m-instruct") else {
        return;
    };
    let model = LoadedModel::open(&path, common::device()).unwrap();
    let m = model.model();
    let ids = model.prompt_tokens("The capital of France is");
    let mut seq = m.new_sequence(16);
    let first = m.forward(&mut seq, &ids).unwrap();
    m.forward(&mut seq, &[42]).unwrap();
    seq.truncate(ids.len() - 1);
    let again = m.forward(&mut seq, &ids[ids.len() - 1..]).unwrap();
    if common::device() == ComputeDevice::Gpu {
        // On a GPU the last token ran with the prompt first (Burn's
        // attention) and alone the second time (the decode kernel), which
        // sum in different orders: equal up to float rounding.
        let worst = first
            .iter()
            .zip(&again)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "{worst}");
    } else {
        assert_eq!(first, again);
    }
}

mod batching {
    //! The batcher on the real model: concurrent generations share steps and
    //! give what they give alone; slow readers, cancellation, the prefix
    //! cache and tenant weights.

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use realm_models::engine::{
        BatcherConfig, Completion, Engine, FinishReason, LoadedModel, Offer, OnEnd, Pending,
        Prompter, Request, TextSink,
    };

    use super::{common, greedy};

    fn open(config: BatcherConfig) -> Option<LoadedModel> {
        let path = common::model("smollm2-135m-instruct")?;
        Some(LoadedModel::open_with(&path, common::device(), config).unwrap())
    }

    /// Takes every piece.
    struct Collect(Arc<Mutex<String>>);

    impl TextSink for Collect {
        fn offer(&mut self, piece: String) -> Offer {
            self.0.lock().unwrap().push_str(&piece);
            Offer::Taken
        }
    }

    /// Never has room: a reader that stopped reading.
    struct Stuck;

    impl TextSink for Stuck {
        fn offer(&mut self, piece: String) -> Offer {
            Offer::Full(piece)
        }
    }

    type Done = mpsc::Receiver<Result<Completion, String>>;

    /// A greedy generation whose end is reported to the returned `Done`.
    fn request(
        model: &LoadedModel,
        prompt: &str,
        max_tokens: usize,
        tenant: &str,
        weight: u32,
        sink: Option<Box<dyn TextSink>>,
    ) -> (Request, OnEnd, Done) {
        let (tx, rx) = mpsc::channel();
        let mut request = Request::new(
            model.prompt_tokens(prompt),
            greedy(max_tokens, &[]),
            tenant,
            weight,
        );
        request.sink = sink;
        let on_end: OnEnd = Box::new(move |r| {
            let _ = tx.send(match r {
                Ok(c) => Ok(c.clone()),
                Err(e) => Err(e.to_string()),
            });
        });
        (request, on_end, rx)
    }

    /// Submits [`request`]'s generation; the returned `Pending` must be
    /// kept (dropping it cancels the generation).
    fn submit(
        model: &LoadedModel,
        prompt: &str,
        max_tokens: usize,
        tenant: &str,
        weight: u32,
        sink: Option<Box<dyn TextSink>>,
    ) -> (Pending, Arc<AtomicBool>, Done) {
        let (request, on_end, done) = request(model, prompt, max_tokens, tenant, weight, sink);
        let cancel = request.cancel.clone();
        (model.submit(request, Some(on_end)), cancel, done)
    }

    fn wait(done: &Done) -> Completion {
        done.recv_timeout(Duration::from_secs(120))
            .expect("the job ends")
            .expect("the job succeeds")
    }

    const PROMPTS: [&str; 6] = [
        "The capital of France is",
        "One, two, three, four,",
        "Monday, Tuesday, Wednesday,",
        "A, B, C, D, E,",
        "January, February, March,",
        "The opposite of hot is",
    ];

    #[test]
    fn concurrent_generations_match_their_solo_runs() {
        let config = BatcherConfig {
            max_sequences: 4,
            ..Default::default()
        };
        let Some(model) = open(config) else { return };
        let solo: Vec<String> = PROMPTS
            .iter()
            .map(|p| {
                let ids = model.prompt_tokens(p);
                model
                    .generate(&ids, &greedy(10, &[]), &mut |_| true)
                    .unwrap()
                    .text
            })
            .collect();
        let steps_before = model.batcher().load().steps();
        let together: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = PROMPTS
                .iter()
                .map(|p| {
                    let model = &model;
                    s.spawn(move || {
                        let ids = model.prompt_tokens(p);
                        let mut streamed = String::new();
                        let done = model
                            .generate(&ids, &greedy(10, &[]), &mut |piece| {
                                streamed.push_str(piece);
                                true
                            })
                            .unwrap();
                        assert_eq!(streamed, done.text);
                        done.text
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(together, solo);
        // Six generations of ten tokens (plus prefills) alone take ~66 steps;
        // batched (four slots) far fewer.
        let steps = model.batcher().load().steps() - steps_before;
        assert!(steps < 45, "{steps} steps: not batched");
    }

    #[test]
    fn a_stalled_reader_pauses_only_its_own_generation() {
        let Some(model) = open(BatcherConfig::default()) else {
            return;
        };
        let (_stalled, cancel, stalled_done) =
            submit(&model, PROMPTS[0], 50, "a", 1, Some(Box::new(Stuck)));
        let text = Arc::new(Mutex::new(String::new()));
        let (_other, _, other_done) = submit(
            &model,
            PROMPTS[1],
            12,
            "b",
            1,
            Some(Box::new(Collect(text.clone()))),
        );
        let other = wait(&other_done);
        assert_eq!(other.completion_tokens, 12);
        assert_eq!(*text.lock().unwrap(), other.text);
        assert!(
            stalled_done.try_recv().is_err(),
            "the stalled one is still waiting for its reader"
        );
        cancel.store(true, Ordering::Relaxed);
        let stalled = wait(&stalled_done);
        assert_eq!(stalled.finish, FinishReason::Cancelled);
        assert!(stalled.completion_tokens <= 2, "{stalled:?}");
    }

    #[test]
    fn cancelling_frees_the_slot_at_once() {
        let config = BatcherConfig {
            max_sequences: 1,
            ..Default::default()
        };
        let Some(model) = open(config) else { return };
        let (_long, cancel, long_done) = submit(&model, PROMPTS[2], 400, "a", 1, None);
        let (_short, _, short_done) = submit(&model, PROMPTS[3], 4, "a", 1, None);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            short_done.try_recv().is_err(),
            "one slot: the short job waits"
        );
        cancel.store(true, Ordering::Relaxed);
        let long = wait(&long_done);
        assert_eq!(long.finish, FinishReason::Cancelled);
        assert!(long.completion_tokens < 400);
        assert_eq!(wait(&short_done).completion_tokens, 4);
    }

    /// The model twice: with the default prefix cache, and with none.
    fn cached_and_fresh() -> Option<(LoadedModel, LoadedModel)> {
        let cached = open(BatcherConfig::default())?;
        let fresh = open(BatcherConfig {
            prefix_cache_bytes: 0,
            ..Default::default()
        })?;
        Some((cached, fresh))
    }

    #[test]
    fn shared_prompt_prefixes_are_computed_once() {
        let Some((model, fresh)) = cached_and_fresh() else {
            return;
        };
        let system = "You are a terse assistant who answers every question in one short \
                      sentence and never adds anything else. Question: ";
        let first = format!("{system}What is the capital of France?");
        let second = format!("{system}What is the capital of Italy?");
        let run = |m: &LoadedModel, p: &str| {
            let ids = m.prompt_tokens(p);
            m.generate(&ids, &greedy(8, &[]), &mut |_| true)
                .unwrap()
                .text
        };
        run(&model, &first);
        assert_eq!(model.batcher().load().prefix_hits(), 0);
        let reused = run(&model, &second);
        assert_eq!(model.batcher().load().prefix_hits(), 1);
        assert_eq!(reused, run(&fresh, &second));
        assert_eq!(fresh.batcher().load().prefix_hits(), 0);
    }

    /// A conversation growing turn by turn: each prompt continues the
    /// previous one's cached keys and values, which are themselves shared
    /// with the one before (a chain), and deeper than attention's segments
    /// they are copied. Every answer is the one computed from scratch.
    #[test]
    fn chained_prompt_caches_give_the_answers_of_fresh_ones() {
        let Some((model, fresh)) = cached_and_fresh() else {
            return;
        };
        let run = |m: &LoadedModel, p: &str| {
            let ids = m.prompt_tokens(p);
            m.generate(&ids, &greedy(6, &[]), &mut |_| true).unwrap()
        };
        let mut prompt = "A list of European capitals, one per line, with its country:".to_string();
        for (turn, country) in ["France", "Italy", "Spain", "Austria", "Greece", "Norway"]
            .into_iter()
            .enumerate()
        {
            prompt.push_str(&format!("\nThe capital of {country} is"));
            let cached = run(&model, &prompt);
            assert_eq!(cached.text, run(&fresh, &prompt).text, "turn {turn}");
            assert_eq!(model.batcher().load().prefix_hits(), turn, "turn {turn}");
        }
    }

    #[test]
    fn waiting_tenants_are_admitted_by_weight() {
        let config = BatcherConfig {
            max_sequences: 1,
            ..Default::default()
        };
        let Some(model) = open(config) else { return };
        // A generation holds the only slot while the others queue up.
        let (_blocker, cancel, blocker_done) =
            submit(&model, PROMPTS[0], 50, "x", 1, Some(Box::new(Stuck)));
        // Queued behind it only once it holds the slot: a job arriving
        // first would race it for the slot.
        let start = std::time::Instant::now();
        while model.batcher().load().running() == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the blocker starts"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waits = Vec::new();
        for (tenant, weight) in [("a", 1), ("b", 2)] {
            for _ in 0..3 {
                let (request, inner, done) = request(&model, PROMPTS[1], 1, tenant, weight, None);
                let order = order.clone();
                let on_end: OnEnd = Box::new(move |r| {
                    order.lock().unwrap().push(tenant);
                    inner(r)
                });
                waits.push((model.submit(request, Some(on_end)), done));
            }
        }
        // All six queued before the slot frees, however slow the machine.
        let start = std::time::Instant::now();
        while model.batcher().load().waiting() < 6 {
            assert!(start.elapsed() < Duration::from_secs(60), "all queue up");
            std::thread::sleep(Duration::from_millis(1));
        }
        cancel.store(true, Ordering::Relaxed);
        wait(&blocker_done);
        for (_pending, done) in &waits {
            wait(done);
        }
        // Stride scheduling: b (weight 2) gets two turns for each of a's.
        assert_eq!(*order.lock().unwrap(), ["a", "b", "b", "a", "b", "a"]);
    }

    #[test]
    fn a_long_prompt_does_not_hold_back_another_tenants_short_one() {
        let config = BatcherConfig {
            step_tokens: 64,
            ..Default::default()
        };
        let Some(model) = open(config) else { return };
        // About 800 prompt tokens: a dozen steps of 64 to prefill.
        let long = "The quick brown fox jumps over the lazy dog. ".repeat(80);
        let (_hog, _, hog_done) = submit(&model, &long, 1, "hog", 1, None);
        let start = std::time::Instant::now();
        while model.batcher().load().steps() == 0 {
            assert!(start.elapsed() < Duration::from_secs(60), "the hog starts");
            std::thread::sleep(Duration::from_millis(1));
        }
        let before = model.batcher().load().steps();
        let (_short, _, short_done) = submit(&model, PROMPTS[0], 1, "other", 1, None);
        wait(&short_done);
        let taken = model.batcher().load().steps() - before;
        let hog = hog_done.try_recv();
        // Prompt chunks are shared between tenants each step: the short
        // prompt runs within a step or two of arriving, not after the hog's.
        assert!(taken <= 4, "{taken} steps");
        assert!(hog.is_err(), "the long prompt is still being prefilled");
        wait(&hog_done);
    }

    #[test]
    fn a_public_prefix_too_short_to_cache_is_refused() {
        let Some(path) = common::model("smollm2-135m-instruct") else {
            return;
        };
        let config = BatcherConfig {
            public_prefixes: vec!["Hello".into()],
            ..Default::default()
        };
        let err = LoadedModel::open_with(&path, common::device(), config).unwrap_err();
        assert!(err.to_string().contains("public prefix \"Hello\""), "{err}");
    }

    #[test]
    fn bad_prompts_fail_alone() {
        let Some(model) = open(BatcherConfig::default()) else {
            return;
        };
        let (mut empty, on_end, empty_done) = request(&model, "x", 4, "a", 1, None);
        empty.prompt.clear();
        let _empty = model.submit(empty, Some(on_end));
        let (mut outside, on_end, outside_done) = request(&model, "x", 4, "a", 1, None);
        outside.prompt.push(u32::MAX);
        let _outside = model.submit(outside, Some(on_end));
        let (_good, _, good_done) = submit(&model, PROMPTS[0], 4, "a", 1, None);
        let empty = empty_done.recv().unwrap().unwrap_err();
        assert!(empty.to_string().contains("empty"), "{empty}");
        let outside = outside_done.recv().unwrap().unwrap_err();
        assert!(outside.to_string().contains("vocabulary"), "{outside}");
        assert_eq!(wait(&good_done).completion_tokens, 4);
    }
}
