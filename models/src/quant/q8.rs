//! Integer dot products against 8-bit activations, as llama.cpp does it: the
//! activation vector is quantized once per matrix-vector product to blocks of
//! 32 signed bytes with an f32 scale, and each weight block is multiplied with
//! integer instructions (AVX2 `maddubs`), halving the data the inner loop
//! moves and quadrupling the work per instruction.

use half::f16;

use crate::gguf::GgmlType;

/// An activation vector quantized to 8 bits per value, in blocks of 32.
#[derive(Debug, Clone, Default)]
pub struct Q8Activations {
    /// Quantized values.
    pub q: Vec<i8>,
    /// Scale of each block: value ≈ q × scale.
    pub scales: Vec<f32>,
    /// Sum of each block's dequantized values (scale × Σq).
    pub sums: Vec<f32>,
}

impl Q8Activations {
    /// Quantizes `x` (a whole number of 32-value blocks) into `self`.
    pub fn quantize(&mut self, x: &[f32]) {
        debug_assert!(x.len().is_multiple_of(32));
        self.q.resize(x.len(), 0);
        self.scales.clear();
        self.sums.clear();
        for (block, q) in x.chunks_exact(32).zip(self.q.chunks_exact_mut(32)) {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = max / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (v, out) in block.iter().zip(q.iter_mut()) {
                let r = (v * inv).round() as i32;
                *out = r as i8;
                sum += r;
            }
            // Stored as f16, as llama.cpp's q8_0/q8_1 blocks do, so results match it closely.
            self.scales.push(f16::from_f32(scale).to_f32());
            self.sums.push(f16::from_f32(sum as f32 * scale).to_f32());
        }
    }
}

/// A kernel: `row` holds whole weight blocks covering the activations.
pub type Q8DotFn = fn(&[u8], &Q8Activations) -> f32;

/// The integer kernel for weights of type `ty`, if there is one.
pub fn q8_kernel(ty: GgmlType) -> Option<Q8DotFn> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return match ty {
                GgmlType::Q4_0 => Some(avx2::q4_0),
                GgmlType::Q4_1 => Some(avx2::q4_1),
                GgmlType::Q8_0 => Some(avx2::q8_0),
                _ => None,
            };
        }
    }
    portable_q8_kernel(ty)
}

