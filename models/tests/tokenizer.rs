//! Tokenizers of the real models against llama.cpp's token ids.

mod common;

use realm_models::gguf::GgufFile;
use realm_models::tokenizer::Tokenizer;

#[test]
fn prompts_tokenize_exactly_as_llama_cpp() {
    for (name, key) in common::MODELS {
        let Some(path) = common::model(name) else {
            continue;
        };
        let file = GgufFile::open(&path).unwrap();
        let tokenizer = Tokenizer::from_gguf(&file).unwrap();
        let reference = common::reference(key);
        assert_eq!(
            tokenizer.vocab().add_bos(),
            reference["add_bos"].as_bool().unwrap(),
            "{name}: add_bos"
        );
        assert_eq!(
            tokenizer.vocab().bos(),
            Some(reference["bos_id"].as_u64().unwrap() as u32)
        );
        for case in reference["cases"].as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            let expected = common::ids(&case["prompt_ids"]);
            assert_eq!(
                tokenizer.encode_prompt(prompt),
                expected,
                "{name}: {prompt:?}"
            );
            // The greedy outputs decode to llama.cpp's text.
            let output = common::ids(&case["greedy_output_ids"]);
            assert_eq!(
                tokenizer.decode(&output),
                case["output_text"].as_str().unwrap(),
                "{name}: decode"
            );
        }
        for &id in &common::ids(&reference["end_of_generation_ids"]) {
            assert!(
                tokenizer.vocab().is_end_of_generation(id),
                "{name}: {id} should end generation"
            );
        }
    }
}

#[test]
fn round_trips_varied_text() {
    let text = "Héllo wörld!  Tabs\there, numbers 1234567 and émojis 🦀🚀.\n\n  def f(x):\n\treturn x**2 # ünïcode";
    for (name, _) in common::MODELS {
        let Some(path) = common::model(name) else {
            continue;
        };
        let file = GgufFile::open(&path).unwrap();
        let tokenizer = Tokenizer::from_gguf(&file).unwrap();
        let ids = tokenizer.encode(text, false);
        assert!(
            ids.len() > 10 && ids.len() < text.len(),
            "{name}: {} tokens",
            ids.len()
        );
        let decoded = tokenizer.decode(&ids);
        assert_eq!(decoded.trim_start(), text.trim_start(), "{name}");
    }
}
