//! Real chat templates (llama.cpp's collection, `REALM_LLAMA_CPP_DATA`)
//! rendered by Realm, byte for byte against Hugging Face's rendering
//! (`data/chat_templates.json`, made by `scripts/chat_template_reference.py`
//! with Python's Jinja2; `just chat-template-reference` remakes it).

mod common;

use realm_models::chat::{ChatMessage, ChatTemplate, DateTime, RenderOptions};
use serde_json::Value;

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

/// The conversations of the reference script, by name: messages, whether
/// the assistant's turn is opened, and Qwen 3's thinking switch.
fn cases() -> Vec<(&'static str, Vec<ChatMessage>, bool, Option<bool>)> {
    vec![
        ("user", vec![msg("user", "Hello!")], true, None),
        (
            "system",
            vec![msg("system", "You are terse."), msg("user", "What is 2+2?")],
            true,
            None,
        ),
        (
            "multi-turn",
            vec![
                msg("system", "You are terse."),
                msg("user", "What is 2+2?"),
                msg("assistant", "4."),
                msg("user", "And 3+3? Üñíçødé — 東京."),
            ],
            true,
            None,
        ),
        (
            "prefill",
            vec![
                msg("user", "Write a haiku."),
                msg("assistant", "Autumn moonlight"),
            ],
            false,
            None,
        ),
        (
            "no-thinking",
            vec![msg("user", "Quick: capital of France?")],
            true,
            Some(false),
        ),
    ]
}

#[test]
fn real_templates_render_exactly_as_hugging_face() {
    let Some(data) = common::llama_cpp_data() else {
        return;
    };
    let reference: Value =
        serde_json::from_str(include_str!("data/chat_templates.json")).expect("reference JSON");
    let (bos, eos) = (
        reference["bos"].as_str().unwrap(),
        reference["eos"].as_str().unwrap(),
    );
    // The reference's fixed `strftime_now` time: 2026-12-06T21:30:00.
    assert_eq!(reference["now"], "2026-12-06T21:30:00");
    let now = DateTime::from_unix(1_796_592_600);
    let mut failures = Vec::new();
    let templates = reference["templates"].as_object().unwrap();
    assert!(templates.len() >= 14, "{} templates", templates.len());
    for (name, want) in templates {
        let path = data.join("templates").join(format!("{name}.jinja"));
        let source = std::fs::read_to_string(&path).unwrap();
        let template = ChatTemplate::new(&source, bos, eos);
        for (case, messages, generation, thinking) in cases() {
            let options = RenderOptions {
                add_generation_prompt: generation,
                enable_thinking: thinking,
                now: Some(now),
            };
            let got = template.render_with(&messages, &options);
            match (&want["cases"][case], got) {
                (Value::String(want), Ok(got)) if *want == got => {}
                (Value::Null, Err(_)) => {}
                (want, got) => {
                    failures.push(format!("{name} / {case}:\n  want {want}\n  got  {got:?}"))
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
