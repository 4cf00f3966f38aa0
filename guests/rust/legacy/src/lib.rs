//! `legacy`: a step built against the frozen `realm:inference@0.1.0`
//! contract (wit/archive/realm-0.1.0.wit), as guests built before 0.2.0
//! were. The host must keep running it: it chats with the first model and
//! counts its runs in kv.
//!
//! Input:  `{"question": "..."}`
//! Output: `{"answer": "...", "finish": "stop", "runs": 1}`

use serde_json::{Value, json};

wit_bindgen::generate!({ path: "../../../wit/archive/realm-0.1.0.wit", world: "step" });

use realm::inference::kv;
use realm::inference::llm::{self, Sampling};
use realm::inference::types::{Error, FinishReason, Message};

struct Legacy;

impl Guest for Legacy {
    fn run(input: String) -> Result<String, String> {
        let input: Value =
            serde_json::from_str(&input).map_err(|e| format!("input is not JSON: {e}"))?;
        let question = input
            .get("question")
            .and_then(Value::as_str)
            .ok_or("input needs a string field `question`")?;
        let model = llm::list_models()
            .into_iter()
            .next()
            .ok_or("this step may not use any model")?
            .name;
        let sampling = Sampling {
            max_tokens: 16,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            seed: None,
            stop: Vec::new(),
        };
        let messages = [Message {
            role: "user".into(),
            content: question.into(),
        }];
        let completion = llm::chat(&model, &messages, &sampling).map_err(describe)?;
        let runs = kv::get("runs")
            .map_err(describe)?
            .and_then(|b| String::from_utf8(b).ok()?.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        kv::set("runs", runs.to_string().as_bytes()).map_err(describe)?;
        let finish = match completion.finish {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        };
        Ok(json!({"answer": completion.text, "finish": finish, "runs": runs}).to_string())
    }
}

fn describe(e: Error) -> String {
    match e {
        Error::ModelNotFound(m) => format!("model-not-found: {m}"),
        Error::NotPermitted(m) => format!("not-permitted: {m}"),
        Error::InvalidInput(m) => format!("invalid-input: {m}"),
        Error::QuotaExceeded(m) => format!("quota-exceeded: {m}"),
        Error::Cancelled => "cancelled".into(),
        Error::Runtime(m) => format!("runtime: {m}"),
    }
}

export!(Legacy);
