//! Pre-tokenization: splitting text into words before BPE, by the regular
//! expressions each `tokenizer.ggml.pre` names, as llama.cpp does.
//!
//! The expressions are the Hugging Face tokenizers' own (in llama.cpp's
//! spelling, with `(?i:...)` written out); a vocabulary lists one or more,
//! and each splits the pieces the previous one left: every match is a piece
//! and so is the text between matches. They need look-ahead (`\s+(?!\S)`),
//! which the `regex` crate lacks, so they run on `fancy-regex`, which hands
//! everything but the look-ahead to `regex`. This replaced a hand-written
//! GPT-2 splitter that was about 20% faster (134 against 164 ms for 1 MB of
//! mixed text, release build): a few microseconds per prompt, for one
//! mechanism that matches llama.cpp on every vocabulary of its test set
//! (`models/tests/llama_cpp_vocabs.rs`).

use fancy_regex::Regex;

use super::TokenizerError;

/// Llama 3's family of pre-tokenizer names: one expression, whole-word
/// tokens taken before merging, and a BOS by default (llama.cpp's rules).
pub(crate) const LLAMA3_GROUP: &[&str] = &["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"];

/// Contractions, spelled case-insensitively.
const CONTRACTIONS: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])";

/// GPT-2's expression.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// DeepSeek LLM's letters (written out by code point: some are canonically
/// equivalent to others, and editors would merge them).
const DEEPSEEK_LETTERS: &str = "\\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+";

/// DeepSeek LLM's ASCII and full-width punctuation.
const DEEPSEEK_PUNCTUATION: &str =
    "\\s?[!-/:-~\u{FF01}-\u{FF0F}\u{FF1A}-\u{FF5E}\u{2018}-\u{201F}\u{3000}-\u{3002}]+";

/// DeepSeek's CJK, Hangul and other East Asian runs.
const CJK: &str = "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+";

/// The expressions of a `tokenizer.ggml.pre` name, in llama.cpp's groups, or
/// `None` for a name Realm does not know.
fn expressions(name: &str) -> Option<Vec<String>> {
    let llama3 = format!(
        r"{CONTRACTIONS}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    let qwen2 = format!(
        r"{CONTRACTIONS}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    let qwen35 = format!(
        r"{CONTRACTIONS}|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}]+|\p{{N}}| ?[^\s\p{{L}}\p{{M}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    let list: &[&str] = match name {
        "default" => &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
        _ if LLAMA3_GROUP.contains(&name) => return Some(vec![llama3]),
        "dbrx" | "smaug-bpe" => return Some(vec![llama3]),
        "deepseek-llm" => &[
            r"[\r\n]",
            DEEPSEEK_LETTERS,
            DEEPSEEK_PUNCTUATION,
            r"\s+$",
            CJK,
            r"\p{N}+",
        ],
        "deepseek-coder" => &[r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK, r"\p{N}"],
        "falcon" => &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"],
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            &[r"\p{N}", GPT2]
        }
        "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" => &[GPT2],
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => return Some(vec![qwen2]),
        "qwen35" => return Some(vec![qwen35]),
        // Gemma 4 merges over whole lines: its spaces are `▁` already.
        "gemma4" => &[r"[^\n]+|[\n]+"],
        _ => return None,
    };
    Some(list.iter().map(|s| s.to_string()).collect())
}

/// How a BPE vocabulary splits text into words.
#[derive(Debug, Clone)]
pub struct PreTokenizer {
    regexes: Vec<Regex>,
    ignore_merges: bool,
}

impl PreTokenizer {
    /// Every `tokenizer.ggml.pre` name Realm knows.
    pub const NAMES: &[&str] = &[
        "default",
        "llama3",
        "llama-v3",
        "llama-bpe",
        "falcon3",
        "pixtral",
        "dbrx",
        "smaug-bpe",
        "deepseek-llm",
        "deepseek-coder",
        "falcon",
        "starcoder",
        "refact",
        "command-r",
        "smollm",
        "codeshell",
        "exaone",
        "minerva-7b",
        "gpt-2",
        "phi-2",
        "mpt",
        "olmo",
        "jais",
        "qwen2",
        "deepseek-r1-qwen",
        "stablelm2",
        "qwen35",
        "gemma4",
    ];

