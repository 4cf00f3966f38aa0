//! From logits to text for one generation: the constraint's mask,
//! sampling, end-of-generation tokens, stop strings and the token limit.
//! Shared by the single-sequence path and the batcher, so both end
//! generations the same way.

use crate::tokenizer::Tokenizer;

use super::sampler::Sampler;
use super::stream::TextStream;
use super::{Completion, Constraint, EngineError, FinishReason, GenerateParams};

/// One generation's decoding state.
pub(crate) struct Decoder {
    sampler: Sampler,
    history: Vec<u32>,
    text: TextStream,
    prompt_tokens: usize,
    generated: usize,
    max_tokens: usize,
    finish: Option<FinishReason>,
    /// What the output must match, if anything.
    constraint: Option<Constraint>,
    /// Why the constraint could not go on (the generation fails).
    failed: Option<String>,
    /// Reused for masked logits.
    masked: Vec<f32>,
}

/// What one sampled token gave.
pub(crate) struct Decoded {
    /// Text that became final (may be empty).
    pub piece: String,
    /// The token to run next, or `None` when the generation has ended.
    pub next: Option<u32>,
}

impl Decoder {
    /// A decoder continuing `prompt` for at most `max_tokens` tokens, within
    /// `constraint` if there is one.
    pub(crate) fn new(
        prompt: &[u32],
        params: &GenerateParams,
        max_tokens: usize,
        constraint: Option<Constraint>,
    ) -> Self {
        Decoder {
            constraint,
            failed: None,
            masked: Vec::new(),
            sampler: Sampler::new(params.sampling.clone()),
            history: prompt.to_vec(),
            text: TextStream::new(&params.stop),
            prompt_tokens: prompt.len(),
            generated: 0,
            max_tokens,
            finish: (max_tokens == 0).then_some(FinishReason::Length),
        }
    }

    /// True once the generation has ended.
    pub(crate) fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Whether [`Decoder::decode`] would run without waiting for a mask
    /// (always, without a constraint).
    pub(crate) fn is_ready(&mut self) -> bool {
        self.constraint.as_mut().is_none_or(Constraint::is_ready)
    }

    /// Samples the next token from `logits` (the model's output after the
    /// last token run).
    pub(crate) fn decode(&mut self, logits: &[f32], tokenizer: &Tokenizer) -> Decoded {
        if self.finish.is_some() {
            return Decoded {
                piece: String::new(),
                next: None,
            };
        }
        let token = match &mut self.constraint {
            None => self.sampler.sample(logits, &self.history),
            Some(constraint) => {
                if let Err(e) = constraint.mask(logits, &mut self.masked) {
                    return self.fail(e);
                }
                if self.masked.iter().all(|l| *l == f32::NEG_INFINITY) {
                    return self.fail("the grammar allows no token here".into());
                }
                self.sampler.sample(&self.masked, &self.history)
            }
        };
        self.generated += 1;
        self.history.push(token);
        if tokenizer.vocab().is_end_of_generation(token) {
            self.finish = Some(FinishReason::Stop);
            return Decoded {
                piece: String::new(),
                next: None,
            };
        }
        let complete = match self.constraint.as_mut().map(|c| c.advance(token)) {
            Some(Err(e)) => return self.fail(e),
            Some(Ok(complete)) => complete,
            None => false,
        };
        let (piece, stopped) = self.text.push(&tokenizer.token_bytes(token));
        if stopped || complete {
            self.finish = Some(FinishReason::Stop);
        } else if self.generated >= self.max_tokens {
            self.finish = Some(FinishReason::Length);
        }
        Decoded {
            piece,
            next: self.finish.is_none().then_some(token),
        }
    }

    /// Ends the generation because its constraint cannot go on.
    fn fail(&mut self, why: String) -> Decoded {
        self.failed = Some(why);
        self.finish = Some(FinishReason::Stop);
        Decoded {
            piece: String::new(),
            next: None,
        }
    }

    /// Ends the generation at the caller's request.
    pub(crate) fn cancel(&mut self) {
        self.finish = Some(FinishReason::Cancelled);
    }

    /// The text still held back (none when cancelled) and the completion,
    /// or why the constraint failed.
    pub(crate) fn finish(mut self) -> (String, Result<Completion, EngineError>) {
        let finish = self.finish.unwrap_or(FinishReason::Cancelled);
        if let Some(why) = self.failed {
            let error = format!(
                "constrained decoding stopped after {} tokens: {why}",
                self.generated
            );
            return (String::new(), Err(EngineError::ConstraintFailed(error)));
        }
        let rest = if finish == FinishReason::Cancelled {
            String::new()
        } else {
            self.text.finish()
        };
        let completion = Completion {
            text: self.text.into_text(),
            prompt_tokens: self.prompt_tokens,
            cached_tokens: 0,
            completion_tokens: self.generated,
            finish,
        };
        (rest, Ok(completion))
    }
}
