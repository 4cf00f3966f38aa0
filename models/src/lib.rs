//! Realm's inference engine: GGUF model files, quantized weights, tokenizers
//! and model architectures.

pub mod arch;
pub mod chat;
pub mod engine;
pub mod gguf;
pub mod isa;
pub mod quant;
pub mod tokenizer;
