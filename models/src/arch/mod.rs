//! Model architectures: `llama` (SmolLM2, TinyLlama, Llama 3 shapes) and
//! `gemma3`, as one decoder-only transformer with per-architecture options.

mod config;
mod ops;
mod transformer;

pub use config::{Activation, ModelConfig, RopeStyle};
pub use transformer::{Model, ModelError, Sequence};
