//! Constrained decoding on the real SmolLM2: JSON Schema, regex and Lark
//! constraints hold; a constraint the model would follow anyway changes
//! nothing; constrained generations share the batch with free ones without
//! changing them.

mod common;

use std::time::Duration;

use realm_models::chat::ChatMessage;
use realm_models::engine::{ConstraintSpec, FinishReason, LoadedModel, Pending, Prompter, Request};
use serde_json::{Value, json};

use common::batch::{self, Done, greedy, wait};

/// Submits a greedy generation of `prompt`, constrained by `spec` if given.
fn submit(
    model: &LoadedModel,
    prompt: Vec<u32>,
    max_tokens: usize,
    spec: Option<&ConstraintSpec>,
) -> (Pending, Done) {
    let mut request = Request::new(prompt, greedy(max_tokens), "t", 1);
    request.constraint = spec.map(|s| model.constrain(s).unwrap());
    batch::submit(model, request)
}

fn chat(model: &LoadedModel, text: &str) -> Vec<u32> {
    model
        .chat_tokens(&[ChatMessage::new("user", text)], &[])
        .unwrap()
}

fn open() -> Option<LoadedModel> {
    let path = common::model("smollm2-135m-instruct")?;
    Some(LoadedModel::open(&path, common::device()).unwrap())
}

/// A person: nested object, bounded integer, enum array, bounded string.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["friend", "colleague", "family"]}, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30}},
                "required": ["city"],
                "additionalProperties": false
            }
        },
        "required": ["name", "age", "tags", "address"],
        "additionalProperties": false
    })
}

#[test]
fn json_schema_output_parses_and_validates() {
    let Some(model) = open() else { return };
    let spec = ConstraintSpec::JsonSchema(person_schema());
    for prompt in [
        "Describe my friend Anna from Lyon as JSON.",
        "Who is the president of France?",
        "Write a poem about the sea.",
    ] {
        let (_pending, done) = submit(&model, chat(&model, prompt), 160, Some(&spec));
        let done = wait(&done);
        assert_eq!(done.finish, FinishReason::Stop, "{prompt}: {:?}", done.text);
        let value: Value = serde_json::from_str(&done.text)
            .unwrap_or_else(|e| panic!("{prompt}: {e}: {:?}", done.text));
        let object = value.as_object().unwrap();
        assert_eq!(object.len(), 4, "{value}");
        assert!(value["name"].as_str().unwrap().chars().count() <= 20);
        assert!(
            (0..=120).contains(&value["age"].as_i64().unwrap()),
            "{value}"
        );
        let tags = value["tags"].as_array().unwrap();
        assert!(tags.len() <= 3);
        assert!(
            tags.iter()
                .all(|t| ["friend", "colleague", "family"].contains(&t.as_str().unwrap()))
        );
        assert!(value["address"]["city"].is_string(), "{value}");
    }
}

#[test]
fn regex_and_grammar_constraints_hold() {
    let Some(model) = open() else { return };
    let prompt = chat(&model, "Is Paris in France? Answer yes or no.");
    let lark = ConstraintSpec::Lark("start: \"yes\" | \"no\"".into());
    let (_p, done) = submit(&model, prompt.clone(), 16, Some(&lark));
    let answer = wait(&done);
    assert!(["yes", "no"].contains(&answer.text.as_str()), "{answer:?}");
    assert_eq!(answer.finish, FinishReason::Stop);

    let date = ConstraintSpec::Regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}".into());
    let prompt = chat(&model, "When did the Berlin wall fall? Give the date.");
    let (_p, done) = submit(&model, prompt, 16, Some(&date));
    let text = wait(&done).text;
    assert_eq!(text.len(), 10, "{text:?}");
    assert!(text.chars().enumerate().all(|(i, c)| if i == 4 || i == 7 {
        c == '-'
    } else {
        c.is_ascii_digit()
    }));
}

/// Greedy output under a constraint that allows exactly what the model
/// says unconstrained is that same output: the mask only removes tokens.
#[test]
fn a_constraint_the_model_follows_anyway_changes_nothing() {
    let Some(model) = open() else { return };
    let prompt = chat(&model, "Name three colours.");
    let (_p, done) = submit(&model, prompt.clone(), 24, None);
    let free = wait(&done);
    let exact = ConstraintSpec::Regex(regex_syntax::escape(&free.text));
    let (_p, done) = submit(&model, prompt, 24, Some(&exact));
    let constrained = wait(&done);
    assert_eq!(constrained.text, free.text);
    assert_eq!(constrained.completion_tokens, free.completion_tokens);
}

/// A free generation batched with constrained ones gives what it gives alone.
#[test]
fn constrained_and_free_generations_share_the_batch() {
    let Some(model) = open() else { return };
    let prompt = chat(&model, "Tell me about the moon.");
    let (_p, done) = submit(&model, prompt.clone(), 32, None);
    let alone = wait(&done);
    let spec = ConstraintSpec::JsonSchema(person_schema());
    let constrained: Vec<_> = (0..3)
        .map(|_| submit(&model, chat(&model, "A person as JSON."), 160, Some(&spec)))
        .collect();
    let (_p, done) = submit(&model, prompt, 32, None);
    assert_eq!(wait(&done).text, alone.text);
    for (_p, done) in &constrained {
        let text = wait(done).text;
        serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    }
}

/// A grammar that grows too complex mid-generation ends with an error
/// after bounded work (llguidance's fuel), and the free generation batched
/// beside it is unchanged.
#[test]
fn a_hostile_grammar_fails_alone_without_stalling_the_batch() {
    let Some(model) = open() else { return };
    let prompt = chat(&model, "Tell me about the moon.");
    let (_p, done) = submit(&model, prompt.clone(), 32, None);
    let alone = wait(&done);
    let hostile = ConstraintSpec::Regex("(a{1,200}){1,200}".into());
    let (_h, hostile_done) = submit(&model, chat(&model, "Say a lot."), 200, Some(&hostile));
    let (_p, done) = submit(&model, prompt, 32, None);
    assert_eq!(wait(&done).text, alone.text);
    let failed = hostile_done
        .recv_timeout(Duration::from_secs(300))
        .expect("the hostile generation ends");
    let error = failed.expect_err("the grammar grows too complex");
    assert!(
        error.contains("constrained decoding stopped after"),
        "{error}"
    );
    assert!(!error.contains("non-verbose"), "{error}");
}
