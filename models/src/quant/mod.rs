//! Quantized weight blocks (byte layouts of ggml's `ggml-common.h`):
//! dequantization to f32, block by block, and fused row · vector kernels.

mod dequant;
mod dot;
pub(crate) mod interleave;
mod kquant;
mod outputs;
mod q8;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

pub use dequant::{dequantize, dequantize_row};
pub use dot::{DotFn, dot_dequantized, kernel};
pub use outputs::{OutputRows, Outputs};
pub(crate) use q8::interleaved_kernel;
pub use q8::{Q8Activations, Q8Batch, Q8DotFn, q8_kernel};

/// Deterministic pseudo-random bytes for the kernels' tests.
#[cfg(test)]
pub(crate) fn test_noise(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u8
        })
        .collect()
}
