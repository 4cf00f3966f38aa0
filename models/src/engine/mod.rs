//! Text generation on a loaded model: prompt in, text out, piece by piece.

mod api;
mod batcher;
mod bench;
mod constraint;
mod decode;
mod fake;
mod params;
mod prefix;
mod prompter;
mod request;
mod sampler;
mod stream;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use crate::arch::{ComputeDevice, LoraAdapter, Model, ModelError, Sequence};
use crate::chat::tools::{Tool, ToolSyntax};
use crate::chat::{ChatError, ChatMessage};
use crate::gguf::{GgufError, GgufFile};
use crate::tokenizer::{Tokenizer, TokenizerError};

pub use api::{Decoder, Engine, EngineInfo, Prompter};
use batcher::Job;
pub use batcher::{BatchStatus, Batcher, BatcherConfig, BatcherLoad, Offer, TextSink};
pub use bench::{
    BenchReport, bench, bench_generations, bench_prompt, bench_streams, synthetic_adapter_file,
};
pub use constraint::{Constraint, ConstraintCompiler, ConstraintSpec, MAX_CONSTRAINT_BYTES};
pub use fake::{FakeEngine, Reply};
pub use params::{
    DEFAULT_MAX_TOKENS, GenerateOptions, GenerateParams, InvalidParams, MAX_STOP_BYTES,
    MAX_STOP_STRINGS, MAX_TEMPERATURE,
};
pub use prompter::GgufPrompter;
pub use request::{Completer, OnEnd, Pending, Request};
pub use sampler::{Sampler, SamplingParams};
pub use stream::TextStream;

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model file could not be read.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The model could not be loaded or run.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer could not be built.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The chat could not be formatted.
    #[error(transparent)]
    Chat(#[from] ChatError),
    /// The request does not fit the model.
    #[error("{0}")]
    InvalidInput(String),
    /// The batcher thread could not be started.
    #[error("cannot start the model's batcher thread: {0}")]
    Thread(std::io::Error),
    /// The model's batcher is gone (the model is being unloaded).
    #[error("the model has stopped serving requests")]
    Stopped,
    /// A batched step failed (a bug; the generations in it end).
    #[error("the batched step failed: {0}")]
    StepFailed(String),
    /// The model cannot be put in memory now (it does not fit beside the
    /// models in use, or failed to load); trying later may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// A constraint became too complex to follow mid-generation (it was
    /// valid when compiled); the text so far is dropped.
    #[error("{0}")]
    ConstraintFailed(String),
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The caller stopped it.
    Cancelled,
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The generated text (stop string excluded).
    pub text: String,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache (the
    /// tenant's own earlier prompts, or a public prefix).
    pub cached_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Why it ended.
    pub finish: FinishReason,
}

/// A model ready to generate: weights, the text side, and the batcher
/// every generation on it goes through.
pub struct LoadedModel {
    prompter: Arc<GgufPrompter>,
    model: Arc<Model>,
    batcher: Batcher,
}

/// Pieces a blocking caller of [`LoadedModel::generate`] may fall behind by
/// before its generation pauses.
const STREAM_BUFFER: usize = 16;

/// A [`TextSink`] over a bounded channel to a blocking reader.
struct ChannelSink(mpsc::SyncSender<String>);

impl TextSink for ChannelSink {
    fn offer(&mut self, piece: String) -> Offer {
        match self.0.try_send(piece) {
            Ok(()) => Offer::Taken,
            Err(mpsc::TrySendError::Full(piece)) => Offer::Full(piece),
            Err(mpsc::TrySendError::Disconnected(_)) => Offer::Closed,
        }
    }
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("model", &self.model)
            .finish()
    }
}

impl LoadedModel {
    /// Maps the model at `path` and loads it onto `device`, batching with
    /// the default settings.
    pub fn open(path: &Path, device: ComputeDevice) -> Result<Self, EngineError> {
        Self::open_with(path, device, BatcherConfig::default())
    }

    /// Maps the model at `path` and loads it onto `device`, batching as `batching` says.
    pub fn open_with(
        path: &Path,
        device: ComputeDevice,
        batching: BatcherConfig,
    ) -> Result<Self, EngineError> {
        let file = Arc::new(GgufFile::open(path)?);
        let prompter = Arc::new(GgufPrompter::from_gguf(&file)?);
        Self::load(prompter, file, device, batching)
    }

    /// Loads the weights of `file` onto `device` next to `prompter`, its
    /// text side, built earlier from the same file.
    pub fn load(
        prompter: Arc<GgufPrompter>,
        file: Arc<GgufFile>,
        device: ComputeDevice,
        batching: BatcherConfig,
    ) -> Result<Self, EngineError> {
        let model = Arc::new(Model::load(file, device)?);
        let batcher = Batcher::start(model.clone(), prompter.tokenizer().clone(), batching)?;
        Ok(LoadedModel {
            prompter,
            model,
            batcher,
        })
    }

    /// The batcher that runs this model's generations.
    pub fn batcher(&self) -> &Batcher {
        &self.batcher
    }

    /// The transformer.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Reads the LoRA adapter at `path` for this model, applied at `scale`
    /// (1.0 as trained), for [`Request::adapter`]: every tensor is checked
    /// against the weight it adapts.
    pub fn load_adapter(&self, path: &Path, scale: f32) -> Result<Arc<LoraAdapter>, EngineError> {
        let file = GgufFile::open(path)?;
        Ok(Arc::new(self.model.load_adapter(&file, scale)?))
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        self.prompter.tokenizer()
    }

