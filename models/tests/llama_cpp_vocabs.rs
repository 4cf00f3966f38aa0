//! llama.cpp's own tokenizer test set: vocab-only GGUF files, each with
//! inputs (`.inp`) and the ids Hugging Face's tokenizer gives them (`.out`).
//! `scripts/llama-cpp-testdata.sh` fetches them; `REALM_LLAMA_CPP_DATA`
//! points here to where they are.

mod common;

use std::path::Path;

use realm_models::gguf::GgufFile;
use realm_models::tokenizer::{Tokenizer, TokenizerError};

/// Vocabularies that must tokenize every input exactly as the reference.
const EXACT: &[&str] = &[
    "gpt-2",
    "llama-bpe",
    "qwen2",
    "qwen35",
    "phi-3",
    "llama-spm",
    "deepseek-llm",
    "deepseek-coder",
    "starcoder",
    "falcon",
    "mpt",
    "refact",
    "command-r",
    "gemma-4",
];

/// Vocabularies whose tokenizer kind Realm does not implement: loading them
/// must fail with an error that names it.
const REFUSED: &[(&str, &str)] = &[("bert-bge", "`bert`"), ("nomic-bert-moe", "`t5`")];

/// The (input, expected ids) pairs of vocabulary `name`.
fn cases(dir: &Path, name: &str) -> Vec<(String, Vec<u32>)> {
    let read = |ext: &str| {
        let path = dir.join(format!("ggml-vocab-{name}.gguf.{ext}"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let inputs = read("inp");
    // Separated by (and usually ending with) a separator line.
    let sep = "\n__ggml_vocab_test__\n";
    let inputs: Vec<&str> = inputs
        .strip_suffix(sep)
        .unwrap_or(&inputs)
        .split(sep)
        .collect();
    let outputs = read("out");
    let outputs: Vec<Vec<u32>> = outputs
        .lines()
        .map(|line| {
            line.split_whitespace()
                .map(|n| n.parse().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(inputs.len(), outputs.len(), "{name}: inputs and outputs");
    inputs
        .into_iter()
        .map(str::to_string)
        .zip(outputs)
        .collect()
}

fn tokenizer(dir: &Path, name: &str) -> Result<Tokenizer, TokenizerError> {
    let file = GgufFile::open(&dir.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
    Tokenizer::from_gguf(&file)
}

#[test]
fn every_vocabulary_tokenizes_exactly_as_the_reference() {
    let Some(dir) = common::llama_cpp_data() else {
        return;
    };
    let mut failures = Vec::new();
    for name in EXACT {
        let tokenizer = match tokenizer(&dir, name) {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let cases = cases(&dir, name);
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|(text, want)| {
                let got = tokenizer.encode(text, false);
                (&got != want).then(|| format!("  {text:?}\n    want {want:?}\n    got  {got:?}"))
            })
            .collect();
        if !wrong.is_empty() {
            failures.push(format!(
                "{name}: {} of {} wrong\n{}",
                wrong.len(),
                cases.len(),
                wrong.join("\n")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn unsupported_tokenizers_are_refused_by_name() {
    let Some(dir) = common::llama_cpp_data() else {
        return;
    };
    for (name, kind) in REFUSED {
        match tokenizer(&dir, name) {
            Ok(_) => panic!("{name}: loaded"),
            Err(e) => assert!(e.to_string().contains(kind), "{name}: {e}"),
        }
    }
}