fn portable_q8_kernel(ty: GgmlType) -> Option<Q8DotFn> {
    match ty {
        GgmlType::Q4_0 => Some(portable::q4_0),
        GgmlType::Q4_1 => Some(portable::q4_1),
        GgmlType::Q8_0 => Some(portable::q8_0),
        _ => None,
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

mod portable {
    use super::*;

    pub(super) fn q4_0(row: &[u8], a: &Q8Activations) -> f32 {
        let mut total = 0.0;
        for (i, b) in row.chunks_exact(18).enumerate() {
            let xq = &a.q[32 * i..32 * i + 32];
            let mut s = 0i32;
            for j in 0..16 {
                s += ((b[2 + j] & 0x0F) as i32 - 8) * xq[j] as i32
                    + ((b[2 + j] >> 4) as i32 - 8) * xq[j + 16] as i32;
            }
            total += f16_at(b, 0) * a.scales[i] * s as f32;
        }
        total
    }

    pub(super) fn q4_1(row: &[u8], a: &Q8Activations) -> f32 {
        let mut total = 0.0;
        for (i, b) in row.chunks_exact(20).enumerate() {
            let xq = &a.q[32 * i..32 * i + 32];
            let mut s = 0i32;
            for j in 0..16 {
                s += (b[4 + j] & 0x0F) as i32 * xq[j] as i32
                    + (b[4 + j] >> 4) as i32 * xq[j + 16] as i32;
            }
            total += f16_at(b, 0) * a.scales[i] * s as f32 + f16_at(b, 2) * a.sums[i];
        }
        total
    }

    pub(super) fn q8_0(row: &[u8], a: &Q8Activations) -> f32 {
        let mut total = 0.0;
        for (i, b) in row.chunks_exact(34).enumerate() {
            let xq = &a.q[32 * i..32 * i + 32];
            let s: i32 = (0..32)
                .map(|j| (b[2 + j] as i8) as i32 * xq[j] as i32)
                .sum();
            total += f16_at(b, 0) * a.scales[i] * s as f32;
        }
        total
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::x86::{f16_at, hsum};
    use super::Q8Activations;

    /// 16 bytes of nibbles → 32 unsigned bytes: low nibbles first, then high nibbles.
    #[inline(always)]
    unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
        unsafe {
            let v = _mm_loadu_si128(p as *const __m128i);
            let mask = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(v, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
            _mm256_set_m128i(hi, lo)
        }
    }

    /// Σ u8 × i8 over 32 bytes, as 8 i32 lanes converted to f32.
    #[inline(always)]
    unsafe fn dot_u8_i8(w: __m256i, x: __m256i) -> __m256 {
        unsafe {
            let pairs = _mm256_maddubs_epi16(w, x);
            _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_inner(row: &[u8], a: &Q8Activations) -> f32 {
        let mut total = _mm256_setzero_ps();
        let mut mins = 0.0;
        for (i, b) in row.chunks_exact(20).enumerate() {
            // SAFETY: 16 nibble bytes per block; 32 activation bytes per block.
            let dot = unsafe {
                let w = unpack_nibbles(b.as_ptr().add(4));
                let x = _mm256_loadu_si256(a.q.as_ptr().add(32 * i) as *const __m256i);
                dot_u8_i8(w, x)
            };
            total = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b, 0) * a.scales[i]), dot, total);
            mins += f16_at(b, 2) * a.sums[i];
        }
        unsafe { hsum(total) + mins }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0_inner(row: &[u8], a: &Q8Activations) -> f32 {
        let mut total = _mm256_setzero_ps();
        let mut offsets = 0.0;
        for (i, b) in row.chunks_exact(18).enumerate() {
            // SAFETY: as for Q4_1. The -8 offset is applied through the block sums.
            let dot = unsafe {
                let w = unpack_nibbles(b.as_ptr().add(2));
                let x = _mm256_loadu_si256(a.q.as_ptr().add(32 * i) as *const __m256i);
                dot_u8_i8(w, x)
            };
            let d = f16_at(b, 0);
            total = _mm256_fmadd_ps(_mm256_set1_ps(d * a.scales[i]), dot, total);
            offsets += 8.0 * d * a.sums[i];
        }
        unsafe { hsum(total) - offsets }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_inner(row: &[u8], a: &Q8Activations) -> f32 {
        let mut total = _mm256_setzero_ps();
        for (i, b) in row.chunks_exact(34).enumerate() {
            // SAFETY: 32 weight bytes and 32 activation bytes per block.
            let dot = unsafe {
                let w = _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i);
                let x = _mm256_loadu_si256(a.q.as_ptr().add(32 * i) as *const __m256i);
                // maddubs needs one unsigned side: |w| × (x with w's sign).
                dot_u8_i8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
            };
            total = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b, 0) * a.scales[i]), dot, total);
        }
        unsafe { hsum(total) }
    }

    // SAFETY (all three): selected only after the CPU reported AVX2, FMA and F16C.
    pub(super) fn q4_0(row: &[u8], a: &Q8Activations) -> f32 {
        unsafe { q4_0_inner(row, a) }
    }
    pub(super) fn q4_1(row: &[u8], a: &Q8Activations) -> f32 {
        unsafe { q4_1_inner(row, a) }
    }
    pub(super) fn q8_0(row: &[u8], a: &Q8Activations) -> f32 {
        unsafe { q8_0_inner(row, a) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dot_dequantized, test_noise as noise};

    #[test]
    fn integer_kernels_match_f32_within_activation_rounding() {
        let cols = 512;
        let x: Vec<f32> = noise(cols, 5)
            .iter()
            .map(|&b| b as f32 / 128.0 - 1.0)
            .collect();
        let mut acts = Q8Activations::default();
        acts.quantize(&x);
        let mut scratch = Vec::new();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let (_, size) = ty.block_layout().unwrap();
            for seed in 0..20u64 {
                let mut row = noise(size * cols / 32, seed);
                for (i, b) in row.chunks_exact_mut(size).enumerate() {
                    b[..2].copy_from_slice(
                        &f16::from_f32(0.01 + (i % 5) as f32 * 0.002).to_le_bytes(),
                    );
                    if ty == GgmlType::Q4_1 {
                        b[2..4].copy_from_slice(&f16::from_f32(-0.05).to_le_bytes());
                    }
                }
                let want = dot_dequantized(ty, &row, &x, &mut scratch);
                let magnitude: f32 = scratch.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                for (name, k) in [
                    ("portable", portable_q8_kernel(ty).unwrap()),
                    ("selected", q8_kernel(ty).unwrap()),
                ] {
                    let got = k(&row, &acts);
                    // Each activation moves by at most half a quantization step (1/254 of its block's max).
                    assert!(
                        (got - want).abs() <= 0.01 * magnitude,
                        "{ty} {name} seed {seed}: {got} vs {want}"
                    );
                }
                let portable = portable_q8_kernel(ty).unwrap()(&row, &acts);
                let selected = q8_kernel(ty).unwrap()(&row, &acts);
                assert!(
                    (portable - selected).abs() <= 1e-4 * magnitude,
                    "{ty}: integer kernels disagree"
                );
            }
        }
    }
}
