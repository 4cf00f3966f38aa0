//! The raw shape of `pipeline.toml`, as deserialized before validation.
//! Unknown keys are rejected here; everything else is checked in `validate`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use crate::sandbox::LimitOverrides;

/// A whole pipeline file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PipelineFile {
    pub name: Spanned<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub inputs: BTreeMap<Spanned<String>, Spanned<InputSpec>>,
    #[serde(default)]
    pub models: BTreeMap<Spanned<String>, Spanned<ModelSpec>>,
    #[serde(default)]
    pub components: BTreeMap<Spanned<String>, Spanned<ComponentSpec>>,
    #[serde(default)]
    pub steps: Vec<Spanned<StepSpec>>,
    #[serde(default)]
    pub outputs: Option<BTreeMap<Spanned<String>, Spanned<toml::Value>>>,
}

/// `[inputs.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InputSpec {
    #[serde(rename = "type")]
    pub ty: InputType,
    #[serde(default)]
    pub default: Option<toml::Value>,
    #[serde(default)]
    pub description: Option<String>,
}

/// The JSON type an input must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputType {
    /// A JSON string.
    String,
    /// A whole number.
    Integer,
    /// Any number.
    Number,
    /// `true` or `false`.
    Boolean,
    /// A JSON object.
    Object,
    /// A JSON array.
    Array,
    /// Any JSON value.
    Any,
}

/// `[models.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModelSpec {
    pub source: String,
    /// A LoRA adapter every step on this model runs with.
    #[serde(default)]
    pub adapter: Option<String>,
    /// How strongly the adapter applies (1.0 as trained).
    #[serde(default)]
    pub scale: Option<f32>,
}

/// `[components.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ComponentSpec {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub build: Option<String>,
    pub wasm: Spanned<String>,
    #[serde(default)]
    pub watch: Vec<String>,
    #[serde(default)]
    pub limits: Option<Spanned<LimitOverrides>>,
    #[serde(default)]
    pub models: Vec<Spanned<String>>,
}

/// One `[[steps]]` entry: either a model call or a component call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StepSpec {
    pub id: Spanned<String>,
    #[serde(default)]
    pub model: Option<Spanned<String>>,
    #[serde(default)]
    pub prompt: Option<Spanned<String>>,
    #[serde(default)]
    pub system: Option<Spanned<String>>,
    #[serde(default)]
    pub sampling: Option<Spanned<SamplingSpec>>,
    /// The JSON Schema a model step's output must match: inline, or
    /// `"@file.json"` beside the pipeline.
    #[serde(default)]
    pub schema: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub component: Option<Spanned<String>>,
    #[serde(default)]
    pub input: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub after: Vec<Spanned<String>>,
}

/// `sampling = { ... }` of a model step; unset fields take the defaults.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct SamplingSpec {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Vec<String>,
}
