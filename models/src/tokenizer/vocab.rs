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
    /// Control and user-defined tokens, for matching in text.
    specials: SpecialTrie,
    /// The longest token text, in bytes: no token covers more input bytes.
    max_token_bytes: usize,
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
        let mut specials = SpecialTrie::default();
        for (id, (text, kind)) in tokens.iter().zip(&kinds).enumerate() {
            if matches!(kind, TokenKind::Control | TokenKind::UserDefined) && !text.is_empty() {
                specials.insert(text, id as u32, *kind);
            }
        }
        let max_token_bytes = tokens.iter().map(String::len).max().unwrap_or(1).max(1);
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
        // Without the key, llama.cpp's defaults: SentencePiece and Llama 3's
        // BPE family add a BOS; Gemma 4 always does.
        let model = file.get_str("tokenizer.ggml.model").ok();
        let pre = file.get("tokenizer.ggml.pre").and_then(|v| v.as_str());
        let bos_by_default = model == Some("llama")
            || pre.is_some_and(|p| super::pretokenize::LLAMA3_GROUP.contains(&p));
        let add_bos = model == Some("gemma4")
            || file
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(bos_by_default);
        Ok(Vocab {
            tokens,
            kinds,
            scores,
            index,
            specials,
            max_token_bytes,
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

    /// The most input bytes one token can stand for: a text longer than
    /// `n` times this has more than `n` tokens, without tokenizing it.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// Splits `text` into plain segments and special tokens: at each
    /// position, the longest special token allowed there. User-defined tokens
    /// are always matched; control tokens only with `parse_special` (as
    /// llama.cpp does). Linear in the text (each position walks at most the
    /// longest special token's bytes), whatever the text holds.
    pub(crate) fn split_specials<'t>(
        &self,
        text: &'t str,
        parse_special: bool,
    ) -> Vec<(&'t str, Option<u32>)> {
        let whole = 0..text.len();
        let spans: &[std::ops::Range<usize>] = if parse_special {
            &[]
        } else {
            std::slice::from_ref(&whole)
        };
        self.split_specials_outside(text, spans)
    }

    /// [`Vocab::split_specials`] parsing control tokens only where they lie
    /// wholly outside `text_spans` (sorted, disjoint byte ranges that are
    /// text only, such as chat messages' contents).
    pub(crate) fn split_specials_outside<'t>(
        &self,
        text: &'t str,
        text_spans: &[std::ops::Range<usize>],
    ) -> Vec<(&'t str, Option<u32>)> {
        if self.specials.is_empty() {
            return vec![(text, None)];
        }
        let mut out = Vec::new();
        let mut plain_start = 0;
        let mut i = 0;
        let mut span = 0;
        let bytes = text.as_bytes();
        while i < text.len() {
            while span < text_spans.len() && text_spans[span].end <= i {
                span += 1;
            }
            // Control tokens may match up to the next text span's start.
            let control_end = match text_spans.get(span) {
                Some(s) if s.start <= i => i,
                Some(s) => s.start,
                None => text.len(),
            };
            let control = self.specials.longest(&bytes[i..control_end], true);
            let defined = self.specials.longest(&bytes[i..], false);
            let found = match (control, defined) {
                (Some(c), Some(d)) => Some(if c.0 >= d.0 { c } else { d }),
                (c, d) => c.or(d),
            };
            if let Some((len, id)) = found {
                if plain_start < i {
                    out.push((&text[plain_start..i], None));
                }
                out.push((&text[i..i + len], Some(id)));
                i += len;
                plain_start = i;
            } else {
                // Next character boundary.
                i += 1;
                while !text.is_char_boundary(i) {
                    i += 1;
                }
            }
        }
        if plain_start < text.len() {
            out.push((&text[plain_start..], None));
        }
        out
    }

    /// True if `text` holds a control token's text.
    pub fn has_control_text(&self, text: &str) -> bool {
        let bytes = text.as_bytes();
        (0..bytes.len())
            .filter(|&i| text.is_char_boundary(i))
            .any(|i| {
                self.specials.longest(&bytes[i..], true).is_some()
                    && self.specials.longest(&bytes[i..], false).is_none()
            })
    }
}

/// Special tokens as a byte trie: finding the longest one at a position
/// costs its length, however many specials share a prefix (Gemma has
/// thousands starting with `<`; a list scan per `<` made 1 MiB of them take
/// seconds).
#[derive(Debug, Clone, Default)]
struct SpecialTrie {
    nodes: Vec<TrieNode>,
}

#[derive(Debug, Clone, Default)]
struct TrieNode {
    /// Children by byte, sorted.
    children: Vec<(u8, u32)>,
    /// Tokens ending here, lowest id first: (id, kind).
    tokens: Vec<(u32, TokenKind)>,
}

impl SpecialTrie {
    fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn insert(&mut self, text: &str, id: u32, kind: TokenKind) {
        if self.nodes.is_empty() {
            self.nodes.push(TrieNode::default());
        }
        let mut node = 0usize;
        for &b in text.as_bytes() {
            node = match self.nodes[node].children.binary_search_by_key(&b, |c| c.0) {
                Ok(k) => self.nodes[node].children[k].1 as usize,
                Err(k) => {
                    let child = self.nodes.len();
                    self.nodes.push(TrieNode::default());
                    self.nodes[node].children.insert(k, (b, child as u32));
                    child
                }
            };
        }
        self.nodes[node].tokens.push((id, kind));
    }

    /// The longest special token allowed at the start of `text`: its length
    /// in bytes and id.
    fn longest(&self, text: &[u8], parse_special: bool) -> Option<(usize, u32)> {
        let mut node = 0usize;
        let mut best = None;
        for (depth, &b) in text.iter().enumerate() {
            let children = &self.nodes.get(node)?.children;
            let Ok(k) = children.binary_search_by_key(&b, |c| c.0) else {
                break;
            };
            node = children[k].1 as usize;
            if let Some(&(id, _)) = self.nodes[node]
                .tokens
                .iter()
                .find(|(_, kind)| parse_special || *kind == TokenKind::UserDefined)
            {
                best = Some((depth + 1, id));
            }
        }
        best
    }
}
