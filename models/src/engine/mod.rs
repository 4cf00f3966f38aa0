//! Text generation on a loaded model: prompt in, text out, piece by piece.

mod bench;
mod sampler;
mod stream;

use std::path::Path;
use std::sync::Arc;

use crate::arch::{ComputeDevice, Model, ModelError};
use crate::chat::{ChatError, ChatMessage, ChatTemplate};
use crate::gguf::{GgufError, GgufFile};
use crate::tokenizer::{Tokenizer, TokenizerError};

pub use bench::{BenchReport, bench, bench_prompt};
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
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Most new tokens.
    pub max_tokens: usize,
    /// How tokens are picked.
    pub sampling: SamplingParams,
    /// Generation ends before any of these strings.
    pub stop: Vec<String>,
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
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Why it ended.
    pub finish: FinishReason,
}

/// A model ready to generate: weights, tokenizer and chat template.
pub struct LoadedModel {
    model: Model,
    tokenizer: Tokenizer,
    template: ChatTemplate,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("model", &self.model)
            .finish()
    }
}

impl LoadedModel {
    /// Maps the model at `path` and loads it onto `device`.
    pub fn open(path: &Path, device: ComputeDevice) -> Result<Self, EngineError> {
        let file = Arc::new(GgufFile::open(path)?);
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let template = ChatTemplate::from_gguf(&file);
        let model = Model::load(file, device)?;
        Ok(LoadedModel {
            model,
            tokenizer,
            template,
        })
    }

    /// The transformer.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of a raw prompt (BOS added if the model wants one).
    pub fn prompt_tokens(&self, prompt: &str) -> Vec<u32> {
        self.tokenizer.encode_prompt(prompt)
    }

    /// Token ids of a chat, formatted with the model's template, ready for the assistant's reply.
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, EngineError> {
        let text = self.template.render(messages)?;
        let mut ids = self.tokenizer.encode(&text, true);
        let vocab = self.tokenizer.vocab();
        if let Some(bos) = vocab.bos().filter(|_| vocab.add_bos())
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// A sentence embedding of `text`: the mean of the final hidden states over
    /// its tokens, L2-normalized.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, EngineError> {
        let ids = self.tokenizer.encode_prompt(text);
        if ids.is_empty() {
            return Err(EngineError::InvalidInput("cannot embed empty text".into()));
        }
        if ids.len() > self.model.config().context_length {
            return Err(EngineError::InvalidInput(format!(
                "the text has {} tokens; the model's context holds {}",
                ids.len(),
                self.model.config().context_length
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

    /// Generates from `prompt` (token ids). `on_text` receives each new piece of
    /// text as soon as it is certain (never part of a stop string) and returns
    /// `false` to cancel.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Completion, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::InvalidInput("the prompt is empty".into()));
        }
        let context = self.model.config().context_length;
        if prompt.len() >= context {
            return Err(EngineError::InvalidInput(format!(
                "the prompt has {} tokens; the model's context holds {context}",
                prompt.len()
            )));
        }
        let max_tokens = params.max_tokens.min(context - prompt.len());
        let mut seq = self.model.new_sequence(prompt.len() + max_tokens);
        let mut logits = self.model.forward(&mut seq, prompt)?;
        let mut sampler = Sampler::new(params.sampling.clone());
        let mut history = prompt.to_vec();
        let mut text = TextStream::new(&params.stop);
        let mut finish = FinishReason::Length;
        let mut generated = 0;
        while generated < max_tokens {
            let token = sampler.sample(&logits, &history);
            generated += 1;
            history.push(token);
            if self.tokenizer.vocab().is_end_of_generation(token) {
                finish = FinishReason::Stop;
                break;
            }
            let (piece, stopped) = text.push(&self.tokenizer.token_bytes(token));
            if !piece.is_empty() && !on_text(&piece) {
                finish = FinishReason::Cancelled;
                break;
            }
            if stopped {
                finish = FinishReason::Stop;
                break;
            }
            if generated < max_tokens {
                logits = self.model.forward(&mut seq, &[token])?;
            }
        }
        if finish != FinishReason::Cancelled {
            let rest = text.finish();
            if !rest.is_empty() {
                on_text(&rest);
            }
        }
        Ok(Completion {
            text: text.into_text(),
            prompt_tokens: prompt.len(),
            completion_tokens: generated,
            finish,
        })
    }
}
