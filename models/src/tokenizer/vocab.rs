//! The vocabulary shared by every tokenizer model: token texts, kinds, scores
//! and special ids.

use std::collections::HashMap;

use crate::gguf::GgufFile;

use super::TokenizerError;

/// Texts of special tokens that end generation (llama.cpp's list).
const END_OF_GENERATION: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "</s>",
    "<|fim_pad|>",
    "<fim-pad>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];

/// What a token is for (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Ordinary text.
    Normal,
    /// The unknown-token placeholder.
    Unknown,
    /// A control token such as `<|im_start|>` or `<eos>`.
    Control,
    /// A token the model author added, matched literally in text.
    UserDefined,
    /// Never produced.
    Unused,
    /// A raw byte, `<0xAB>` (SentencePiece byte fallback).
    Byte,
}

/// A model's vocabulary.
#[derive(Debug, Clone)]
pub struct Vocab {
    tokens: Vec<String>,
    kinds: Vec<TokenKind>,
    scores: Vec<f32>,
    index: HashMap<String, u32>,
    /// Control and user-defined tokens by first character, longest first, for matching in text.
    specials: HashMap<char, Vec<(String, u32, TokenKind)>>,
    bos: Option<u32>,
    eos: Option<u32>,
    end_of_generation: Vec<u32>,
    add_bos: bool,
}

impl Vocab {
    pub(crate) fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        let tokens: Vec<String> = file
            .get_array("tokenizer.ggml.tokens")?
            .iter()
            .map(|t| t.as_str().map(String::from))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                TokenizerError::Invalid("tokenizer.ggml.tokens holds non-strings".into())
            })?;
        if tokens.is_empty() || tokens.len() > u32::MAX as usize {
            return Err(TokenizerError::Invalid(format!("{} tokens", tokens.len())));
        }
        let kinds = match file.get("tokenizer.ggml.token_type") {
            None => vec![TokenKind::Normal; tokens.len()],
            Some(v) => {
                let items = v.as_array().ok_or_else(|| {
                    TokenizerError::Invalid("tokenizer.ggml.token_type is not an array".into())
                })?;
                if items.len() != tokens.len() {
                    return Err(TokenizerError::Invalid(
                        "token_type and tokens differ in length".into(),
                    ));
                }
                items
                    .iter()
                    .map(|t| match t.as_i64() {
                        Some(2) => TokenKind::Unknown,
                        Some(3) => TokenKind::Control,
                        Some(4) => TokenKind::UserDefined,
                        Some(5) => TokenKind::Unused,
                        Some(6) => TokenKind::Byte,
                        _ => TokenKind::Normal,
                    })
                    .collect()
            }
        };
        let scores = match file.get("tokenizer.ggml.scores") {
            None => vec![0.0; tokens.len()],
            Some(v) => {
                let items = v.as_array().ok_or_else(|| {
                    TokenizerError::Invalid("tokenizer.ggml.scores is not an array".into())
                })?;
                if items.len() != tokens.len() {
                    return Err(TokenizerError::Invalid(
                        "scores and tokens differ in length".into(),
                    ));
                }
                items
                    .iter()
                    .map(|s| s.as_f64().unwrap_or(0.0) as f32)
                    .collect()
            }
        };
        let mut index = HashMap::with_capacity(tokens.len());
        for (id, text) in tokens.iter().enumerate() {
            index.entry(text.clone()).or_insert(id as u32);
        }
        let mut specials: HashMap<char, Vec<(String, u32, TokenKind)>> = HashMap::new();
        for (id, (text, kind)) in tokens.iter().zip(&kinds).enumerate() {
            if let (TokenKind::Control | TokenKind::UserDefined, Some(first)) =
                (kind, text.chars().next())
            {
                specials
                    .entry(first)
                    .or_default()
                    .push((text.clone(), id as u32, *kind));
            }
        }
        for list in specials.values_mut() {
            list.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        }
        let id_of = |key: &str| -> Option<u32> {
            file.get(key)
                .and_then(|v| v.as_u64())
                .filter(|&id| (id as usize) < tokens.len())
                .map(|id| id as u32)
        };
        let bos = id_of("tokenizer.ggml.bos_token_id");
        let eos = id_of("tokenizer.ggml.eos_token_id");
        let mut end_of_generation: Vec<u32> = ["eos", "eot", "eom"]
            .iter()
            .filter_map(|k| id_of(&format!("tokenizer.ggml.{k}_token_id")))
            .collect();
        // As llama.cpp: special tokens whose text marks an end of turn, or a
        // fill-in-the-middle repository/pad token, also end generation.
        for (id, (text, kind)) in tokens.iter().zip(&kinds).enumerate() {
            if matches!(kind, TokenKind::Control | TokenKind::UserDefined)
                && END_OF_GENERATION.contains(&text.as_str())
            {
                end_of_generation.push(id as u32);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        let add_bos = file
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(file.get_str("tokenizer.ggml.model").ok() == Some("llama"));
        Ok(Vocab {
            tokens,
            kinds,
            scores,
            index,
            specials,
            bos,
            eos,
            end_of_generation,
            add_bos,
        })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True if the vocabulary is empty (never, for a loaded model).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The text of token `id`.
    pub fn text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The kind of token `id`.
    pub fn kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// The score of token `id` (SentencePiece merge priority).
    pub fn score(&self, id: u32) -> f32 {
        self.scores
            .get(id as usize)
            .copied()
            .unwrap_or(f32::NEG_INFINITY)
    }

    /// The id of the token whose text is `text`.
    pub fn id(&self, text: &str) -> Option<u32> {
        self.index.get(text).copied()
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Tokens that end generation.
    pub fn end_of_generation(&self) -> &[u32] {
        &self.end_of_generation
    }

    /// True if `id` ends generation.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    /// Whether prompts start with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Splits `text` into plain segments and special tokens. User-defined
    /// tokens are always matched; control tokens only with `parse_special`
    /// (as llama.cpp does).
    pub(crate) fn split_specials<'t>(
        &self,
        text: &'t str,
        parse_special: bool,
    ) -> Vec<(&'t str, Option<u32>)> {
        if self.specials.is_empty() {
            return vec![(text, None)];
        }
        let mut out = Vec::new();
        let mut plain_start = 0;
        let mut i = 0;
        while i < text.len() {
            let rest = &text[i..];
            let first = rest.chars().next().unwrap_or_default();
            let found = self.specials.get(&first).and_then(|list| {
                list.iter().find(|(s, _, kind)| {
                    (parse_special || *kind == TokenKind::UserDefined)
                        && rest.starts_with(s.as_str())
                })
            });
            if let Some((special, id, _)) = found {
                if plain_start < i {
                    out.push((&text[plain_start..i], None));
                }
                out.push((&text[i..i + special.len()], Some(*id)));
                i += special.len();
                plain_start = i;
            } else {
                i += first.len_utf8();
            }
        }
        if plain_start < text.len() {
            out.push((&text[plain_start..], None));
        }
        out
    }
}
