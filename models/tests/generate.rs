//! Generation on the real models: raw completion, streaming, stop strings, chat.

mod common;

use realm_models::chat::ChatMessage;
use realm_models::engine::{FinishReason, GenerateParams, LoadedModel, SamplingParams};

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
    assert_eq!(cancelled.completion_tokens, 3);
}

#[test]
fn chats_with_the_template() {
    let Some(path) = common::model("smollm2-135m-instruct") else {
        return;
    };
    let model = LoadedModel::open(&path, common::device()).unwrap();
    let messages = [ChatMessage {
        role: "user".into(),
        content: "What is the capital of France? Answer in one sentence.".into(),
    }];
    let ids = model.chat_tokens(&messages).unwrap();
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
    assert_eq!(first, again);
}
