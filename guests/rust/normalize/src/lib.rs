//! `normalize`: cleans text and splits it into chunks that fit a model's prompt.
//!
//! Input:  `{"text": "...", "max_chars": 400, "lowercase": false}`
//! Output: `{"text": "<normalized>", "chunks": ["..."], "stats": {"chars": n, "words": n, "sentences": n}}`
//!
//! Normalization: typographic quotes and dashes become ASCII, control
//! characters are dropped, runs of whitespace collapse to one space, and
//! paragraph breaks are kept. Chunks break at sentence ends when they can,
//! else at word boundaries, and never exceed `max_chars` characters (a word
//! longer than that is split).

use serde_json::{Value, json};

wit_bindgen::generate!({ path: "../../../wit", world: "step" });

use realm::inference::log::{Level, log};

struct Normalize;

impl Guest for Normalize {
    fn run(input: String) -> Result<String, String> {
        let input: Value =
            serde_json::from_str(&input).map_err(|e| format!("input is not JSON: {e}"))?;
        let text = input
            .get("text")
            .and_then(Value::as_str)
            .ok_or("input needs a string field `text`")?;
        let max_chars = match input.get("max_chars") {
            None => 400,
            Some(v) => v
                .as_u64()
                .filter(|n| (16..=100_000).contains(n))
                .ok_or("`max_chars` must be an integer between 16 and 100000")?
                as usize,
        };
        let lowercase = input
            .get("lowercase")
            .and_then(Value::as_bool)
            .unwrap_or(false);

        let mut clean = normalize(text);
        if lowercase {
            clean = clean.to_lowercase();
        }
        let sentences = sentences(&clean);
        let chunks = chunk(&sentences, max_chars);
        log(
            Level::Debug,
            &format!(
                "normalized {} chars into {} chunks",
                clean.chars().count(),
                chunks.len()
            ),
        );
        let out = json!({
            "stats": {
                "chars": clean.chars().count(),
                "words": clean.split_whitespace().count(),
                "sentences": sentences.len(),
            },
            "chunks": chunks,
            "text": clean,
        });
        Ok(out.to_string())
    }
}

/// Cleans `text`, keeping paragraph breaks (blank lines) as "\n\n".
fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    let mut newlines = 0;
    for c in text.chars() {
        let c = match c {
            '\u{2018}' | '\u{2019}' | '\u{201B}' | '\u{2032}' => '\'',
            '\u{201C}' | '\u{201D}' | '\u{201F}' | '\u{2033}' => '"',
            '\u{2013}' | '\u{2014}' | '\u{2212}' => '-',
            '\u{2026}' => {
                flush(&mut out, &mut pending_space, &mut newlines);
                out.push_str("...");
                continue;
            }
            '\u{00A0}' | '\u{2007}' | '\u{202F}' => ' ',
            other => other,
        };
        if c == '\n' {
            newlines += 1;
        } else if c.is_whitespace() {
            pending_space = true;
        } else if c.is_control() || matches!(c, '\u{200B}' | '\u{FEFF}') {
            continue;
        } else {
            flush(&mut out, &mut pending_space, &mut newlines);
            out.push(c);
        }
    }
    out
}

fn flush(out: &mut String, pending_space: &mut bool, newlines: &mut usize) {
    if !out.is_empty() {
        if *newlines >= 2 {
            out.push_str("\n\n");
        } else if *newlines == 1 || *pending_space {
            out.push(' ');
        }
    }
    *pending_space = false;
    *newlines = 0;
}

/// Splits text into sentences (ending in `.`, `!` or `?` before whitespace, or at paragraph breaks).
fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let end_of_sentence = matches!(b, b'.' | b'!' | b'?')
            && bytes.get(i + 1).is_none_or(|n| n.is_ascii_whitespace());
        let paragraph = b == b'\n' && bytes.get(i + 1) == Some(&b'\n');
        if end_of_sentence || paragraph {
            let s = text[start..=i].trim();
            if !s.is_empty() {
                out.push(s);
            }
            start = i + 1;
        }
    }
    let rest = text[start..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// Packs sentences into chunks of at most `max` characters.
fn chunk(sentences: &[&str], max: usize) -> Vec<String> {
    let mut chunks = Vec::new();
    let mut current = String::new();
    let push_piece = |piece: &str, current: &mut String, chunks: &mut Vec<String>| {
        let extra = if current.is_empty() { 0 } else { 1 };
        if current.chars().count() + extra + piece.chars().count() > max && !current.is_empty() {
            chunks.push(std::mem::take(current));
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(piece);
    };
    for sentence in sentences {
        if sentence.chars().count() <= max {
            push_piece(sentence, &mut current, &mut chunks);
            continue;
        }
        for word in sentence.split_whitespace() {
            let chars: Vec<char> = word.chars().collect();
            for part in chars.chunks(max) {
                let part: String = part.iter().collect();
                push_piece(&part, &mut current, &mut chunks);
            }
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

export!(Normalize);
