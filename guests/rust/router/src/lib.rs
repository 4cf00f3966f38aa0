//! `router`: classifies a request by simple rules, then asks a model with the
//! instructions that fit its kind (question, summary request, translation,
//! other), as a chat.
//!
//! Input:  `{"text": "...", "model": "small", "max_tokens": 128}`
//! Output: `{"route": "question", "system": "...", "answer": "...", "usage": {...}}`
//!
//! Model errors (unknown model, not permitted, quota) come back as the step's
//! error, with the host's error kind in the message.

use serde_json::{Value, json};

wit_bindgen::generate!({ path: "../../../wit", world: "step" });

use realm::inference::llm::{self, Sampling};
use realm::inference::log::{Level, log};
use realm::inference::types::Error;
use realm::inference::types::Message;

struct Router;

impl Guest for Router {
    fn run(input: String) -> Result<String, String> {
        let input: Value =
            serde_json::from_str(&input).map_err(|e| format!("input is not JSON: {e}"))?;
        let text = input
            .get("text")
            .and_then(Value::as_str)
            .ok_or("input needs a string field `text`")?
            .trim();
        let model = input
            .get("model")
            .and_then(Value::as_str)
            .ok_or("input needs a string field `model`")?;
        let max_tokens = input
            .get("max_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(128)
            .min(4096) as u32;

        let (route, system, content) = route(text);
        log(Level::Info, &format!("routing request as `{route}`"));
        let sampling = Sampling {
            max_tokens,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            stop: Vec::new(),
            constraint: None,
        };
        let messages = [
            Message {
                role: "system".into(),
                content: system.to_string(),
                tool_calls: Vec::new(),
                tool_call_id: None,
            },
            Message {
                role: "user".into(),
                content,
                tool_calls: Vec::new(),
                tool_call_id: None,
            },
        ];
        let completion = llm::chat(model, &messages, None, &sampling).map_err(describe)?;
        Ok(json!({
            "route": route,
            "system": system,
            "answer": completion.text.trim(),
            "usage": {
                "prompt_tokens": completion.usage.prompt_tokens,
                "completion_tokens": completion.usage.completion_tokens,
            },
        })
        .to_string())
    }
}

/// Picks a route: its name, the system instructions and the user message.
fn route(text: &str) -> (&'static str, String, String) {
    let lower = text.to_lowercase();
    let body = || {
        text.split_once(':')
            .map_or(text, |(_, b)| b.trim())
            .to_string()
    };
    if let Some(rest) = lower.strip_prefix("translate") {
        let target = rest
            .split_whitespace()
            .skip_while(|w| *w != "to")
            .nth(1)
            .unwrap_or("english");
        let target = target.trim_end_matches(':');
        return (
            "translation",
            format!("Translate the user's text into {target}. Reply with the translation only."),
            body(),
        );
    }
    if lower.starts_with("summarize") || lower.starts_with("tl;dr") || text.len() > 600 {
        return (
            "summary",
            "Summarize the user's text in one sentence.".into(),
            body(),
        );
    }
    let question_words = [
        "what", "who", "when", "where", "why", "how", "which", "is", "are", "can", "does", "do",
    ];
    if text.ends_with('?')
        || question_words
            .iter()
            .any(|w| lower.split_whitespace().next() == Some(w))
    {
        return (
            "question",
            "Answer the question briefly and factually.".into(),
            text.to_string(),
        );
    }
    (
        "conversation",
        "You are a helpful assistant.".into(),
        text.to_string(),
    )
}

fn describe(e: Error) -> String {
    match e {
        Error::ModelNotFound(m) => format!("model-not-found: {m}"),
        Error::NotPermitted(m) => format!("not-permitted: {m}"),
        Error::InvalidInput(m) => format!("invalid-input: {m}"),
        Error::QuotaExceeded(m) => format!("quota-exceeded: {m}"),
        Error::Cancelled => "cancelled".to_string(),
        Error::Runtime(m) => format!("runtime: {m}"),
    }
}

export!(Router);
