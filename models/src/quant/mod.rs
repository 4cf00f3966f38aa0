//! Quantized weight blocks (byte layouts of ggml's `ggml-common.h`):
//! dequantization to f32, block by block, and fused row · vector kernels.

mod dequant;
mod dot;
mod q8;

pub use dequant::{dequantize, dequantize_row};
pub use dot::{DotFn, dot_dequantized, kernel};
pub use q8::{Q8Activations, Q8DotFn, q8_kernel};
