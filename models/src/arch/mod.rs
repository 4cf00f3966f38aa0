//! Model architectures: `llama` (SmolLM2, TinyLlama, Llama 3 shapes) and
//! `gemma3`, as one decoder-only transformer with per-architecture options,
//! its graph on Burn tensors.

mod attend;
mod blocks;
mod config;
mod device;
mod exp;
mod gated;
mod host;
mod linear;
mod ops;
pub(crate) mod pool;
mod transformer;

pub use config::{Activation, ModelConfig, RopeStyle};
pub use device::ComputeDevice;
pub use transformer::{BatchItem, Model, ModelError, Sequence};
