//! A validated pipeline: every reference resolved, the steps in dependency order.

use std::collections::BTreeMap;
use std::path::PathBuf;

use realm_models::engine::GenerateOptions;

use crate::sandbox::Limits;

use super::build::ComponentSource;

use super::spec::InputType;
use super::template::{Template, ValueTemplate};

/// A pipeline that passed validation and can be run.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The pipeline's name.
    pub name: String,
    /// What it does, for people.
    pub description: Option<String>,
    /// The file it was read from.
    pub file: PathBuf,
    /// Declared inputs.
    pub inputs: BTreeMap<String, InputDecl>,
    /// Declared models, by the name steps use.
    pub models: BTreeMap<String, ModelDecl>,
    /// Declared components, by the name steps use.
    pub components: BTreeMap<String, ComponentDecl>,
    /// Steps, ordered so that every step comes after the steps it depends on.
    pub steps: Vec<Step>,
    /// Output templates; `None` means "every step's result".
    pub outputs: Option<Vec<(String, ValueTemplate)>>,
}

/// An input of the pipeline.
#[derive(Debug, Clone)]
pub struct InputDecl {
    /// Its type.
    pub ty: InputType,
    /// Its value when not given; required when `None`.
    pub default: Option<serde_json::Value>,
    /// What it means, for people.
    pub description: Option<String>,
}

/// A model the pipeline uses.
#[derive(Debug, Clone)]
pub struct ModelDecl {
    /// A registry name or a path to a `.gguf` file.
    pub source: String,
    /// The LoRA adapter its steps run with.
    pub adapter: Option<AdapterDecl>,
}

/// A pipeline model's LoRA adapter.
#[derive(Debug, Clone)]
pub struct AdapterDecl {
    /// A path to a `.gguf` adapter (relative to the pipeline's folder) or a
    /// stored adapter's name.
    pub source: String,
    /// How strongly it applies (1.0 as trained).
    pub scale: f32,
}

/// A component the pipeline uses.
#[derive(Debug, Clone)]
pub struct ComponentDecl {
    /// Where its `.wasm` comes from.
    pub source: ComponentSource,
    /// Limits of each call.
    pub limits: Limits,
    /// Models it may call.
    pub models: Vec<String>,
}

/// One step of the pipeline.
#[derive(Debug, Clone)]
pub struct Step {
    /// Its id, unique in the pipeline.
    pub id: String,
    /// What it does.
    pub kind: StepKind,
    /// Ids of the steps that must finish first.
    pub depends_on: Vec<String>,
}

/// What a step does.
#[derive(Debug, Clone)]
pub enum StepKind {
    /// Completes a prompt with a model.
    Model {
        /// The model's name in `[models]`.
        model: String,
        /// The prompt, or the user message when `system` is set.
        prompt: Template,
        /// A system message: when set, the step is a chat call.
        system: Option<Template>,
        /// How tokens are picked.
        sampling: Sampling,
        /// A JSON Schema the output is held to while decoding; the step's
        /// result then has `value`, the parsed output, besides `text`.
        schema: Option<serde_json::Value>,
    },
    /// Runs a component's `run` on a JSON input.
    Component {
        /// The component's name in `[components]`.
        component: String,
        /// The input document.
        input: ValueTemplate,
    },
}

/// Sampling settings of a model step.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Softmax temperature; 0 is greedy.
    pub temperature: f32,
    /// Top-k cut; 0 disables.
    pub top_k: u32,
    /// Nucleus cut; 1 disables.
    pub top_p: f32,
    /// Min-p cut; 0 disables.
    pub min_p: f32,
    /// Repetition penalty; 1 disables.
    pub repeat_penalty: f32,
    /// OpenAI's presence penalty; 0 disables.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty; 0 disables.
    pub frequency_penalty: f32,
    /// Seed for reproducible sampling.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
}

impl Sampling {
    /// The settings as a generation request, for the engine's one check.
    pub fn options(&self) -> GenerateOptions {
        GenerateOptions {
            max_tokens: Some(self.max_tokens),
            temperature: Some(self.temperature),
            top_k: Some(self.top_k),
            top_p: Some(self.top_p),
            min_p: Some(self.min_p),
            repeat_penalty: Some(self.repeat_penalty),
            presence_penalty: Some(self.presence_penalty),
            frequency_penalty: Some(self.frequency_penalty),
            seed: self.seed,
            stop: self.stop.clone(),
        }
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            max_tokens: 256,
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            stop: Vec::new(),
        }
    }
}
