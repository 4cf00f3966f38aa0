//! The seam between the host and a model: what serving tenants needs of an
//! engine, and nothing about how it computes.
//!
//! The host holds models as `Arc<dyn Engine>`. [`LoadedModel`](super::LoadedModel)
//! is the real engine (GGUF weights, the batcher); [`FakeEngine`](super::FakeEngine)
//! answers from a script, so code built on engines is tested without model
//! files or the time a real model takes.

use std::sync::Arc;

use crate::arch::LoraAdapter;
use crate::chat::ChatMessage;
use crate::chat::tools::{Tool, ToolSyntax};

use super::{Completer, Constraint, ConstraintSpec, EngineError, OnEnd, Pending, Request};

/// What a model is, as its users see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    /// The architecture (`llama`, `gemma3`, ...).
    pub architecture: String,
    /// Most tokens one sequence may hold.
    pub context_length: usize,
    /// Token ids are below this.
    pub vocab_size: usize,
    /// Length of an embedding from [`Engine::embed`].
    pub embedding_length: usize,
    /// Bytes of the weights as the file stores them: about what loading
    /// the model takes from memory (0 when nothing is loaded).
    pub weight_bytes: u64,
}

/// The text side of a model: what it is, its tokens and its chat format.
/// Small next to the weights, so it stays in memory while they come and go.
pub trait Prompter: Send + Sync + std::fmt::Debug {
    /// What the model is.
    fn info(&self) -> &EngineInfo;

    /// The longest input text, in bytes, that could fit the context: a
    /// longer one can be refused before it is tokenized.
    fn max_prompt_bytes(&self) -> usize;

    /// Token ids of a raw prompt (a BOS added if the model wants one).
    fn prompt_tokens(&self, prompt: &str) -> Vec<u32>;

    /// Token ids of `text` as it is: no BOS added.
    fn tokenize(&self, text: &str) -> Vec<u32>;

    /// The text of `tokens`; an id outside the vocabulary is an
    /// [`EngineError::InvalidInput`].
    fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError>;

    /// Token ids of a chat in the model's format, offering `tools`, ready
    /// for the assistant's reply. A message cannot fake a turn of another
    /// role.
    fn chat_tokens(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
    ) -> Result<Vec<u32>, EngineError>;

    /// How the model writes tool calls (what [`ConstraintSpec::ToolCalls`]
    /// forces and [`ToolParser`](crate::chat::tools::ToolParser) reads).
    fn tool_syntax(&self) -> ToolSyntax;

    /// Compiles `spec` over this model's vocabulary, for a
    /// [`Request::constraint`]; an invalid or too complex grammar is an
    /// [`EngineError::InvalidInput`] naming the problem. Blocks while it
    /// compiles (milliseconds, more for large schemas): call it off the
    /// async threads.
    fn constrain(&self, spec: &ConstraintSpec) -> Result<Constraint, EngineError>;
}

/// A model that serves generations, embeddings and decoding sessions to
/// many callers at once (and its [`Prompter`] side).
pub trait Engine: Prompter {
    /// A sentence embedding of `text`, L2-normalized, of
    /// [`EngineInfo::embedding_length`] values. Blocks while it computes.
    fn embed(&self, text: &str) -> Result<Vec<f32>, EngineError>;

    /// Runs `request` and ends it through `done`, exactly once (a refused
    /// request at once). Never blocks on the generation.
    fn start(&self, request: Request, done: Completer);

    /// Starts `request`; `on_end` runs once when it ends, whether or not
    /// anyone still awaits it (where usage is settled). The returned future
    /// resolves when the generation ends; dropping it first cancels the
    /// generation.
    fn submit(&self, request: Request, on_end: Option<OnEnd>) -> Pending {
        let (done, pending) = Pending::new(request.cancel.clone(), on_end);
        self.start(request, done);
        pending
    }

    /// A new decoding session of up to [`EngineInfo::context_length`]
    /// tokens, every token run with `adapter` if given (one loaded for this
    /// model). A session may hold the model in memory while it lives. An
    /// adapter this engine cannot run is an error, here or at the first
    /// [`Decoder::forward`].
    fn decoder(&self, adapter: Option<Arc<LoraAdapter>>) -> Result<Box<dyn Decoder>, EngineError>;

    /// Bytes the weights take on a GPU (0 where they stay in host memory).
    fn device_bytes(&self) -> u64;

    /// Its batch's queue and KV cache now (empty for an engine without a
    /// batcher).
    fn batch(&self) -> super::BatchStatus {
        super::BatchStatus::default()
    }
}

/// One sequence decoded step by step by its caller: tokens go in, the next
/// token's logits come out. Calls block while the model computes.
pub trait Decoder: Send {
    /// Appends `tokens` (at least one) and returns the logits after the last.
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError>;

    /// Forgets every token from position `len` on.
    fn truncate(&mut self, len: usize);
}
