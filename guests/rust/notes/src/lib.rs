//! `notes`: a `tenant`-world component, invoked by the server for one tenant.
//! It keeps notes in the tenant's kv store and answers questions about them
//! with the first model the tenant may use.
//!
//! Requests (JSON):
//! - `{"op": "remember", "key": "k", "text": "..."}` → `{"stored": "k"}`
//! - `{"op": "recall", "key": "k"}` → `{"key": "k", "text": "..." | null}`
//! - `{"op": "list"}` → `{"keys": [...]}`
//! - `{"op": "count", "key": "k"}` → `{"key": "k", "count": n}` (adds one,
//!   atomically: concurrent counts are never lost)
//! - `{"op": "ask", "question": "...", "max_tokens": 64}` → `{"answer": "...", "model": "..."}`
//!   (the notes go into the system prompt), on the first model listed, or
//!   the one named by `"model"` (`MODEL:ADAPTER` for one of the tenant's
//!   LoRA adapters); with `"schema": {...}` (a JSON
//!   Schema) the host holds the answer to it and the reply adds `"value"`,
//!   the answer parsed.

use serde_json::{Value, json};

wit_bindgen::generate!({ path: "../../../wit", world: "tenant" });

use realm::inference::llm::{self, Sampling};
use realm::inference::types::{Constraint, Error, Message};
use realm::inference::{kv, log};

/// Notes live under this kv prefix.
const PREFIX: &str = "note/";

struct Notes;

impl Guest for Notes {
    fn handle(request: String) -> Result<String, String> {
        let request: Value =
            serde_json::from_str(&request).map_err(|e| format!("request is not JSON: {e}"))?;
        let field = |name: &str| {
            request
                .get(name)
                .and_then(Value::as_str)
                .ok_or(format!("request needs a string field `{name}`"))
        };
        let reply = match field("op")? {
            "remember" => {
                let key = field("key")?;
                kv::set(&format!("{PREFIX}{key}"), field("text")?.as_bytes()).map_err(describe)?;
                json!({ "stored": key })
            }
            "recall" => {
                let key = field("key")?;
                let text = kv::get(&format!("{PREFIX}{key}"))
                    .map_err(describe)?
                    .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
                json!({ "key": key, "text": text })
            }
            "list" => json!({ "keys": note_keys()? }),
            "count" => {
                let key = field("key")?;
                json!({ "key": key, "count": count(&format!("count/{key}"))? })
            }
            "ask" => ask(field("question")?, &request)?,
            other => {
                return Err(format!(
                    "unknown op `{other}` (remember, recall, list, count, ask)"
                ));
            }
        };
        Ok(reply.to_string())
    }
}

/// Adds one to the counter at `key`, retrying until no concurrent call wrote
/// in between; the new count.
fn count(key: &str) -> Result<u64, String> {
    loop {
        let stored = kv::get(key).map_err(describe)?;
        let n = match &stored {
            Some(bytes) => String::from_utf8_lossy(bytes)
                .parse::<u64>()
                .map_err(|e| format!("kv key `{key}` is not a count: {e}"))?,
            None => 0,
        };
        let next = (n + 1).to_string();
        if kv::compare_and_swap(key, stored.as_deref(), Some(next.as_bytes())).map_err(describe)? {
            return Ok(n + 1);
        }
    }
}

fn note_keys() -> Result<Vec<String>, String> {
    Ok(kv::list_keys(PREFIX)
        .map_err(describe)?
        .into_iter()
        .map(|k| k[PREFIX.len()..].to_string())
        .collect())
}

fn ask(question: &str, request: &Value) -> Result<Value, String> {
    let model = match request.get("model").and_then(Value::as_str) {
        Some(model) => model.to_string(),
        None => {
            llm::list_models()
                .into_iter()
                .next()
                .ok_or("this tenant may use no model")?
                .name
        }
    };
    let mut notes = String::new();
    for key in note_keys()? {
        if let Some(bytes) = kv::get(&format!("{PREFIX}{key}")).map_err(describe)? {
            notes.push_str(&format!("- {key}: {}\n", String::from_utf8_lossy(&bytes)));
        }
    }
    log::log(
        log::Level::Info,
        &format!("answering with {model} from {} bytes of notes", notes.len()),
    );
    let max_tokens = request
        .get("max_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(64)
        .min(1024) as u32;
    let messages = [
        Message {
            role: "system".into(),
            content: format!("Answer briefly using these notes:\n{notes}"),
            tool_calls: Vec::new(),
            tool_call_id: None,
        },
        Message {
            role: "user".into(),
            content: question.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        },
    ];
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
        // The host enforces the schema while decoding: no logits cross over.
        constraint: request
            .get("schema")
            .map(|schema| Constraint::JsonSchema(schema.to_string())),
    };
    let completion = llm::chat(&model, &messages, None, &sampling).map_err(describe)?;
    let mut reply = json!({ "answer": completion.text.trim(), "model": model });
    if request.get("schema").is_some() {
        reply["value"] = serde_json::from_str(&completion.text)
            .map_err(|e| format!("the constrained answer is not JSON: {e}"))?;
    }
    Ok(reply)
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

export!(Notes);