    /// Generates from `prompt` (token ids), batched with every other
    /// generation on this model. `on_text` receives each new piece of text
    /// as soon as it is certain (never part of a stop string) and returns
    /// `false` to cancel. Blocks until the generation ends.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Completion, EngineError> {
        self.generate_as("", 1, prompt, params, on_text)
    }

    /// [`generate`](Self::generate) on behalf of `tenant`, whose requests
    /// share the batch slots with other tenants' by `weight`.
    pub fn generate_as(
        &self,
        tenant: &str,
        weight: u32,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Completion, EngineError> {
        let (pieces, received) = mpsc::sync_channel(STREAM_BUFFER);
        let result = Arc::new(Mutex::new(None));
        let slot = result.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        self.batcher.submit(Job {
            prompt: prompt.to_vec(),
            params: params.clone(),
            tenant: tenant.to_string(),
            weight,
            cancel: cancel.clone(),
            sink: Some(Box::new(ChannelSink(pieces))),
            constraint: None,
            adapter: None,
            done: Box::new(move |r| *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(r)),
        });
        // The sink is dropped after `done` ran: the loop ends with the result set.
        for piece in received {
            if !cancel.load(Ordering::Relaxed) && !on_text(&piece) {
                cancel.store(true, Ordering::Relaxed);
            }
        }
        let result = result.lock().unwrap_or_else(|e| e.into_inner()).take();
        result.unwrap_or(Err(EngineError::Stopped))
    }
}

impl Prompter for LoadedModel {
    fn info(&self) -> &EngineInfo {
        self.prompter.info()
    }

    fn max_prompt_bytes(&self) -> usize {
        self.prompter.max_prompt_bytes()
    }

    fn prompt_tokens(&self, prompt: &str) -> Vec<u32> {
        self.prompter.prompt_tokens(prompt)
    }

    fn tokenize(&self, text: &str) -> Vec<u32> {
        self.prompter.tokenize(text)
    }

    fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError> {
        self.prompter.detokenize(tokens)
    }

    fn chat_tokens(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
    ) -> Result<Vec<u32>, EngineError> {
        self.prompter.chat_tokens(messages, tools)
    }

    fn tool_syntax(&self) -> ToolSyntax {
        self.prompter.tool_syntax()
    }

    fn constrain(&self, spec: &ConstraintSpec) -> Result<Constraint, EngineError> {
        self.prompter.constrain(spec)
    }
}

impl Engine for LoadedModel {
    /// The mean of the final hidden states over the text's tokens,
    /// L2-normalized.
    fn embed(&self, text: &str) -> Result<Vec<f32>, EngineError> {
        let ids = self.prompter.prompt_tokens(text);
        if ids.is_empty() {
            return Err(EngineError::InvalidInput("cannot embed empty text".into()));
        }
        let context = self.model.config().context_length;
        if ids.len() > context {
            return Err(EngineError::InvalidInput(format!(
                "the text has {} tokens; the model's context holds {context}",
                ids.len(),
            )));
        }
        let mut seq = self.model.new_sequence(ids.len());
        let mut sum = vec![0f32; self.model.config().n_embd];
        let states = self.model.hidden_states(&mut seq, &ids)?;
        for hidden in states.chunks_exact(sum.len()) {
            sum.iter_mut().zip(hidden).for_each(|(s, h)| *s += h);
        }
        let norm = sum
            .iter()
            .map(|v| v * v)
            .sum::<f32>()
            .sqrt()
            .max(f32::MIN_POSITIVE);
        sum.iter_mut().for_each(|v| *v /= norm);
        Ok(sum)
    }

    /// Queues `request` on this model's batcher: the one way every async
    /// caller (the server, guests' `llm` calls, pipeline steps) generates.
    fn start(&self, request: Request, done: Completer) {
        let Request {
            prompt,
            params,
            tenant,
            weight,
            sink,
            constraint,
            adapter,
            cancel,
        } = request;
        self.batcher.submit(Job {
            prompt,
            params,
            tenant,
            weight,
            cancel,
            sink,
            constraint,
            adapter,
            done: Box::new(move |r| done.complete(r)),
        });
    }

    fn decoder(&self, adapter: Option<Arc<LoraAdapter>>) -> Result<Box<dyn Decoder>, EngineError> {
        let capacity = self.prompter.info().context_length;
        let sequence = match adapter {
            None => self.model.new_sequence(capacity),
            Some(adapter) => self.model.new_adapted_sequence(capacity, adapter)?,
        };
        Ok(Box::new(ModelDecoder {
            model: self.model.clone(),
            sequence,
        }))
    }

    fn device_bytes(&self) -> u64 {
        self.model.device_bytes()
    }

    fn batch(&self) -> BatchStatus {
        self.batcher().load().status()
    }
}

/// A [`Decoder`] over one sequence of a loaded model.
struct ModelDecoder {
    model: Arc<Model>,
    sequence: Sequence,
}

impl Decoder for ModelDecoder {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::InvalidInput("no tokens to decode".into()));
        }
        Ok(self.model.forward(&mut self.sequence, tokens)?)
    }

    fn truncate(&mut self, len: usize) {
        self.sequence.truncate(len);
    }
}
