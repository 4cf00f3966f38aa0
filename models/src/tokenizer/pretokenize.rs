//! Pre-tokenization: splitting text into words before BPE, as llama.cpp does
//! for each `tokenizer.ggml.pre` type.

use unicode_general_category::{GeneralCategory as G, get_general_category};

fn is_letter(c: char) -> bool {
    matches!(
        get_general_category(c),
        G::UppercaseLetter
            | G::LowercaseLetter
            | G::TitlecaseLetter
            | G::ModifierLetter
            | G::OtherLetter
    )
}

fn is_number(c: char) -> bool {
    matches!(
        get_general_category(c),
        G::DecimalNumber | G::LetterNumber | G::OtherNumber
    )
}

/// How a BPE vocabulary splits text into words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2's pattern: contractions, letters, numbers, other symbols, whitespace.
    Gpt2,
    /// SmolLM: every digit on its own, then GPT-2's pattern.
    SmolLm,
}

impl PreTokenizer {
    /// The pre-tokenizer for `tokenizer.ggml.pre`, or `None` if unsupported.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "gpt2" | "default" => Some(PreTokenizer::Gpt2),
            "smollm" => Some(PreTokenizer::SmolLm),
            _ => None,
        }
    }

    /// Splits `text` into words (byte ranges), in order, covering all of it.
    pub fn split(self, text: &str) -> Vec<&str> {
        let mut words = Vec::new();
        match self {
            PreTokenizer::Gpt2 => gpt2_split(text, &mut words),
            PreTokenizer::SmolLm => {
                for piece in split_digits(text) {
                    gpt2_split(piece, &mut words);
                }
            }
        }
        words
    }
}

/// `\p{N}` as a splitting regex: each number character alone, text between kept whole.
fn split_digits(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if is_number(c) {
            if start < i {
                pieces.push(&text[start..i]);
            }
            pieces.push(&text[i..i + c.len_utf8()]);
            start = i + c.len_utf8();
        }
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

/// GPT-2's `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
fn gpt2_split<'t>(text: &'t str, out: &mut Vec<&'t str>) {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let end_of = |k: usize| chars.get(k).map_or(text.len(), |&(i, _)| i);
    let mut k = 0;
    while k < chars.len() {
        let start = chars[k].0;
        let c = chars[k].1;
        let len = match_at(&chars, k, c);
        out.push(&text[start..end_of(k + len)]);
        k += len;
    }
}

/// Length in chars of the pattern match starting at `k`.
fn match_at(chars: &[(usize, char)], k: usize, c: char) -> usize {
    let at = |j: usize| chars.get(j).map(|&(_, c)| c);
    // Contractions.
    if c == '\'' {
        for suffix in ["s", "t", "re", "ve", "m", "ll", "d"] {
            if suffix
                .chars()
                .enumerate()
                .all(|(n, s)| at(k + 1 + n) == Some(s))
            {
                return 1 + suffix.len();
            }
        }
    }
    // ` ?` prefix then a class run.
    let (body, prefix) = match (c, at(k + 1)) {
        (' ', Some(next)) if !next.is_whitespace() => (next, 1),
        _ => (c, 0),
    };
    let run = |class: &dyn Fn(char) -> bool| {
        let mut n = 0;
        while at(k + prefix + n).is_some_and(class) {
            n += 1;
        }
        prefix + n
    };
    if is_letter(body) {
        return run(&is_letter);
    }
    if is_number(body) {
        return run(&is_number);
    }
    if !body.is_whitespace() {
        return run(&|x: char| !x.is_whitespace() && !is_letter(x) && !is_number(x));
    }
    // Whitespace: `\s+(?!\S)` keeps the last space for the next word, else `\s+`.
    let mut n = 0;
    while at(k + n).is_some_and(char::is_whitespace) {
        n += 1;
    }
    if k + n < chars.len() && n > 1 {
        n - 1
    } else {
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_pattern() {
        let words = PreTokenizer::Gpt2.split("Hello world's  3.14 foo!!  \n bar   ");
        assert_eq!(
            words,
            vec![
                "Hello", " world", "'s", " ", " 3", ".", "14", " foo", "!!", "  \n", " bar", "   "
            ]
        );
    }

    #[test]
    fn smollm_splits_digits() {
        let words = PreTokenizer::SmolLm.split("Q: What is 12 + 7?\nA:");
        assert_eq!(
            words,
            vec![
                "Q", ":", " What", " is", " ", "1", "2", " +", " ", "7", "?", "\n", "A", ":"
            ]
        );
    }

    #[test]
    fn covers_all_text() {
        let text = "naïve café — 東京 2024年\t\tok";
        let words = PreTokenizer::SmolLm.split(text);
        assert_eq!(words.concat(), text);
    }
}