    /// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre = name`; an
    /// unknown name is an error that lists the known ones.
    pub fn from_name(name: &str) -> Result<Self, TokenizerError> {
        let expressions = expressions(name).ok_or_else(|| {
            TokenizerError::Unsupported(format!(
                "BPE pre-tokenizer `{name}` (tokenizer.ggml.pre); known: {}",
                Self::NAMES.join(", ")
            ))
        })?;
        let regexes = expressions
            .iter()
            .map(|e| {
                Regex::new(e).map_err(|err| {
                    TokenizerError::Invalid(format!("pre-tokenizer `{name}`: {err}"))
                })
            })
            .collect::<Result<_, _>>()?;
        // Llama 3's tokenizer takes a word that is a token as it is, even
        // where its merges would split it.
        Ok(PreTokenizer {
            regexes,
            ignore_merges: LLAMA3_GROUP.contains(&name),
        })
    }

    /// Whether a word that is a token is taken whole, before any merge.
    pub fn ignores_merges(&self) -> bool {
        self.ignore_merges
    }

    /// Splits `text` into words, in order, covering all of it.
    pub fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut words = vec![text];
        for regex in &self.regexes {
            let mut next = Vec::with_capacity(words.len());
            for word in words {
                split_by(regex, word, &mut next);
            }
            words = next;
        }
        words.retain(|w| !w.is_empty());
        words
    }
}

/// Pushes the matches of `regex` in `text` and the text between them.
fn split_by<'t>(regex: &Regex, text: &'t str, out: &mut Vec<&'t str>) {
    let mut start = 0;
    for m in regex.find_iter(text) {
        // The expressions are simple enough never to hit the backtrack
        // limit; if one did, the rest stays one word.
        let Ok(m) = m else { break };
        if m.start() > start {
            out.push(&text[start..m.start()]);
        }
        if !m.as_str().is_empty() {
            out.push(m.as_str());
        }
        start = m.end();
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_pattern() {
        let words = PreTokenizer::from_name("gpt-2")
            .unwrap()
            .split("Hello world's  3.14 foo!!  \n bar   ");
        assert_eq!(
            words,
            vec![
                "Hello", " world", "'s", " ", " 3", ".", "14", " foo", "!!", "  \n", " bar", "   "
            ]
        );
    }

    #[test]
    fn smollm_splits_digits() {
        let words = PreTokenizer::from_name("smollm")
            .unwrap()
            .split("Q: What is 12 + 7?\nA:");
        assert_eq!(
            words,
            vec![
                "Q", ":", " What", " is", " ", "1", "2", " +", " ", "7", "?", "\n", "A", ":"
            ]
        );
    }

    #[test]
    fn llama3_groups_digits_by_three_and_keeps_newlines() {
        let words = PreTokenizer::from_name("llama-bpe")
            .unwrap()
            .split("I'LL pay 1234567\n\n  now");
        assert_eq!(
            words,
            vec![
                "I", "'LL", " pay", " ", "123", "456", "7", "\n\n", " ", " now"
            ]
        );
    }

    #[test]
    fn covers_all_text_and_refuses_unknown_names() {
        let text = "naïve café — 東京 2024年\t\tok";
        for name in ["default", "llama-bpe", "qwen2", "deepseek-llm", "falcon"] {
            let words = PreTokenizer::from_name(name).unwrap().split(text);
            assert_eq!(words.concat(), text, "{name}");
        }
        assert!(PreTokenizer::from_name("no-such-pre").is_err());
        for name in PreTokenizer::NAMES {
            assert!(PreTokenizer::from_name(name).is_ok(), "{name}");
        }
    }
}
