//! Dot products of f32 and f16 rows with an f32 vector (quantized rows run on
//! the integer kernels of `q8` and `kquant`), and the dequantize-then-dot
//! fallback and reference. Each kernel is compiled twice, once for baseline
//! x86-64 (or any other target) and once with AVX2+FMA, and the right copy is
//! picked at run time.

use half::f16;

use crate::gguf::GgmlType;
use crate::isa::Isa;

use super::dequant::dequantize;

/// A dot-product kernel: `row` holds whole blocks covering `x.len()` values.
pub type DotFn = fn(&[u8], &[f32]) -> f32;

macro_rules! kernels {
    ($($name:ident),* $(,)?) => {
        /// Kernels compiled for the baseline target.
        mod portable {
            $(pub(super) fn $name(row: &[u8], x: &[f32]) -> f32 { super::generic::$name(row, x) })*
        }

        /// Kernels compiled with AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        mod avx2 {
            $(
                pub(super) fn $name(row: &[u8], x: &[f32]) -> f32 {
                    #[target_feature(enable = "avx2,fma,f16c")]
                    unsafe fn inner(row: &[u8], x: &[f32]) -> f32 {
                        super::generic::$name(row, x)
                    }
                    // SAFETY: only selected by `kernel()` for `Isa::Avx2`, which the CPU reported.
                    unsafe { inner(row, x) }
                }
            )*
        }
    };
}

kernels!(f32_row, f16_row);

/// The kernel for `ty` on `isa`, or `None` if `ty` has no fused kernel.
pub(super) fn kernel(isa: Isa, ty: GgmlType) -> Option<DotFn> {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2_kernel(ty),
        _ => portable_kernel(ty),
    }
}

macro_rules! select {
    ($module:ident, $ty:expr) => {
        Some(match $ty {
            GgmlType::F32 => $module::f32_row as DotFn,
            GgmlType::F16 => $module::f16_row,
            _ => return None,
        })
    };
}

fn portable_kernel(ty: GgmlType) -> Option<DotFn> {
    select!(portable, ty)
}

#[cfg(target_arch = "x86_64")]
fn avx2_kernel(ty: GgmlType) -> Option<DotFn> {
    select!(avx2, ty)
}

/// `row · x` through dequantization, for types without a fused kernel (and as the tests' reference).
///
/// # Panics
/// If `row` is not whole blocks of `ty` covering exactly `x.len()` values.
pub fn dot_dequantized(ty: GgmlType, row: &[u8], x: &[f32], scratch: &mut Vec<f32>) -> f32 {
    scratch.resize(x.len(), 0.0);
    dequantize(ty, row, scratch).expect("whole blocks");
    scratch.iter().zip(x).map(|(a, b)| a * b).sum()
}

/// The kernels themselves, written so LLVM vectorizes them (8-wide accumulators,
/// fixed-size inner loops).
#[inline(always)]
fn sum8(acc: [f32; 8]) -> f32 {
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7])
}

mod generic {
    use super::*;

    #[inline(always)]
    pub(super) fn f32_row(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        for (i, (b, v)) in row.chunks_exact(4).zip(x).enumerate() {
            acc[i % 8] += f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * v;
        }
        sum8(acc)
    }

    #[inline(always)]
    pub(super) fn f16_row(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        for (i, (b, v)) in row.chunks_exact(2).zip(x).enumerate() {
            acc[i % 8] += f16::from_le_bytes([b[0], b[1]]).to_f32() * v;
        }
        sum8(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_noise as noise;

    /// `n` finite f32 or f16 values.
    fn blocks(ty: GgmlType, n_blocks: usize, seed: u64) -> Vec<u8> {
        let (_, size) = ty.block_layout().unwrap();
        let mut bytes = noise(size * n_blocks, seed);
        for (i, b) in bytes.chunks_exact_mut(size).enumerate() {
            match ty {
                GgmlType::F32 => b.copy_from_slice(&(((i % 11) as f32) - 5.0).to_le_bytes()),
                GgmlType::F16 => {
                    b.copy_from_slice(&f16::from_f32((i % 13) as f32 - 6.0).to_le_bytes())
                }
                _ => unreachable!(),
            }
        }
        bytes
    }

    #[test]
    fn fused_kernels_match_dequantize_then_dot() {
        let cols = 512;
        let x: Vec<f32> = noise(cols, 99)
            .iter()
            .map(|&b| b as f32 / 128.0 - 1.0)
            .collect();
        let mut scratch = Vec::new();
        // Quantized types run on the integer kernels, tested in `q8`.
        for ty in [GgmlType::F32, GgmlType::F16] {
            let (block, _) = ty.block_layout().unwrap();
            for seed in 0..20 {
                let row = blocks(ty, cols / block, seed);
                let want = dot_dequantized(ty, &row, &x, &mut scratch);
                let scale: f32 = {
                    scratch
                        .iter()
                        .zip(&x)
                        .map(|(a, b)| (a * b).abs())
                        .sum::<f32>()
                        .max(1e-6)
                };
                for (name, k) in [
                    ("portable", portable_kernel(ty).unwrap()),
                    ("selected", kernel(crate::isa::isa(), ty).unwrap()),
                ] {
                    let got = k(&row, &x);
                    // Relative to the sum of |products|: only summation order differs.
                    assert!(
                        (got - want).abs() <= 1e-5 * scale,
                        "{ty} {name} seed {seed}: {got} vs {want}"
                    );
                }
            }
        }
        assert!(kernel(crate::isa::isa(), GgmlType::Q5_1).is_none());
        assert!(
            kernel(crate::isa::isa(), GgmlType::Q4K).is_none(),
            "Q4_K belongs to the integer kernels"
        );
    }
}
