//! `realm-host models inspect`: what a GGUF file holds.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use realm_models::gguf::{GgufError, GgufFile, MetaValue};

/// A summary of a model file.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name`, if set.
    pub name: Option<String>,
    /// GGUF version.
    pub gguf_version: u32,
    /// Architecture hyperparameters (`<arch>.*` keys).
    pub hyperparameters: BTreeMap<String, String>,
    /// Number of tensors of each element type.
    pub tensor_types: BTreeMap<String, usize>,
    /// Total parameters.
    pub parameters: u64,
    /// `tokenizer.ggml.model` (e.g. `gpt2`, `llama`).
    pub tokenizer: Option<String>,
    /// `tokenizer.ggml.pre`.
    pub pre_tokenizer: Option<String>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Special token ids (`bos`, `eos`, ...).
    pub special_tokens: BTreeMap<String, u64>,
    /// The first line of the chat template, if the file has one.
    pub chat_template: Option<String>,
    /// What the file adapts, if it is a LoRA adapter (`general.type = adapter`).
    pub adapter: Option<AdapterReport>,
}

/// A LoRA adapter's shape, as `models inspect` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterReport {
    /// `adapter.type` (`lora`).
    pub kind: String,
    /// `adapter.lora.alpha` (0: the scale is applied as is).
    pub alpha: f64,
    /// The ranks of its factors (one, unless they differ by weight).
    pub ranks: Vec<u64>,
    /// The base weights it adapts, by kind (`attn_q.weight`, ...), with how
    /// many layers' of each.
    pub targets: BTreeMap<String, usize>,
}

/// The adapter `file` describes, if it is one.
pub(super) fn adapter(file: &GgufFile) -> Option<AdapterReport> {
    if file.get("general.type").and_then(MetaValue::as_str) != Some("adapter") {
        return None;
    }
    let mut ranks = Vec::new();
    let mut targets = BTreeMap::new();
    for t in file.tensors() {
        let Some(weight) = t.name.strip_suffix(".lora_a") else {
            continue;
        };
        ranks.extend(t.dims.get(1).copied());
        let kind = match weight.strip_prefix("blk.").and_then(|w| w.split_once('.')) {
            Some((_, kind)) => kind,
            None => weight,
        };
        *targets.entry(kind.to_string()).or_insert(0) += 1;
    }
    ranks.sort_unstable();
    ranks.dedup();
    Some(AdapterReport {
        kind: file
            .get("adapter.type")
            .and_then(MetaValue::as_str)
            .unwrap_or("unknown")
            .to_string(),
        alpha: file.get_f64("adapter.lora.alpha").unwrap_or(0.0),
        ranks,
        targets,
    })
}

/// Reads the model at `path` and summarizes it.
pub fn inspect(path: &Path) -> Result<ModelReport, GgufError> {
    let file = GgufFile::open(path)?;
    let architecture = file.get_str("general.architecture")?.to_string();
    let prefix = format!("{architecture}.");
    let hyperparameters = file
        .metadata()
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(k, v)| (k[prefix.len()..].to_string(), v.to_string()))
        .collect();
    let mut tensor_types = BTreeMap::new();
    for t in file.tensors() {
        *tensor_types.entry(t.ggml_type.to_string()).or_insert(0) += 1;
    }
    let special_tokens = file
        .metadata()
        .iter()
        .filter_map(|(k, v)| {
            let role = k
                .strip_prefix("tokenizer.ggml.")?
                .strip_suffix("_token_id")?;
            Some((role.to_string(), v.as_u64()?))
        })
        .collect();
    Ok(ModelReport {
        name: file
            .get("general.name")
            .and_then(MetaValue::as_str)
            .map(String::from),
        gguf_version: file.version(),
        hyperparameters,
        tensor_types,
        parameters: file.tensors().iter().map(|t| t.elements()).sum(),
        tokenizer: file
            .get("tokenizer.ggml.model")
            .and_then(MetaValue::as_str)
            .map(String::from),
        pre_tokenizer: file
            .get("tokenizer.ggml.pre")
            .and_then(MetaValue::as_str)
            .map(String::from),
        vocab_size: file
            .get_array("tokenizer.ggml.tokens")
            .map(<[_]>::len)
            .unwrap_or(0),
        special_tokens,
        chat_template: file
            .get("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
            .and_then(|t| t.lines().find(|l| !l.trim().is_empty()))
            .map(|l| l.trim().to_string()),
        adapter: adapter(&file),
        architecture,
    })
}
