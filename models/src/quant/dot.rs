//! Fused dot products of a quantized row with an f32 vector: the weights are
//! never expanded into a buffer. Each kernel is compiled twice, once for
//! baseline x86-64 (or any other target) and once with AVX2+FMA, and the
//! right copy is picked at run time.

use half::f16;

use crate::gguf::GgmlType;

use super::dequant::dequantize;

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

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
                    // SAFETY: only selected by `kernel()` after the CPU reported these features.
                    unsafe { inner(row, x) }
                }
            )*
        }
    };
}

kernels!(f32_row, f16_row);

/// Portable copies of the kernels that have hand-written AVX2 versions.
mod portable_simple {
    pub(super) fn q5_0(row: &[u8], x: &[f32]) -> f32 {
        super::generic::q5_0(row, x)
    }
    pub(super) fn q4_k(row: &[u8], x: &[f32]) -> f32 {
        super::generic::q4_k(row, x)
    }
    pub(super) fn q6_k(row: &[u8], x: &[f32]) -> f32 {
        super::generic::q6_k(row, x)
    }
}

/// Hand-written AVX2+FMA kernels for Q5_0, Q4_K and Q6_K (Gemma's block types).
/// Q4_0, Q4_1 and Q8_0 use the integer kernels of `q8` instead.
#[cfg(target_arch = "x86_64")]
mod avx2_simple {
    use std::arch::x86_64::*;

    use super::super::x86::{f16_at as f16, hsum};

