//! Real chat templates (llama.cpp's collection, `REALM_LLAMA_CPP_DATA`)
//! rendered by Realm, byte for byte against Hugging Face's rendering
//! (`data/chat_templates.json`, made by `scripts/chat_template_reference.py`
//! with Python's Jinja2; `just chat-template-reference` remakes it).

mod common;

use realm_models::chat::tools::{Tool, ToolCall, ToolSyntax};
use realm_models::chat::{ChatMessage, ChatTemplate, DateTime, RenderOptions};
use serde_json::{Value, json};

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

/// The reference script's tool.
fn weather() -> Tool {
    Tool {
        name: "get_weather".into(),
        description: Some("The weather in a city.".into()),
        parameters: json!({
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
        }),
    }
}

/// The conversations of the reference script with tools, by name.
fn tool_cases() -> Vec<(&'static str, Vec<ChatMessage>)> {
    let mut call = msg("assistant", "");
    call.tool_calls = vec![ToolCall {
        id: "call12345".into(),
        name: "get_weather".into(),
        arguments: json!({"city": "Paris"}),
    }];
    let mut result = msg("tool", "{\"temp\": 21}");
    result.tool_call_id = Some("call12345".into());
    vec![
        (
            "tools",
            vec![
                msg("system", "You are terse."),
                msg("user", "Weather in Paris?"),
            ],
        ),
        (
            "tool-round-trip",
            vec![msg("user", "Weather in Paris?"), call, result],
        ),
    ]
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
        // Templates that show tools render them as Hugging Face does; the
        // others get Realm's generic tool prompt instead.
        let options = RenderOptions {
            now: Some(now),
            ..RenderOptions::default()
        };
        for (case, messages) in tool_cases() {
            let got = template.render_chat(&messages, &[weather()], &options);
            if template.tool_syntax().is_native() {
                match (&want["cases"][case], got) {
                    (Value::String(want), Ok(got)) if *want == got => {}
                    (want, got) => {
                        failures.push(format!("{name} / {case}:\n  want {want}\n  got  {got:?}"))
                    }
                }
            } else {
                // A template that refuses system messages still refuses them.
                let refused = case == "tools" && want["cases"]["system"].is_null();
                match got {
                    Ok(got) if got.contains("<tools>") && got.contains("get_weather") => {}
                    Err(_) if refused => {}
                    got => failures.push(format!("{name} / {case} (generic): {got:?}")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn tool_syntaxes_are_recognised_in_real_templates() {
    let Some(data) = common::llama_cpp_data() else {
        return;
    };
    let syntax = |name: &str| {
        let path = data.join("templates").join(format!("{name}.jinja"));
        ChatTemplate::new(&std::fs::read_to_string(path).unwrap(), "", "").tool_syntax()
    };
    for (name, want) in [
        ("Qwen-Qwen2.5-7B-Instruct", ToolSyntax::Hermes),
        ("Qwen-Qwen3-0.6B", ToolSyntax::Hermes),
        ("Qwen-QwQ-32B", ToolSyntax::Hermes),
        (
            "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
            ToolSyntax::Hermes,
        ),
        ("meta-llama-Llama-3.1-8B-Instruct", ToolSyntax::Llama3),
        ("meta-llama-Llama-3.2-3B-Instruct", ToolSyntax::Llama3),
        ("meta-llama-Llama-3.3-70B-Instruct", ToolSyntax::Llama3),
        ("mistralai-Mistral-Nemo-Instruct-2407", ToolSyntax::Mistral),
        // Syntaxes Realm does not know, and templates without tools.
        ("Mistral-Small-3.2-24B-Instruct-2506", ToolSyntax::Generic),
        ("Qwen3-Coder", ToolSyntax::Generic),
        ("google-gemma-2-2b-it", ToolSyntax::Generic),
    ] {
        assert_eq!(syntax(name), want, "{name}");
    }
}
