//! Any text through the two tokenizer kinds (byte-level BPE, SentencePiece
//! with byte fallback), specials parsed or not, with text spans: never a
//! panic, and byte-level BPE decodes back to the very text it encoded. And
//! through one of llama.cpp's pre-tokenizers: its words cover the text.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use realm_fuzz::{byte_level_bpe, sentencepiece};
use realm_models::tokenizer::{PreTokenizer, Tokenizer};

static BPE: LazyLock<Tokenizer> = LazyLock::new(byte_level_bpe);
static SPM: LazyLock<Tokenizer> = LazyLock::new(sentencepiece);
static PRE: LazyLock<Vec<PreTokenizer>> = LazyLock::new(|| {
    (PreTokenizer::NAMES.iter())
        .filter_map(|name| PreTokenizer::from_name(name).ok())
        .collect()
});

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let parse_special = first & 1 == 1;
    let which = (first >> 1) as usize % PRE.len();
    let words = PRE[which].split(&text);
    assert_eq!(
        words.concat(),
        text,
        "{} covers the text",
        PreTokenizer::NAMES[which]
    );
    let bpe = BPE.encode(&text, parse_special);
    if !parse_special {
        assert_eq!(BPE.decode(&bpe), text, "byte-level BPE round trip");
    }
    let spm = SPM.encode(&text, parse_special);
    let _ = SPM.decode(&spm);
    // A span over the middle of the text (on character boundaries): control
    // tokens outside it are parsed (and, being control tokens, decode to
    // nothing); inside it everything is text that decodes back.
    let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
    if bounds.len() >= 2 {
        let (a, b) = (bounds[bounds.len() / 3], bounds[2 * bounds.len() / 3]);
        let ids = BPE.encode_with_text_spans(&text, std::slice::from_ref(&(a..b)));
        let decoded = BPE.decode(&ids);
        assert!(decoded.contains(&text[a..b]), "the span's text survives");
        if !BPE.vocab().has_control_text(&text) {
            assert_eq!(decoded, text, "text spans change no plain text");
        }
    }
});
