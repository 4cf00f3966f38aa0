//! Tokenizers built from GGUF metadata: byte-level BPE (`tokenizer.ggml.model
//! = gpt2`) and SentencePiece (`llama`), matching llama.cpp token for token.

mod bpe;
mod pretokenize;
mod spm;
mod vocab;

use crate::gguf::{GgufError, GgufFile};

pub use pretokenize::PreTokenizer;
pub use vocab::{TokenKind, Vocab};

/// Why a tokenizer could not be built from a model file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A metadata key is missing or malformed.
    #[error("tokenizer metadata: {0}")]
    Metadata(#[from] GgufError),
    /// The file asks for a tokenizer this engine does not implement.
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    /// The vocabulary is inconsistent.
    #[error("invalid vocabulary: {0}")]
    Invalid(String),
}

enum Model {
    Bpe(bpe::Bpe),
    SentencePiece(spm::SentencePiece),
}

/// A model's tokenizer.
pub struct Tokenizer {
    vocab: Vocab,
    model: Model,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("tokens", &self.vocab.len())
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by `file`'s `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        let vocab = Vocab::from_gguf(file)?;
        let model = match file.get_str("tokenizer.ggml.model")? {
            "gpt2" => {
                // A file without a pre-tokenizer gets llama.cpp's default.
                let pre = file
                    .get("tokenizer.ggml.pre")
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                let pre = PreTokenizer::from_name(pre)?;
                Model::Bpe(bpe::Bpe::from_gguf(file, &vocab, pre, bpe::Symbols::Bytes)?)
            }
            "gemma4" => {
                let pre = PreTokenizer::from_name("gemma4")?;
                Model::Bpe(bpe::Bpe::from_gguf(file, &vocab, pre, bpe::Symbols::Chars)?)
            }
            "llama" => Model::SentencePiece(spm::SentencePiece::from_gguf(file, &vocab)?),
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "tokenizer model `{other}`"
                )));
            }
        };
        Ok(Tokenizer { vocab, model })
    }

    /// The vocabulary.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// Token ids of `text`. With `parse_special`, control tokens written in the
    /// text (such as `<|im_start|>`) become their ids; otherwise they are plain text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        self.encode_segments(self.vocab.split_specials(text, parse_special))
    }

    /// Token ids of `text` with control tokens parsed everywhere except in
    /// `text_spans` (sorted, disjoint byte ranges read as plain text).
    pub fn encode_with_text_spans(
        &self,
        text: &str,
        text_spans: &[std::ops::Range<usize>],
    ) -> Vec<u32> {
        self.encode_segments(self.vocab.split_specials_outside(text, text_spans))
    }

    fn encode_segments(&self, segments: Vec<(&str, Option<u32>)>) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut after_special = true;
        for (segment, special) in segments {
            match special {
                Some(id) => ids.push(id),
                None => match &self.model {
                    Model::Bpe(bpe) => bpe.encode(&self.vocab, segment, &mut ids),
                    Model::SentencePiece(spm) => {
                        spm.encode(&self.vocab, segment, after_special, &mut ids)
                    }
                },
            }
            after_special = special.is_some();
        }
        ids
    }

    /// Token ids of a prompt: the BOS token if the model wants one, then `text`
    /// with special tokens parsed.
    pub fn encode_prompt(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        if self.vocab.add_bos()
            && let Some(bos) = self.vocab.bos()
        {
            ids.push(bos);
        }
        ids.extend(self.encode(text, true));
        ids
    }

    /// The bytes token `id` stands for (control tokens give none).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match &self.model {
            Model::Bpe(bpe) => bpe.token_bytes(&self.vocab, id),
            Model::SentencePiece(spm) => spm.token_bytes(&self.vocab, id),
        }
    }

    /// The text of `ids` (invalid UTF-8 from partial characters is replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| self.token_bytes(id)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufWriter, MetaValue, MetaValueType};

    fn strings(items: &[&str]) -> MetaValue {
        MetaValue::Array(
            MetaValueType::String,
            items
                .iter()
                .map(|s| MetaValue::String(s.to_string()))
                .collect(),
        )
    }

    fn build(w: &GgufWriter) -> Tokenizer {
        Tokenizer::from_gguf(&GgufFile::from_bytes(w.to_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn bpe_merges_by_rank_and_parses_specials() {
        // Byte-level: ' ' is 'Ġ'. Merges: "Ġ a" (rank 0), "a b" (1), "Ġa b" (2), "ab c" (3).
        let tokens = ["<|end|>", "a", "b", "c", "Ġ", "ab", "Ġa", "Ġab", "abc", "!"];
        let mut w = GgufWriter::new();
        w.meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
            .meta("tokenizer.ggml.pre", MetaValue::String("gpt-2".into()))
            .meta("tokenizer.ggml.tokens", strings(&tokens))
            .meta(
                "tokenizer.ggml.token_type",
                MetaValue::Array(
                    MetaValueType::I32,
                    [3, 1, 1, 1, 1, 1, 1, 1, 1, 1].map(MetaValue::I32).to_vec(),
                ),
            )
            .meta(
                "tokenizer.ggml.merges",
                strings(&["Ġ a", "a b", "Ġa b", "ab c"]),
            )
            .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(0));
        let t = build(&w);
        // "abc ab!" -> words "abc", " ab", "!". In " ab", "Ġ a" outranks "a b",
        // so the word becomes "Ġa" + "b" and then "Ġab".
        assert_eq!(t.encode("abc ab!", false), vec![8, 7, 9]);
        assert_eq!(t.decode(&[8, 7, 9]), "abc ab!");
        // The control token is text unless specials are parsed.
        assert_eq!(t.encode("a<|end|>", true), vec![1, 0]);
        assert_ne!(t.encode("a<|end|>", false), vec![1, 0]);
        assert!(t.vocab().is_end_of_generation(0));
        assert!(!t.vocab().add_bos());
    }

    /// A byte-level vocabulary with `specials` control tokens starting
    /// with `<` (Gemma has thousands), and `<`, `a`, `b` as text.
    fn many_specials(specials: usize) -> Tokenizer {
        let mut tokens: Vec<String> = ["<", "a", "b", "Ġ"].map(String::from).to_vec();
        let mut types = vec![1, 1, 1, 1];
        for i in 0..specials {
            tokens.push(format!("<special_{i}>"));
            types.push(3);
        }
        tokens.push("<user>".into());
        types.push(4);
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let mut w = GgufWriter::new();
        w.meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
            .meta("tokenizer.ggml.pre", MetaValue::String("gpt-2".into()))
            .meta("tokenizer.ggml.tokens", strings(&refs))
            .meta(
                "tokenizer.ggml.token_type",
                MetaValue::Array(
                    MetaValueType::I32,
                    types.into_iter().map(MetaValue::I32).collect(),
                ),
            )
            .meta("tokenizer.ggml.merges", strings(&[]));
        build(&w)
    }

    #[test]
    fn adversarial_text_tokenizes_in_linear_time() {
        // 1 MiB of `<` against 5000 specials starting with `<`: every
        // position starts a special's prefix. A scan of the specials per
        // position took minutes; the trie takes one step per position.
        let t = many_specials(5000);
        let text = "<".repeat(1 << 20);
        assert_eq!(t.encode(&text, true).len(), 1 << 20);
    }

    #[test]
    fn control_tokens_inside_text_spans_stay_text() {
        let t = many_specials(3);
        let control = 4; // `<special_0>`
        let user = 7; // `<user>`, user-defined: matched everywhere
        let text = "<special_0>a<special_0>b<user>";
        assert_eq!(t.encode(text, true), vec![control, 1, control, 2, user]);
        // The second `<special_0>` lies in a text span: plain characters.
        let ids = t.encode_with_text_spans(text, std::slice::from_ref(&(12..30)));
        assert_eq!(ids[..2], [control, 1]);
        assert!(!ids[2..].contains(&control), "{ids:?}");
        assert_eq!(ids.last(), Some(&user));
        // A control token crossing into a span is not one either.
        let ids = t.encode_with_text_spans("<special_0>", std::slice::from_ref(&(5..11)));
        assert!(!ids.contains(&control), "{ids:?}");
        assert!(t.vocab().has_control_text("x<special_2>"));
        assert!(!t.vocab().has_control_text("x<user><special_"));
    }

    #[test]
    fn sentencepiece_prefers_high_scores_and_falls_back_to_bytes() {
        let mut tokens = vec!["<unk>", "<s>", "</s>", "▁", "h", "i", "hi", "▁hi", "▁h"];
        let bytes: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
        tokens.extend(bytes.iter().map(String::as_str));
        let mut scores = vec![0.0f32, 0.0, 0.0, -1.0, -2.0, -2.0, -3.0, -1.5, -5.0];
        scores.extend(std::iter::repeat_n(0.0, 256));
        let mut types = vec![2, 3, 3, 1, 1, 1, 1, 1, 1];
        types.extend(std::iter::repeat_n(6, 256));
        let mut w = GgufWriter::new();
        w.meta("tokenizer.ggml.model", MetaValue::String("llama".into()))
            .meta("tokenizer.ggml.tokens", strings(&tokens))
            .meta(
                "tokenizer.ggml.scores",
                MetaValue::Array(
                    MetaValueType::F32,
                    scores.into_iter().map(MetaValue::F32).collect(),
                ),
            )
            .meta(
                "tokenizer.ggml.token_type",
                MetaValue::Array(
                    MetaValueType::I32,
                    types.into_iter().map(MetaValue::I32).collect(),
                ),
            )
            .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
            .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(2));
        let t = build(&w);
        // With the default space prefix: "▁hi" (score -1.5 beats "▁h" at -5 and "hi" at -3... merged via "hi").
        assert_eq!(t.encode_prompt("hi"), vec![1, 7]);
        // "é" has no token: two byte tokens.
        let ids = t.encode("hé", false);
        assert_eq!(&ids[ids.len() - 2..], &[9 + 0xC3, 9 + 0xA9]);
        assert_eq!(t.decode(&ids), " hé");
    }
}