    /// Widens 8 bytes (as unsigned) to 8 floats.
    #[inline(always)]
    unsafe fn u8x8(v: __m128i) -> __m256 {
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)) }
    }

    /// Eight unsigned bytes at `p`, widened to eight i32 lanes.
    #[inline(always)]
    unsafe fn u8x8_i32(p: *const u8) -> __m256i {
        unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_0_inner(row: &[u8], x: &[f32]) -> f32 {
        let bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let sixteen = _mm256_set1_epi32(16);
        let fifteen = _mm256_set1_epi32(15);
        let mut total = _mm256_setzero_ps();
        for (b, x) in row.chunks_exact(22).zip(x.chunks_exact(32)) {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = b[6..22].as_ptr();
            let xp = x.as_ptr();
            // SAFETY: 16 quant bytes and 32 values per block.
            let acc = unsafe {
                let mut acc = _mm256_setzero_ps();
                for k in 0..4 {
                    // Elements 8k..8k+8: low nibbles for k < 2, high nibbles for k >= 2.
                    let raw = u8x8_i32(qs.add(8 * (k % 2)));
                    let nib = if k < 2 {
                        _mm256_and_si256(raw, fifteen)
                    } else {
                        _mm256_srli_epi32(raw, 4)
                    };
                    let h = _mm256_set1_epi32(((qh >> (8 * k)) & 0xFF) as i32);
                    let high = _mm256_and_si256(
                        _mm256_cmpeq_epi32(_mm256_and_si256(h, bits), bits),
                        sixteen,
                    );
                    let q = _mm256_sub_epi32(_mm256_or_si256(nib, high), sixteen);
                    acc =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_loadu_ps(xp.add(8 * k)), acc);
                }
                acc
            };
            total = _mm256_fmadd_ps(_mm256_set1_ps(f16(b, 0)), acc, total);
        }
        unsafe { hsum(total) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_k_inner(row: &[u8], x: &[f32]) -> f32 {
        let mut total = _mm256_setzero_ps();
        for (b, x) in row.chunks_exact(144).zip(x.chunks_exact(256)) {
            let (d, dmin) = (f16(b, 0), f16(b, 2));
            let scales = &b[4..16];
            for chunk in 0..4 {
                let (s1, m1) = scale_min(2 * chunk, scales);
                let (s2, m2) = scale_min(2 * chunk + 1, scales);
                let q = &b[16 + 32 * chunk..16 + 32 * chunk + 32];
                let xc = &x[64 * chunk..64 * chunk + 64];
                // SAFETY: 32 quant bytes and 64 values per chunk.
                unsafe {
                    let (lo, xs_lo) = nibble_half(q, &xc[..32], false);
                    let (hi, xs_hi) = nibble_half(q, &xc[32..], true);
                    total = _mm256_fmadd_ps(_mm256_set1_ps(d * s1), lo, total);
                    total = _mm256_fmadd_ps(_mm256_set1_ps(d * s2), hi, total);
                    total = _mm256_fmadd_ps(_mm256_set1_ps(-dmin * m1), xs_lo, total);
                    total = _mm256_fmadd_ps(_mm256_set1_ps(-dmin * m2), xs_hi, total);
                }
            }
        }
        unsafe { hsum(total) }
    }

    /// One 32-value half of a Q4_K chunk: the low (or high) nibbles of 32 bytes
    /// times `x`, and the sum of `x`.
    #[inline(always)]
    unsafe fn nibble_half(q: &[u8], x: &[f32], high: bool) -> (__m256, __m256) {
        unsafe {
            let mask = _mm_set1_epi8(0x0F);
            let mut acc = _mm256_setzero_ps();
            let mut xs = _mm256_setzero_ps();
            for k in 0..2 {
                let v = _mm_loadu_si128(q.as_ptr().add(16 * k) as *const __m128i);
                let v = if high {
                    _mm_and_si128(_mm_srli_epi16(v, 4), mask)
                } else {
                    _mm_and_si128(v, mask)
                };
                let x0 = _mm256_loadu_ps(x.as_ptr().add(16 * k));
                let x1 = _mm256_loadu_ps(x.as_ptr().add(16 * k + 8));
                acc = _mm256_fmadd_ps(u8x8(v), x0, acc);
                acc = _mm256_fmadd_ps(u8x8(_mm_srli_si128(v, 8)), x1, acc);
                xs = _mm256_add_ps(xs, _mm256_add_ps(x0, x1));
            }
            (acc, xs)
        }
    }

    #[inline(always)]
    fn scale_min(j: usize, q: &[u8]) -> (f32, f32) {
        let (s, m) = if j < 4 {
            (q[j] & 63, q[j + 4] & 63)
        } else {
            (
                (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
                (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
            )
        };
        (s as f32, m as f32)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_k_inner(row: &[u8], x: &[f32]) -> f32 {
        let three = _mm256_set1_epi32(3);
        let fifteen = _mm256_set1_epi32(15);
        let thirty_two = _mm256_set1_epi32(32);
        let mut total = _mm256_setzero_ps();
        for (b, x) in row.chunks_exact(210).zip(x.chunks_exact(256)) {
            let d = f16(b, 208);
            for half in 0..2 {
                let ql = b[64 * half..].as_ptr();
                let qh = b[128 + 32 * half..].as_ptr();
                let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                let xp = x[128 * half..].as_ptr();
                // SAFETY: each half reads 64 ql bytes, 32 qh bytes and 128 values.
                unsafe {
                    for l in (0..32).step_by(8) {
                        let is = l / 16;
                        let a = u8x8_i32(ql.add(l));
                        let c = u8x8_i32(ql.add(l + 32));
                        let h = u8x8_i32(qh.add(l));
                        let parts = [
                            (
                                _mm256_and_si256(a, fifteen),
                                _mm256_and_si256(h, three),
                                0,
                                is,
                            ),
                            (
                                _mm256_and_si256(c, fifteen),
                                _mm256_and_si256(_mm256_srli_epi32(h, 2), three),
                                32,
                                is + 2,
                            ),
                            (
                                _mm256_srli_epi32(a, 4),
                                _mm256_and_si256(_mm256_srli_epi32(h, 4), three),
                                64,
                                is + 4,
                            ),
                            (
                                _mm256_srli_epi32(c, 4),
                                _mm256_and_si256(_mm256_srli_epi32(h, 6), three),
                                96,
                                is + 6,
                            ),
                        ];
                        for (low, high, offset, scale) in parts {
                            let q = _mm256_sub_epi32(
                                _mm256_or_si256(low, _mm256_slli_epi32(high, 4)),
                                thirty_two,
                            );
                            let w = _mm256_mul_ps(
                                _mm256_cvtepi32_ps(q),
                                _mm256_set1_ps(d * (sc[scale] as i8) as f32),
                            );
                            total = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(offset + l)), total);
                        }
                    }
                }
            }
        }
        unsafe { hsum(total) }
    }

    // SAFETY (all three): only selected by `kernel()` after the CPU reported
    // AVX2, FMA and F16C; every block is read within its bounds.
    pub(super) fn q5_0(row: &[u8], x: &[f32]) -> f32 {
        unsafe { q5_0_inner(row, x) }
    }
    pub(super) fn q4_k(row: &[u8], x: &[f32]) -> f32 {
        unsafe { q4_k_inner(row, x) }
    }
    pub(super) fn q6_k(row: &[u8], x: &[f32]) -> f32 {
        unsafe { q6_k_inner(row, x) }
    }
}

/// The fastest kernel for `ty` on this CPU, or `None` if `ty` has no fused kernel.
pub fn kernel(ty: GgmlType) -> Option<DotFn> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return avx2_kernel(ty);
        }
    }
    portable_kernel(ty)
}

macro_rules! select {
    ($module:ident, $simple:ident, $ty:expr) => {
        Some(match $ty {
            GgmlType::Q5_0 => $simple::q5_0 as DotFn,
            GgmlType::Q4K => $simple::q4_k,
            GgmlType::Q6K => $simple::q6_k,
            GgmlType::F32 => $module::f32_row,
            GgmlType::F16 => $module::f16_row,
            _ => return None,
        })
    };
}

fn portable_kernel(ty: GgmlType) -> Option<DotFn> {
    select!(portable, portable_simple, ty)
}

