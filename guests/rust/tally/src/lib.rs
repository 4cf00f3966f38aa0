//! `tally`: keeps running word counts across calls in the tenant's kv store,
//! so repeated runs build up a picture of what the tenant's texts are about.
//!
//! Input:  `{"text": "...", "namespace": "default", "top": 5, "min_len": 3}`
//! Output: `{"documents": n, "total_words": n, "new_words": [...], "top": [["word", count], ...]}`
//!
//! State lives under the kv key `tally/<namespace>` as a JSON document.

use std::collections::BTreeMap;

use serde_json::{Value, json};

wit_bindgen::generate!({ path: "../../../wit", world: "step" });

use realm::inference::kv;
use realm::inference::log::{Level, log};

struct Tally;

impl Guest for Tally {
    fn run(input: String) -> Result<String, String> {
        let input: Value =
            serde_json::from_str(&input).map_err(|e| format!("input is not JSON: {e}"))?;
        let text = input
            .get("text")
            .and_then(Value::as_str)
            .ok_or("input needs a string field `text`")?;
        let namespace = input
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let top = input
            .get("top")
            .and_then(Value::as_u64)
            .unwrap_or(5)
            .min(100) as usize;
        let min_len = input.get("min_len").and_then(Value::as_u64).unwrap_or(3) as usize;
        let key = format!("tally/{namespace}");

        // Read, update, and write back only if nobody wrote in between:
        // concurrent runs each count once.
        let (state, new_words) = loop {
            let stored = kv::get(&key).map_err(|e| format!("kv get failed: {e:?}"))?;
            let mut state = match &stored {
                Some(bytes) => serde_json::from_slice::<Value>(bytes)
                    .ok()
                    .and_then(State::from_json)
                    .ok_or_else(|| format!("kv key `{key}` holds data this version cannot read"))?,
                None => State::default(),
            };
            let new_words = state.add(text, min_len);
            let updated = state.to_json().to_string();
            if kv::compare_and_swap(&key, stored.as_deref(), Some(updated.as_bytes()))
                .map_err(|e| format!("kv compare-and-swap failed: {e:?}"))?
            {
                break (state, new_words);
            }
        };
        log(
            Level::Info,
            &format!(
                "tally `{namespace}`: {} documents, {} distinct words",
                state.documents,
                state.counts.len()
            ),
        );

        let mut ranked: Vec<(&String, &u64)> = state.counts.iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let top: Vec<Value> = ranked
            .into_iter()
            .take(top)
            .map(|(w, c)| json!([w, c]))
            .collect();
        Ok(json!({
            "documents": state.documents,
            "total_words": state.total_words,
            "new_words": new_words,
            "top": top,
        })
        .to_string())
    }
}

#[derive(Default)]
struct State {
    documents: u64,
    total_words: u64,
    counts: BTreeMap<String, u64>,
}

impl State {
    /// Counts the words of `text` at least `min_len` characters long; the
    /// words seen for the first time.
    fn add(&mut self, text: &str, min_len: usize) -> Vec<String> {
        let mut new_words = Vec::new();
        for word in text
            .split(|c: char| !c.is_alphanumeric() && c != '\'')
            .map(|w| w.trim_matches('\'').to_lowercase())
            .filter(|w| w.chars().count() >= min_len)
        {
            let count = self.counts.entry(word.clone()).or_insert(0);
            if *count == 0 && !new_words.contains(&word) {
                new_words.push(word);
            }
            *count += 1;
            self.total_words += 1;
        }
        self.documents += 1;
        new_words
    }

    fn from_json(v: Value) -> Option<State> {
        let counts = v
            .get("counts")?
            .as_object()?
            .iter()
            .map(|(k, c)| Some((k.clone(), c.as_u64()?)))
            .collect::<Option<_>>()?;
        Some(State {
            documents: v.get("documents")?.as_u64()?,
            total_words: v.get("total_words")?.as_u64()?,
            counts,
        })
    }

    fn to_json(&self) -> Value {
        json!({"documents": self.documents, "total_words": self.total_words, "counts": self.counts})
    }
}

export!(Tally);
