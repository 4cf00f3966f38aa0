//! The text side of a GGUF model (its tokenizer, chat template and shape),
//! built from the file's metadata without loading a weight.

use std::sync::{Arc, OnceLock};

use crate::arch::ModelConfig;
use crate::chat::tools::{Tool, ToolSyntax};
use crate::chat::{ChatMessage, ChatTemplate};
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;

use super::{Constraint, ConstraintCompiler, ConstraintSpec, EngineError, EngineInfo, Prompter};

/// A GGUF model's [`Prompter`]: kept by the host while the weights are
/// unloaded, and shared with the [`LoadedModel`](super::LoadedModel) when
/// they are loaded.
pub struct GgufPrompter {
    info: EngineInfo,
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    /// Built on the first constrained request (a trie of the vocabulary).
    constraints: OnceLock<Result<ConstraintCompiler, String>>,
}

impl std::fmt::Debug for GgufPrompter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufPrompter")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl GgufPrompter {
    /// Reads the tokenizer, chat template and shape of the model in `file`.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, EngineError> {
        let config = ModelConfig::from_gguf(file)?;
        let tokenizer = Arc::new(Tokenizer::from_gguf(file)?);
        let template = ChatTemplate::from_gguf(file);
        let weight_bytes = file
            .tensors()
            .iter()
            .map(|t| file.tensor_bytes(t).len() as u64)
            .sum();
        let info = EngineInfo {
            architecture: config.architecture.clone(),
            context_length: config.context_length,
            vocab_size: config.vocab_size,
            embedding_length: config.n_embd,
            weight_bytes,
        };
        Ok(GgufPrompter {
            info,
            tokenizer,
            template,
            constraints: OnceLock::new(),
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }
}

impl Prompter for GgufPrompter {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// No token stands for more than the vocabulary's longest token, so a
    /// longer text is too long for certain, and can be refused before
    /// tokenizing it.
    fn max_prompt_bytes(&self) -> usize {
        self.info
            .context_length
            .saturating_mul(self.tokenizer.vocab().max_token_bytes())
    }

    fn prompt_tokens(&self, prompt: &str) -> Vec<u32> {
        self.tokenizer.encode_prompt(prompt)
    }

    fn tokenize(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode(text, false)
    }

    fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError> {
        let vocab = self.tokenizer.vocab().len();
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(self.tokenizer.decode(tokens))
    }

    fn chat_tokens(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
    ) -> Result<Vec<u32>, EngineError> {
        // Contents are text: control tokens count only in the template's own
        // markers, so a message cannot fake a turn of another role. Tools and
        // calls are printed as JSON by the template, where they cannot be
        // told apart: they may hold no control token's text at all.
        let vocab = self.tokenizer.vocab();
        for tool in tools {
            if vocab.has_control_text(&serde_json::to_string(tool).unwrap_or_default()) {
                return Err(EngineError::InvalidInput(format!(
                    "the tool `{}` holds a control token's text",
                    tool.name
                )));
            }
        }
        for m in messages {
            let marked = |text: &str| vocab.has_control_text(text);
            if m.tool_calls
                .iter()
                .any(|c| marked(&c.id) || marked(&c.name) || marked(&c.arguments.to_string()))
                || m.tool_call_id.as_deref().is_some_and(marked)
                || m.name.as_deref().is_some_and(marked)
            {
                return Err(EngineError::InvalidInput(format!(
                    "a `{}` message's tool call, id or name holds a control token's text",
                    m.role
                )));
            }
        }
        let (text, contents) = self.template.render_with_contents(messages, tools)?;
        let mut ids = match contents {
            Some(mut spans) => {
                spans.sort_by_key(|s| s.start);
                self.tokenizer.encode_with_text_spans(&text, &spans)
            }
            None => {
                if let Some(m) = messages.iter().find(|m| vocab.has_control_text(&m.content)) {
                    return Err(EngineError::InvalidInput(format!(
                        "a `{}` message holds a control token's text, which this model's chat template cannot keep apart from its own markers",
                        m.role
                    )));
                }
                self.tokenizer.encode(&text, true)
            }
        };
        if let Some(bos) = vocab.bos().filter(|_| vocab.add_bos())
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    fn tool_syntax(&self) -> ToolSyntax {
        self.template.tool_syntax()
    }

    fn constrain(&self, spec: &ConstraintSpec) -> Result<Constraint, EngineError> {
        let compiler = self
            .constraints
            .get_or_init(|| ConstraintCompiler::new(&self.tokenizer).map_err(|e| e.to_string()));
        match compiler {
            Ok(compiler) => compiler.compile(spec),
            Err(e) => Err(EngineError::InvalidInput(e.clone())),
        }
    }
}