#[cfg(target_arch = "x86_64")]
fn avx2_kernel(ty: GgmlType) -> Option<DotFn> {
    select!(avx2, avx2_simple, ty)
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
    pub(super) fn q5_0(row: &[u8], x: &[f32]) -> f32 {
        let mut total = 0.0;
        for (b, x) in row.chunks_exact(22).zip(x.chunks_exact(32)) {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = &b[6..22];
            let mut acc = [0f32; 8];
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                let q0 = ((qs[j] & 0x0F) as u32 | h0) as f32 - 16.0;
                let q1 = ((qs[j] >> 4) as u32 | h1) as f32 - 16.0;
                acc[j % 8] += q0 * x[j] + q1 * x[j + 16];
            }
            total += f16_at(b, 0) * sum8(acc);
        }
        total
    }

    #[inline(always)]
    fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
        let (s, m) = if j < 4 {
            (q[j] & 63, q[j + 4] & 63)
        } else {
            (
                (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
                (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
            )
        };
        (s as f32, m as f32)
    }

    #[inline(always)]
    pub(super) fn q4_k(row: &[u8], x: &[f32]) -> f32 {
        let mut total = 0.0;
        for (b, x) in row.chunks_exact(144).zip(x.chunks_exact(256)) {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qs = &b[16..144];
            for chunk in 0..4 {
                let q = &qs[32 * chunk..32 * chunk + 32];
                let xa = &x[64 * chunk..64 * chunk + 32];
                let xb = &x[64 * chunk + 32..64 * chunk + 64];
                let (mut lo, mut hi, mut sa, mut sb) = ([0f32; 8], [0f32; 8], [0f32; 8], [0f32; 8]);
                for l in 0..32 {
                    lo[l % 8] += (q[l] & 0x0F) as f32 * xa[l];
                    hi[l % 8] += (q[l] >> 4) as f32 * xb[l];
                    sa[l % 8] += xa[l];
                    sb[l % 8] += xb[l];
                }
                let (s1, m1) = scale_min_k4(2 * chunk, scales);
                let (s2, m2) = scale_min_k4(2 * chunk + 1, scales);
                total +=
                    d * (s1 * sum8(lo) + s2 * sum8(hi)) - dmin * (m1 * sum8(sa) + m2 * sum8(sb));
            }
        }
        total
    }

    #[inline(always)]
    pub(super) fn q6_k(row: &[u8], x: &[f32]) -> f32 {
        let mut total = 0.0;
        for (b, x) in row.chunks_exact(210).zip(x.chunks_exact(256)) {
            let d = f16_at(b, 208);
            for half in 0..2 {
                let ql = &b[64 * half..64 * half + 64];
                let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                let x = &x[128 * half..128 * half + 128];
                let mut acc = [[0f32; 8]; 8];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as f32 - 32.0;
                    let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as f32 - 32.0;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as f32 - 32.0;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as f32 - 32.0;
                    acc[is][l % 8] += q1 * x[l];
                    acc[is + 2][l % 8] += q2 * x[l + 32];
                    acc[is + 4][l % 8] += q3 * x[l + 64];
                    acc[is + 6][l % 8] += q4 * x[l + 96];
                }
                let mut sum = 0.0;
                for (k, a) in acc.iter().enumerate() {
                    sum += (sc[k] as i8) as f32 * sum8(*a);
                }
                total += d * sum;
            }
        }
        total
    }

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

    /// Random blocks with sane (small, finite) f16 scales.
    fn blocks(ty: GgmlType, n_blocks: usize, seed: u64) -> Vec<u8> {
        let (_, size) = ty.block_layout().unwrap();
        let mut bytes = noise(size * n_blocks, seed);
        let scale = |v: f32| f16::from_f32(v).to_le_bytes();
        for (i, b) in bytes.chunks_exact_mut(size).enumerate() {
            let d = scale(0.01 + (i % 7) as f32 * 0.003);
            let m = scale(-0.02 * (i % 3) as f32);
            match ty {
                GgmlType::Q5_0 => b[..2].copy_from_slice(&d),
                GgmlType::Q4K => {
                    b[..2].copy_from_slice(&d);
                    b[2..4].copy_from_slice(&m);
                }
                GgmlType::Q6K => b[208..210].copy_from_slice(&d),
                GgmlType::F32 => b.copy_from_slice(&(((i % 11) as f32) - 5.0).to_le_bytes()),
                GgmlType::F16 => b.copy_from_slice(&scale((i % 13) as f32 - 6.0)),
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
        // Q4_0, Q4_1 and Q8_0 run on the integer kernels, tested in `q8`.
        for ty in [
            GgmlType::Q5_0,
            GgmlType::Q4K,
            GgmlType::Q6K,
            GgmlType::F32,
            GgmlType::F16,
        ] {
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
                    ("selected", kernel(ty).unwrap()),
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
        assert!(kernel(GgmlType::Q5_1).is_none());
        assert!(
            kernel(GgmlType::Q4_1).is_none(),
            "Q4_1 belongs to the integer kernels"
        );
    }
}
