//! Any bytes as a GGUF file: the reader either refuses them with an error or
//! yields a file whose every tensor lies inside it; the tokenizer, chat
//! template and model configuration read from it refuse or work.
#![no_main]

use libfuzzer_sys::fuzz_target;
use realm_models::arch::ModelConfig;
use realm_models::chat::{ChatMessage, ChatTemplate};
use realm_models::gguf::GgufFile;
use realm_models::tokenizer::Tokenizer;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    for tensor in file.tensors() {
        let bytes = file.tensor_bytes(tensor);
        assert_eq!(bytes.len() as u64, tensor.size as u64, "{}", tensor.name);
    }
    let _ = ModelConfig::from_gguf(&file);
    if let Ok(tokenizer) = Tokenizer::from_gguf(&file) {
        let ids = tokenizer.encode("Hello, <|im_start|> world", true);
        let _ = tokenizer.decode(&ids);
    }
    let template = ChatTemplate::from_gguf(&file);
    let _ = template.render(&[ChatMessage::new("user", "hi")]);
});
