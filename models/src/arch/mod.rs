//! Model architectures: `llama` (SmolLM2, TinyLlama, Llama 3 with its rope
//! factors), `qwen2`, `qwen3`, `phi3`, `gemma2` and `gemma3`, as one
//! decoder-only transformer with per-architecture options.
//!
//! Weights are read once by name ([`weights`]), then kept by one of two
//! backends, each with its own types: the fused CPU pass ([`cpu`], over
//! [`host`], [`attend`] and the quantized kernels) and the Burn graph
//! ([`graph`], over [`blocks`] and [`linear`]). [`transformer`] chooses
//! between them at load, in one place.

mod attend;
mod blocks;
mod config;
mod cpu;
mod device;
mod exp;
mod gated;
#[cfg(feature = "gpu")]
mod gpu;
mod graph;
mod graph_cache;
mod host;
mod linear;
mod lora;
mod ops;
pub(crate) mod pool;
mod rope;
mod transformer;
mod weights;

pub use config::{Activation, ModelConfig, RopeStyle};
pub use device::ComputeDevice;
pub use lora::{AdapterShape, LoraAdapter, LoraError};
pub use pool::{ThreadsError, set_compute_threads};
pub use transformer::{BatchItem, DeviceMemory, Model, ModelError, Sequence};
