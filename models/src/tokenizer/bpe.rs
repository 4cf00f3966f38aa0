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

pub(crate) struct Bpe {
    pre: PreTokenizer,
    /// (left, right) -> (rank, merged id)
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Token of each byte's character.
    byte_tokens: [Option<u32>; 256],
    /// Character -> byte, for decoding.
    char_bytes: HashMap<char, u8>,
}

impl Bpe {
    pub(crate) fn from_gguf(
        file: &GgufFile,
        vocab: &Vocab,
        pre: PreTokenizer,
    ) -> Result<Self, TokenizerError> {
        let chars = byte_chars();
        let mut byte_tokens = [None; 256];
        for (b, c) in chars.iter().enumerate() {
            byte_tokens[b] = vocab.id(&c.to_string());
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
            let Some((left, right)) = merge.split_once(' ') else {
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
            merges,
            byte_tokens,
            char_bytes,
        })
    }

    pub(crate) fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        for word in self.pre.split(text) {
            self.encode_word(vocab, word, out);
        }
    }

    fn encode_word(&self, vocab: &Vocab, word: &str, out: &mut Vec<u32>) {
        // Symbols as a doubly linked list over a vector; `None` ids are merged away.
        let mut ids: Vec<Option<u32>> = word
            .bytes()
            .map(|b| self.byte_tokens[b as usize].or_else(|| vocab.id("<unk>")))
            .collect();
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
            if j >= n || ids[i] != Some(l) || ids[j] != Some(r) {
                continue;
            }
            ids[i] = Some(merged);
            ids[j] = None;
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
        out.extend(ids.into_iter().flatten());
    }

    pub(crate) fn token_bytes(&self, vocab: &Vocab, id: u32) -> Vec<u8> {
        let Some(text) = vocab.text(id) else {
            return Vec::new();
        };
        match vocab.kind(id) {
            Some(TokenKind::Control | TokenKind::Unknown | TokenKind::Unused) | None => Vec::new(),
            Some(TokenKind::UserDefined) => text.as_bytes().to_vec(),
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
