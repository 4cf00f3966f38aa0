//! SentencePiece (BPE variant) as llama.cpp runs it: spaces become `▁`,
//! characters merge pairwise by the score of the merged token, highest first
//! (then leftmost), and characters with no token fall back to byte tokens.

use std::collections::BinaryHeap;

use crate::gguf::GgufFile;

use super::TokenizerError;
use super::vocab::{TokenKind, Vocab};

const SPACE: &str = "\u{2581}";

pub(crate) struct SentencePiece {
    add_space_prefix: bool,
    byte_tokens: [Option<u32>; 256],
}

#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bigram {
    /// Highest score first; among equal scores, the leftmost.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl SentencePiece {
    pub(crate) fn from_gguf(file: &GgufFile, vocab: &Vocab) -> Result<Self, TokenizerError> {
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = vocab.id(&format!("<0x{b:02X}>"));
        }
        let add_space_prefix = file
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        Ok(SentencePiece {
            add_space_prefix,
            byte_tokens,
        })
    }

    /// Encodes one plain-text segment. `first` says whether it starts the text
    /// or follows a special token (where a space prefix is added).
    pub(crate) fn encode(&self, vocab: &Vocab, text: &str, first: bool, out: &mut Vec<u32>) {
        let mut escaped = String::with_capacity(text.len() + 3);
        if self.add_space_prefix && first {
            escaped.push_str(SPACE);
        }
        escaped.push_str(&text.replace(' ', SPACE));
        if escaped.is_empty() {
            return;
        }
        // Symbols: byte ranges of the escaped text, linked left to right.
        let mut start: Vec<usize> = escaped.char_indices().map(|(i, _)| i).collect();
        let count = start.len();
        let mut len: Vec<usize> = (0..count)
            .map(|i| start.get(i + 1).copied().unwrap_or(escaped.len()) - start[i])
            .collect();
        let mut prev: Vec<usize> = (0..count).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<usize> = (1..=count).collect();
        let mut queue = BinaryHeap::new();
        let try_add = |queue: &mut BinaryHeap<Bigram>,
                       start: &[usize],
                       len: &[usize],
                       left: usize,
                       right: usize| {
            if left >= count || right >= count {
                return;
            }
            let piece = &escaped[start[left]..start[left] + len[left] + len[right]];
            if let Some(id) = vocab.id(piece) {
                queue.push(Bigram {
                    score: vocab.score(id),
                    left,
                    right,
                    size: piece.len(),
                });
            }
        };
        for i in 1..count {
            try_add(&mut queue, &start, &len, i - 1, i);
        }
        while let Some(b) = queue.pop() {
            if len[b.left] == 0 || len[b.right] == 0 || len[b.left] + len[b.right] != b.size {
                continue;
            }
            len[b.left] += len[b.right];
            len[b.right] = 0;
            next[b.left] = next[b.right];
            if next[b.right] < count {
                prev[next[b.right]] = b.left;
            }
            try_add(&mut queue, &start, &len, prev[b.left], b.left);
            try_add(&mut queue, &start, &len, b.left, next[b.left]);
        }
        start.truncate(count);
        let mut i = 0;
        while i < count {
            let piece = &escaped[start[i]..start[i] + len[i]];
            match vocab.id(piece) {
                Some(id) => out.push(id),
                None => out.extend(piece.bytes().filter_map(|b| self.byte_tokens[b as usize])),
            }
            i = next[i];
        }
    }

    pub(crate) fn token_bytes(&self, vocab: &Vocab, id: u32) -> Vec<u8> {
        let Some(text) = vocab.text(id) else {
            return Vec::new();
        };
        match vocab.kind(id) {
            Some(TokenKind::Control | TokenKind::Unknown | TokenKind::Unused) | None => Vec::new(),
            Some(TokenKind::Byte) => text
                .strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .map(|b| vec![b])
                .unwrap_or_default(),
            Some(TokenKind::UserDefined) => text.as_bytes().to_vec(),
            Some(TokenKind::Normal) => text.replace(SPACE, " ").into_bytes(),
        }
    }
}
