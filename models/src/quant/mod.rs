//! Quantized weight blocks: dequantization to f32, block by block, with the
//! byte layouts of ggml's `ggml-common.h`.

mod dequant;

pub use dequant::{dequantize, dequantize_row};
