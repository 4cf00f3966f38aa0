//! K-quant super-blocks (256 weights: Q4_K, Q5_K, Q6_K) against 8-bit
//! activations. Each 32-value activation block meets one 32-weight sub-block
//! with its own scale and minimum (Q4_K, Q5_K) or two 16-weight halves with
//! their own scales (Q6_K); the products are exact integer sums, scaled once
//! per sub-block. A (row, vector) result is computed the same way whatever
//! else is in the batch.

use super::dequant::scale_min_k4;
use super::f16_at;
use super::outputs::Outputs;
use super::q8::{Q8Activations, Q8Batch, each};

/// Bytes of a Q4_K super-block: d, dmin, 12 bytes of packed scales, 128 of nibbles.
const Q4_K_BYTES: usize = 144;
/// Bytes of a Q5_K super-block: as Q4_K plus 32 bytes of fifth bits.
const Q5_K_BYTES: usize = 176;
/// Bytes of a Q6_K super-block: 128 low nibbles, 64 of high bit pairs, 16 scales, d.
const Q6_K_BYTES: usize = 210;

/// A Q4_K/Q5_K super-block's twelve packed bytes as its eight 6-bit scales
/// (bytes 0–7) and eight 6-bit minimums (bytes 8–15), decoded a word at a
/// time (the same values as `scale_min_k4`, without its branches).
fn unpack_scales_and_mins(packed: &[u8]) -> [u8; 16] {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| {
        u32::from_le_bytes([
            packed[4 * i],
            packed[4 * i + 1],
            packed[4 * i + 2],
            packed[4 * i + 3],
        ])
    };
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let words = [
        u0 & LOW6,
        (u2 & LOW4) | (((u0 >> 6) & LOW2) << 4),
        u1 & LOW6,
        ((u2 >> 4) & LOW4) | (((u1 >> 6) & LOW2) << 4),
    ];
    let mut out = [0u8; 16];
    for (chunk, w) in out.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// Panics unless `a` covers `row` (of `bytes`-byte super-blocks).
fn check(row: &[u8], bytes: usize, a: &Q8Activations) -> usize {
    assert!(row.len().is_multiple_of(bytes), "whole super-blocks");
    let blocks = 8 * row.len() / bytes;
    assert!(a.q.len() >= 32 * blocks && a.scales.len() >= blocks && a.sums.len() >= blocks);
    row.len() / bytes
}

/// The portable kernels, and the reference the AVX2 ones are tested against.
pub(super) mod portable {
    use super::*;

    pub(crate) fn q4_k(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>) {
        each(rows, row_bytes, batch, out, q4_k_row);
    }

    pub(crate) fn q5_k(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>) {
        each(rows, row_bytes, batch, out, q5_k_row);
    }

    pub(crate) fn q6_k(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>) {
        each(rows, row_bytes, batch, out, q6_k_row);
    }

    /// Q4_K and Q5_K: sub-block `j` of a super-block is nibble half `j % 2`
    /// of bytes `32 × (j / 2)..`, plus 16 where bit `j` of `qh[l]` is set (Q5_K).
    fn q45_k_row(row: &[u8], a: &Q8Activations, bytes: usize, fifth_bits: bool) -> f32 {
        check(row, bytes, a);
        let mut total = 0.0;
        for (sb, b) in row.chunks_exact(bytes).enumerate() {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let (qh, qs) = if fifth_bits {
                (&b[16..48], &b[48..176])
            } else {
                (&b[0..0], &b[16..144])
            };
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, scales);
                let blk = 8 * sb + j;
                let xq = &a.q[32 * blk..32 * blk + 32];
                let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                let mut s = 0i32;
                for l in 0..32 {
                    let mut w = ((q[l] >> (4 * (j % 2))) & 0x0F) as i32;
                    if fifth_bits && qh[l] & (1 << j) != 0 {
                        w += 16;
                    }
                    s += w * xq[l] as i32;
                }
                total += d * sc as f32 * a.scales[blk] * s as f32 - dmin * m as f32 * a.sums[blk];
            }
        }
        total
    }

    pub(crate) fn q4_k_row(row: &[u8], a: &Q8Activations) -> f32 {
        q45_k_row(row, a, Q4_K_BYTES, false)
    }

    pub(crate) fn q5_k_row(row: &[u8], a: &Q8Activations) -> f32 {
        q45_k_row(row, a, Q5_K_BYTES, true)
    }

    /// Q6_K: each 128-weight half holds four activation blocks `k`: low
    /// nibbles (k even) or high nibbles (k odd ≥ 2) of `ql`, bit pair `k` of
    /// `qh`, value − 32, scales `2k` and `2k + 1` for the two 16-weight halves.
    pub(crate) fn q6_k_row(row: &[u8], a: &Q8Activations) -> f32 {
        check(row, Q6_K_BYTES, a);
        let mut total = 0.0;
        for (sb, b) in row.chunks_exact(Q6_K_BYTES).enumerate() {
            let d = f16_at(b, 208);
            for half in 0..2 {
                let ql = &b[64 * half..64 * half + 64];
                let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                for k in 0..4 {
                    let blk = 8 * sb + 4 * half + k;
                    let xq = &a.q[32 * blk..32 * blk + 32];
                    let mut s = [0i32; 2];
                    for l in 0..32 {
                        let low = (ql[l + 32 * (k % 2)] >> (4 * (k / 2))) & 0x0F;
                        let high = (qh[l] >> (2 * k)) & 3;
                        let w = (low | (high << 4)) as i32 - 32;
                        s[l / 16] += w * xq[l] as i32;
                    }
                    let scale = d * a.scales[blk];
                    total += scale
                        * ((sc[2 * k] as i8) as f32 * s[0] as f32
                            + (sc[2 * k + 1] as i8) as f32 * s[1] as f32);
                }
            }
        }
        total
    }
}

