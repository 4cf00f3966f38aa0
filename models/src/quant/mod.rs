//! Quantized weight blocks (byte layouts of ggml's `ggml-common.h`):
//! dequantization to f32, block by block, and fused row · vector kernels.

mod dequant;
mod dot;

pub use dequant::{dequantize, dequantize_row};
pub use dot::{DotFn, dot_dequantized, kernel};
