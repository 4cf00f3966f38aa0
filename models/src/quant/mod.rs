//! Quantized weight blocks (byte layouts of ggml's `ggml-common.h`):
//! dequantization to f32, block by block, and fused row · vector kernels.

mod dequant;
mod dot;
pub(crate) mod interleave;
mod kquant;
mod outputs;
mod q8;
mod table;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

pub use dequant::{dequantize, dequantize_row};
pub use dot::{DotFn, dot_dequantized};
pub use outputs::{OutputRows, Outputs};
pub use q8::{Q8Activations, Q8Batch, Q8DotFn};
pub use table::{Kernels, kernels};

/// The little-endian f16 at `b[i..i + 2]`, as f32 (portable code; the
/// AVX2 kernels convert with F16C, see `x86::f16c_at`).
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Every type with an integer kernel, for the kernels' tests.
#[cfg(test)]
pub(crate) const INTEGER_TYPES: [crate::gguf::GgmlType; 7] = {
    use crate::gguf::GgmlType::*;
    [Q4_0, Q4_1, Q5_0, Q8_0, Q4K, Q5K, Q6K]
};

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