/// The AVX2 kernels: per sub-block, `maddubs` + `madd` give eight exact i32
/// partial sums, converted and accumulated with one fused multiply-add by
/// the sub-block's combined scale.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    use super::super::x86::{f16c_at, hsum};
    use super::*;

    pub(crate) fn q4_k(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>) {
        // SAFETY: `q8_kernel` selects this kernel only for `Isa::Avx2`, which
        // the CPU reported: it has AVX2, FMA and F16C.
        unsafe { q45_k_rows::<false>(rows, row_bytes, batch, out) }
    }

    pub(crate) fn q5_k(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>) {
        // SAFETY: as in `q4_k`: selected only for `Isa::Avx2` (AVX2, FMA, F16C).
        unsafe { q45_k_rows::<true>(rows, row_bytes, batch, out) }
    }

    pub(crate) fn q6_k(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>) {
        // SAFETY: as in `q4_k`: selected only for `Isa::Avx2` (AVX2, FMA, F16C).
        unsafe { q6_k_rows(rows, row_bytes, batch, out) }
    }

    /// Σ w × x over 32 bytes (w unsigned), as 8 exact i32 lanes: lanes 0–3
    /// cover bytes 0–15, lanes 4–7 bytes 16–31.
    ///
    /// # Safety
    /// `x` must point at 32 readable bytes; only call from AVX2 code.
    #[inline(always)]
    unsafe fn dot32(w: __m256i, x: *const i8) -> __m256i {
        // SAFETY: `x` points at 32 readable bytes, loaded unaligned; the
        // caller is compiled with AVX2 (both the contract).
        unsafe {
            let x = _mm256_loadu_si256(x as *const __m256i);
            _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
        }
    }

    /// 32 bytes from `p`. (A function, not a closure: closures would not
    /// inherit the caller's target features.)
    ///
    /// # Safety
    /// `p` must point at 32 readable bytes; only call from AVX code.
    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        // SAFETY: `p` points at 32 readable bytes, loaded unaligned; the
        // caller is compiled with AVX (both the contract).
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    }

    /// Panics unless every vector covers a row of `row_bytes`; returns the
    /// vectors' results per row, zeroed.
    fn accumulators(row_bytes: usize, bytes: usize, batch: &Q8Batch) -> (Vec<__m256>, Vec<__m256>) {
        assert!(row_bytes.is_multiple_of(bytes), "whole super-blocks");
        let blocks = 8 * row_bytes / bytes;
        for a in &batch.vectors {
            assert!(a.q.len() >= 32 * blocks && a.scales.len() >= blocks && a.sums.len() >= blocks);
        }
        // SAFETY: AVX is available to every caller (they are AVX2 kernels).
        let zero = unsafe { _mm256_setzero_ps() };
        (vec![zero; batch.len()], vec![zero; batch.len()])
    }

    /// Q4_K (`FIFTH = false`) or Q5_K (`true`) rows · every vector: each
    /// super-block's weights and scales are unpacked once for all vectors.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q45_k_rows<const FIFTH: bool>(
        rows: &[u8],
        row_bytes: usize,
        batch: &Q8Batch,
        out: &mut Outputs<'_>,
    ) {
        let bytes = if FIFTH { Q5_K_BYTES } else { Q4_K_BYTES };
        assert_eq!(out.count(), rows.len() / row_bytes);
        assert_eq!(out.vectors(), batch.len());
        let (mut acc, mut minimums) = accumulators(row_bytes, bytes, batch);
        let nibbles = _mm256_set1_epi8(0x0F);
        for (r, row) in rows.chunks_exact(row_bytes).enumerate() {
            acc.fill(_mm256_setzero_ps());
            minimums.fill(_mm256_setzero_ps());
            for (sb, b) in row.chunks_exact(bytes).enumerate() {
                let (d, dmin) = (f16c_at(b, 0), f16c_at(b, 2));
                let scales = &b[4..16];
                let qs = if FIFTH { &b[48..176] } else { &b[16..144] };
                let mut w = [_mm256_setzero_si256(); 8];
                let (mut ds, mut dm) = ([0f32; 8], [0f32; 8]);
                // SAFETY: the loads stay within this super-block's bytes.
                unsafe {
                    let qh = if FIFTH {
                        load(b.as_ptr().add(16))
                    } else {
                        _mm256_setzero_si256()
                    };
                    for pair in 0..4 {
                        let v = load(qs.as_ptr().add(32 * pair));
                        w[2 * pair] = _mm256_and_si256(v, nibbles);
                        w[2 * pair + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibbles);
                    }
                    for (j, w) in w.iter_mut().enumerate() {
                        if FIFTH {
                            let bit = _mm256_set1_epi8(1 << j);
                            let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                            *w = _mm256_or_si256(*w, _mm256_and_si256(set, _mm256_set1_epi8(16)));
                        }
                    }
                }
                let packed = unpack_scales_and_mins(scales);
                for j in 0..8 {
                    (ds[j], dm[j]) = (d * packed[j] as f32, dmin * packed[8 + j] as f32);
                }
                // SAFETY: `dm` holds eight floats.
                let dm = unsafe { _mm256_loadu_ps(dm.as_ptr()) };
                for ((a, acc), minimum) in batch.vectors.iter().zip(&mut acc).zip(&mut minimums) {
                    // Two chains (even and odd sub-blocks) in registers: a
                    // single chain through `acc` left the loop latency-bound.
                    let mut chains = [_mm256_setzero_ps(); 2];
                    for j in 0..8 {
                        let blk = 8 * sb + j;
                        // SAFETY: `accumulators` asserted the vector covers every block.
                        unsafe {
                            let p = dot32(w[j], a.q.as_ptr().add(32 * blk));
                            let scale = _mm256_set1_ps(ds[j] * a.scales[blk]);
                            chains[j % 2] =
                                _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, chains[j % 2]);
                        }
                    }
                    *acc = _mm256_add_ps(*acc, _mm256_add_ps(chains[0], chains[1]));
                    // SAFETY: as above: the vector's sums cover the super-block.
                    let sums = unsafe { _mm256_loadu_ps(a.sums.as_ptr().add(8 * sb)) };
                    *minimum = _mm256_fmadd_ps(dm, sums, *minimum);
                }
            }
            for (t, (acc, minimum)) in acc.iter().zip(&minimums).enumerate() {
                // SAFETY: AVX is enabled here.
                out.put(t, r, &[unsafe { hsum(*acc) - hsum(*minimum) }]);
            }
        }
    }

    /// Q6_K rows · every vector, each super-block unpacked once for all vectors.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_k_rows(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>) {
        assert_eq!(out.count(), rows.len() / row_bytes);
        assert_eq!(out.vectors(), batch.len());
        let (mut acc, _) = accumulators(row_bytes, Q6_K_BYTES, batch);
        let (nibbles, pair) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
        let offset = _mm256_set1_epi8(32);
        for (r, row) in rows.chunks_exact(row_bytes).enumerate() {
            acc.fill(_mm256_setzero_ps());
            for (sb, b) in row.chunks_exact(Q6_K_BYTES).enumerate() {
                let d = f16c_at(b, 208);
                let mut w = [_mm256_setzero_si256(); 8];
                let mut scales = [_mm256_setzero_ps(); 8];
                // SAFETY: the loads stay within this super-block's bytes.
                unsafe {
                    for half in 0..2 {
                        let at = |offset: usize| b.as_ptr().add(offset);
                        let (ql0, ql1, qh) = (
                            load(at(64 * half)),
                            load(at(64 * half + 32)),
                            load(at(128 + 32 * half)),
                        );
                        let lows = [
                            _mm256_and_si256(ql0, nibbles),
                            _mm256_and_si256(ql1, nibbles),
                            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), nibbles),
                            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), nibbles),
                        ];
                        let highs = [
                            _mm256_and_si256(qh, pair),
                            _mm256_and_si256(_mm256_srli_epi16(qh, 2), pair),
                            _mm256_and_si256(_mm256_srli_epi16(qh, 4), pair),
                            _mm256_and_si256(_mm256_srli_epi16(qh, 6), pair),
                        ];
                        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                        for k in 0..4 {
                            w[4 * half + k] =
                                _mm256_or_si256(lows[k], _mm256_slli_epi16(highs[k], 4));
                            // Lanes 0–3 hold bytes 0–15 (scale 2k), lanes 4–7 bytes 16–31 (2k + 1).
                            scales[4 * half + k] = _mm256_set_m128(
                                _mm_set1_ps(d * (sc[2 * k + 1] as i8) as f32),
                                _mm_set1_ps(d * (sc[2 * k] as i8) as f32),
                            );
                        }
                    }
                }
                for (a, acc) in batch.vectors.iter().zip(&mut acc) {
                    // Two chains in registers, as in `q45_k_rows`.
                    let mut chains = [_mm256_setzero_ps(); 2];
                    for k in 0..8 {
                        let blk = 8 * sb + k;
                        // SAFETY: `accumulators` asserted the vector covers every block.
                        unsafe {
                            let x = load(a.q.as_ptr().add(32 * blk) as *const u8);
                            // Σ (w − 32) x in i16 pairs: |63 × 127 × 2| + |32 × 127 × 2| < 2^15.
                            let pairs = _mm256_sub_epi16(
                                _mm256_maddubs_epi16(w[k], x),
                                _mm256_maddubs_epi16(offset, x),
                            );
                            let p = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
                            let scale = _mm256_mul_ps(scales[k], _mm256_set1_ps(a.scales[blk]));
                            chains[k % 2] =
                                _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, chains[k % 2]);
                        }
                    }
                    *acc = _mm256_add_ps(*acc, _mm256_add_ps(chains[0], chains[1]));
                }
            }
            for (t, acc) in acc.iter().enumerate() {
                // SAFETY: AVX is enabled here.
                out.put(t, r, &[unsafe { hsum(*acc) }]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_noise;

    #[test]
    fn packed_scales_unpack_like_scale_min_k4() {
        for seed in 0..64 {
            let packed = test_noise(12, seed);
            let got = unpack_scales_and_mins(&packed);
            for j in 0..8 {
                assert_eq!(
                    (got[j], got[8 + j]),
                    scale_min_k4(j, &packed),
                    "seed {seed} j {j}"
                );
            }
        }
    }
}
