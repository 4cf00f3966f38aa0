//! Byte-level BPE (GPT-2 style): bytes map to printable characters, words are
//! merged pairwise by merge rank, lowest rank (then leftmost) first.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use crate::gguf::GgufFile;

use super::TokenizerError;
use super::pretokenize::PreTokenizer;
use super::vocab::{TokenKind, Vocab};

/// GPT-2's reversible byte → character map: printable Latin-1 bytes map to
/// themselves, the rest to U+0100 and up.
fn byte_chars() -> [char; 256] {
    static TABLE: std::sync::LazyLock<[char; 256]> = std::sync::LazyLock::new(make_byte_chars);
    *TABLE
}

fn make_byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(next).expect("U+0100..U+0143 are chars");
            next += 1;
            c
        };
    }
    table
}

/// What BPE merges run over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Symbols {
    /// GPT-2's byte characters: every byte is a symbol (most vocabularies).
    Bytes,
    /// The text's own UTF-8 characters, spaces written `▁`, with `<0xXX>`
    /// tokens for characters outside the vocabulary (Gemma 4).
    Chars,
}

pub(crate) struct Bpe {
    pre: PreTokenizer,
    symbols: Symbols,
    /// (left, right) -> (rank, merged id)
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Token of each byte: its GPT-2 character's, or its `<0xXX>` token's.
    byte_tokens: [Option<u32>; 256],
    /// Character -> byte, for decoding.
    char_bytes: HashMap<char, u8>,
}

impl Bpe {
    pub(crate) fn from_gguf(
        file: &GgufFile,
        vocab: &Vocab,
        pre: PreTokenizer,
        symbols: Symbols,
    ) -> Result<Self, TokenizerError> {
        let chars = byte_chars();
        let mut byte_tokens = [None; 256];
        for (b, c) in chars.iter().enumerate() {
            byte_tokens[b] = match symbols {
                Symbols::Bytes => vocab.id(&c.to_string()),
                Symbols::Chars => vocab.id(&format!("<0x{b:02X}>")),
            };
        }
        let char_bytes = chars
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let mut merges = HashMap::new();
        for (rank, merge) in file.get_array("tokenizer.ggml.merges")?.iter().enumerate() {
            let merge = merge.as_str().ok_or_else(|| {
                TokenizerError::Invalid("tokenizer.ggml.merges holds non-strings".into())
            })?;
            // The separator is the first space after the first character: a
            // left side may itself be a space.
            let split = merge
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| (&merge[..i], &merge[i + 1..]));
            let Some((left, right)) = split else {
                return Err(TokenizerError::Invalid(format!(
                    "merge `{merge}` is not two tokens"
                )));
            };
            if let (Some(l), Some(r), Some(m)) = (
                vocab.id(left),
                vocab.id(right),
                vocab.id(&format!("{left}{right}")),
            ) {
                merges.entry((l, r)).or_insert((rank as u32, m));
            }
        }
        Ok(Bpe {
            pre,
            symbols,
            merges,
            byte_tokens,
            char_bytes,
        })
    }

    pub(crate) fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        match self.symbols {
            Symbols::Bytes => {
                let (byte_chars, mut chars) = (byte_chars(), String::new());
                for word in self.pre.split(text) {
                    if self.pre.ignores_merges() {
                        chars.clear();
                        chars.extend(word.bytes().map(|b| byte_chars[b as usize]));
                        if let Some(id) = vocab.id(&chars) {
                            out.push(id);
                            continue;
                        }
                    }
                    self.encode_word(vocab, word, out);
                }
            }
            Symbols::Chars => {
                let text = text.replace(' ', "\u{2581}");
                for word in self.pre.split(&text) {
                    // A run of newlines that is a token stays one.
                    match vocab.id(word) {
                        Some(id) if word.bytes().all(|b| b == b'\n') => out.push(id),
                        _ => self.encode_word(vocab, word, out),
                    }
                }
            }
        }
    }

    /// The starting symbols of `word`: (token, byte range), the token
    /// `None` for a character outside the vocabulary.
    fn symbols(&self, vocab: &Vocab, word: &str) -> Vec<(Option<u32>, usize, usize)> {
        match self.symbols {
            Symbols::Bytes => (0..word.len())
                .map(|i| (self.byte_tokens[word.as_bytes()[i] as usize], i, i + 1))
                .collect(),
            Symbols::Chars => word
                .char_indices()
                .map(|(i, c)| {
                    let end = i + c.len_utf8();
                    (vocab.id(&word[i..end]), i, end)
                })
                .collect(),
        }
    }

    fn encode_word(&self, vocab: &Vocab, word: &str, out: &mut Vec<u32>) {
        // Symbols as a doubly linked list over a vector; merged-away ones are
        // `alive == false`.
        let symbols = self.symbols(vocab, word);
        let mut ids: Vec<Option<u32>> = symbols.iter().map(|s| s.0).collect();
        let mut alive = vec![true; ids.len()];
        let n = ids.len();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<_>, ids: &[Option<u32>], i: usize, j: usize| {
            if let (Some(Some(l)), Some(Some(r))) = (ids.get(i), ids.get(j))
                && let Some(&(rank, merged)) = self.merges.get(&(*l, *r))
            {
                heap.push(Reverse((rank, i, *l, *r, merged)));
            }
        };
        for i in 0..n.saturating_sub(1) {
            push(&mut heap, &ids, i, i + 1);
        }
        while let Some(Reverse((_, i, l, r, merged))) = heap.pop() {
            let j = next[i];
            // Skip stale entries: either side changed since this pair was queued.
            if j >= n || !alive[i] || !alive[j] || ids[i] != Some(l) || ids[j] != Some(r) {
                continue;
            }
            ids[i] = Some(merged);
            alive[j] = false;
            next[i] = next[j];
            if next[j] < n {
                prev[next[j]] = i;
            }
            if prev[i] < n {
                push(&mut heap, &ids, prev[i], i);
            }
            if next[i] < n {
                push(&mut heap, &ids, i, next[i]);
            }
        }
        for (k, (id, start, end)) in symbols.iter().enumerate() {
            if !alive[k] {
                continue;
            }
            match ids[k].or(*id) {
                Some(id) => out.push(id),
                // Outside the vocabulary: its bytes' tokens (if any).
                None => out.extend(
                    word.as_bytes()[*start..*end]
                        .iter()
                        .filter_map(|&b| self.byte_tokens[b as usize]),
                ),
            }
        }
    }

    pub(crate) fn token_bytes(&self, vocab: &Vocab, id: u32) -> Vec<u8> {
        let Some(text) = vocab.text(id) else {
            return Vec::new();
        };
        match vocab.kind(id) {
            Some(TokenKind::Control | TokenKind::Unknown | TokenKind::Unused) | None => Vec::new(),
            Some(TokenKind::UserDefined) => text.as_bytes().to_vec(),
            _ if self.symbols == Symbols::Chars => match vocab.kind(id) {
                // `<0xAB>` stands for byte 0xAB.
                Some(TokenKind::Byte) => (text.strip_prefix("<0x"))
                    .and_then(|t| t.strip_suffix('>'))
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .map(|b| vec![b])
                    .unwrap_or_default(),
                _ => text.replace('\u{2581}', " ").into_bytes(),
            },
            _ => {
                let mut bytes = Vec::with_capacity(text.len());
                for c in text.chars() {
                    match self.char_bytes.get(&c) {
                        Some(&b) => bytes.push(b),
                        None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                bytes
            }
        }
    }
}
