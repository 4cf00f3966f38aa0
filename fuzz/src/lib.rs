//! Shared pieces of the fuzz targets: small in-memory vocabularies and chat
//! templates built with Realm's own GGUF writer, so each target starts from
//! the structures the real models give.

use realm_models::chat::ChatTemplate;
use realm_models::gguf::{GgufFile, GgufWriter, MetaValue, MetaValueType};
use realm_models::tokenizer::Tokenizer;

fn strings(items: &[String]) -> MetaValue {
    MetaValue::Array(
        MetaValueType::String,
        items.iter().cloned().map(MetaValue::String).collect(),
    )
}

fn i32s(items: &[i32]) -> MetaValue {
    MetaValue::Array(
        MetaValueType::I32,
        items.iter().copied().map(MetaValue::I32).collect(),
    )
}

/// GPT-2's byte-to-character map: printable bytes stand for themselves,
/// the rest are shifted past 255 (so a space is `Ġ`).
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return b as char;
    }
    let shifted = (0..=b).filter(|&c| !printable(c)).count() as u32 - 1;
    char::from_u32(256 + shifted).expect("in range")
}

/// A byte-level BPE vocabulary (SmolLM2's kind): all 256 byte tokens, a few
/// merges, and ChatML control tokens. Every text has a tokenization that
/// decodes back to it.
pub fn byte_level_bpe() -> Tokenizer {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let mut types = vec![1; 256];
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(special.into());
        types.push(3);
    }
    let mut w = GgufWriter::new();
    w.meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", MetaValue::String("smollm".into()))
        .meta("tokenizer.ggml.tokens", strings(&tokens))
        .meta("tokenizer.ggml.token_type", i32s(&types))
        .meta("tokenizer.ggml.merges", strings(&merges.map(String::from)))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(258 + 6));
    build(&w)
}

/// A SentencePiece vocabulary with byte fallback (Gemma's kind).
pub fn sentencepiece() -> Tokenizer {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "▁", "h", "i", "hi", "▁hi", "▁h"]
        .map(String::from)
        .to_vec();
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    tokens.push("<start_of_turn>".into());
    let mut scores = vec![0.0f32, 0.0, 0.0, -1.0, -2.0, -2.0, -3.0, -1.5, -5.0];
    scores.extend(std::iter::repeat_n(0.0, 257));
    let mut types = vec![2, 3, 3, 1, 1, 1, 1, 1, 1];
    types.extend(std::iter::repeat_n(6, 256));
    types.push(3);
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
        .meta("tokenizer.ggml.token_type", i32s(&types))
        .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(2));
    build(&w)
}

fn build(w: &GgufWriter) -> Tokenizer {
    let file = GgufFile::from_bytes(w.to_bytes()).expect("a valid GGUF");
    Tokenizer::from_gguf(&file).expect("a valid vocabulary")
}

/// SmolLM2-135M-Instruct's chat template (ChatML), as its GGUF carries it.
pub const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The chat template of a file of `architecture` carrying `source` (or
/// none, where the architecture has a built-in one, as Gemma does).
pub fn template(architecture: &str, source: Option<&str>) -> ChatTemplate {
    let mut w = GgufWriter::new();
    w.meta(
        "general.architecture",
        MetaValue::String(architecture.into()),
    );
    if let Some(source) = source {
        w.meta("tokenizer.chat_template", MetaValue::String(source.into()));
    }
    let file = GgufFile::from_bytes(w.to_bytes()).expect("a valid GGUF");
    ChatTemplate::from_gguf(&file)
}
