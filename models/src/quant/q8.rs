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

/// Vectors per interleaved group of a [`Q8Batch`].
pub const GROUP: usize = 4;

/// Several activation vectors quantized for the integer kernels: each one
/// alone, and whole groups of [`GROUP`] interleaved block by block (the four
/// vectors' bytes of a block, then their scales and sums, side by side) so a
/// kernel multiplies one weight block with four vectors in wide registers.
#[derive(Debug, Clone, Default)]
pub struct Q8Batch {
    /// Every vector on its own.
    pub vectors: Vec<Q8Activations>,
    /// `vectors.len() / GROUP` groups: per block, `GROUP × 32` bytes.
    group_q: Vec<Vec<i8>>,
    /// Per group, per block: `GROUP` scales.
    group_scales: Vec<Vec<f32>>,
    /// Per group, per block: `GROUP` sums.
    group_sums: Vec<Vec<f32>>,
}

impl Q8Batch {
    /// Quantizes `n` vectors, the rows of `x`.
    pub fn quantize(x: &[f32], n: usize) -> Self {
        let cols = x.len() / n.max(1);
        let vectors: Vec<Q8Activations> = x
            .chunks_exact(cols.max(1))
            .map(|row| {
                let mut a = Q8Activations::default();
                a.quantize(row);
                a
            })
            .collect();
        let blocks = cols / 32;
        let mut batch = Q8Batch::default();
        for group in vectors.chunks_exact(GROUP) {
            let mut q = Vec::with_capacity(GROUP * cols);
            let mut scales = Vec::with_capacity(GROUP * blocks);
            let mut sums = Vec::with_capacity(GROUP * blocks);
            for b in 0..blocks {
                for a in group {
                    q.extend_from_slice(&a.q[32 * b..32 * b + 32]);
                    scales.push(a.scales[b]);
                    sums.push(a.sums[b]);
                }
            }
            batch.group_q.push(q);
            batch.group_scales.push(scales);
            batch.group_sums.push(sums);
        }
        batch.vectors = vectors;
        batch
    }

    /// How many vectors.
    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }
}

/// A kernel: `out[t] = row · vector t` for every vector of the batch, where
/// `row` holds whole weight blocks covering each vector.
pub type Q8DotFn = fn(&[u8], &Q8Batch, &mut [f32]);

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
        GgmlType::Q4_0 => Some(|row, batch, out| portable::each(row, batch, out, portable::q4_0)),
        GgmlType::Q4_1 => Some(|row, batch, out| portable::each(row, batch, out, portable::q4_1)),
        GgmlType::Q8_0 => Some(|row, batch, out| portable::each(row, batch, out, portable::q8_0)),
        _ => None,
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

mod portable {
    use super::*;

    /// One activation vector at a time.
    pub(super) fn each(
        row: &[u8],
        batch: &Q8Batch,
        out: &mut [f32],
        kernel: fn(&[u8], &Q8Activations) -> f32,
    ) {
        for (a, o) in batch.vectors.iter().zip(out) {
            *o = kernel(row, a);
        }
    }

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

    use super::super::x86::f16_at;
    use super::{GROUP, Q8Activations, Q8Batch};

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

    // Two shapes per type: one vector (decode), and a group of four
    // interleaved vectors (prefill, concurrent decodes), where a weight block
    // is unpacked once and the four integer dot products are reduced
    // together into one 4-lane vector, so the scale arithmetic runs once per
    // block for all four.

    /// The four i32 dot products of `w` with the group's vectors at `x`
    /// (4 × 32 bytes), as 4 f32 lanes.
    #[inline(always)]
    unsafe fn dot4(w: __m256i, x: *const i8, signed_w: bool) -> __m128 {
        // No closures here: they would not inherit the caller's target features.
        unsafe {
            let (w, sign) = if signed_w {
                (_mm256_sign_epi8(w, w), Some(w))
            } else {
                (w, None)
            };
            let mut p = [_mm256_setzero_si256(); 4];
            for (k, pk) in p.iter_mut().enumerate() {
                let mut xk = _mm256_loadu_si256(x.add(32 * k) as *const __m256i);
                if let Some(s) = sign {
                    xk = _mm256_sign_epi8(xk, s);
                }
                *pk = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xk), _mm256_set1_epi16(1));
            }
            let h01 = _mm256_hadd_epi32(p[0], p[1]);
            let h23 = _mm256_hadd_epi32(p[2], p[3]);
            let h = _mm256_hadd_epi32(h01, h23);
            let sum = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
            _mm_cvtepi32_ps(sum)
        }
    }

    // The block loops below keep two accumulators (even and odd blocks), so
    // consecutive blocks' multiply-adds do not wait on each other.
    //
    // Batch invariance: a vector's result is bit-for-bit the same whether it
    // runs alone (`*_one`) or in a group (`*_four`): both reduce each block's
    // integer dot product exactly, then apply the same float operations in
    // the same order. So a request's tokens never depend on what else shares
    // its batch.

    /// Exact sum of the eight i32 lanes.
    #[inline(always)]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        unsafe {
            let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            _mm_cvtsi128_si32(s)
        }
    }

    /// Σ u8 × i8 over 32 bytes, exactly.
    #[inline(always)]
    unsafe fn idot(w: __m256i, x: __m256i) -> f32 {
        unsafe {
            let pairs = _mm256_maddubs_epi16(w, x);
            hsum_i32(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1))) as f32
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_one(row: &[u8], a: &Q8Activations) -> f32 {
        let mut total = [0f32; 2];
        let mut mins = [0f32; 2];
        for (i, b) in row.chunks_exact(20).enumerate() {
            // SAFETY: 16 nibble bytes per block; 32 activation bytes per block (checked by callers).
            let dot = unsafe {
                let w = unpack_nibbles(b.as_ptr().add(4));
                idot(
                    w,
                    _mm256_loadu_si256(a.q.as_ptr().add(32 * i) as *const __m256i),
                )
            };
            let k = i & 1;
            total[k] = (f16_at(b, 0) * a.scales[i]).mul_add(dot, total[k]);
            mins[k] = f16_at(b, 2).mul_add(a.sums[i], mins[k]);
        }
        (total[0] + total[1]) + (mins[0] + mins[1])
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_four(row: &[u8], q: &[i8], scales: &[f32], sums: &[f32]) -> __m128 {
        let mut total = [_mm_setzero_ps(); 2];
        let mut mins = [_mm_setzero_ps(); 2];
        for (i, b) in row.chunks_exact(20).enumerate() {
            // SAFETY: per block the group holds 4 × 32 bytes and 4 scales and sums (checked by callers).
            unsafe {
                let w = unpack_nibbles(b.as_ptr().add(4));
                let dots = dot4(w, q.as_ptr().add(128 * i), false);
                let s = _mm_loadu_ps(scales.as_ptr().add(4 * i));
                let m = _mm_loadu_ps(sums.as_ptr().add(4 * i));
                let k = i & 1;
                total[k] = _mm_fmadd_ps(_mm_mul_ps(_mm_set1_ps(f16_at(b, 0)), s), dots, total[k]);
                mins[k] = _mm_fmadd_ps(_mm_set1_ps(f16_at(b, 2)), m, mins[k]);
            }
        }
        _mm_add_ps(_mm_add_ps(total[0], total[1]), _mm_add_ps(mins[0], mins[1]))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0_one(row: &[u8], a: &Q8Activations) -> f32 {
        let mut total = [0f32; 2];
        let mut offsets = [0f32; 2];
        for (i, b) in row.chunks_exact(18).enumerate() {
            // SAFETY: as for Q4_1. The -8 offset is applied through the block sums.
            let dot = unsafe {
                let w = unpack_nibbles(b.as_ptr().add(2));
                idot(
                    w,
                    _mm256_loadu_si256(a.q.as_ptr().add(32 * i) as *const __m256i),
                )
            };
            let d = f16_at(b, 0);
            let k = i & 1;
            total[k] = (d * a.scales[i]).mul_add(dot, total[k]);
            offsets[k] = (d * 8.0).mul_add(a.sums[i], offsets[k]);
        }
        (total[0] + total[1]) - (offsets[0] + offsets[1])
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0_four(row: &[u8], q: &[i8], scales: &[f32], sums: &[f32]) -> __m128 {
        let mut total = [_mm_setzero_ps(); 2];
        let mut offsets = [_mm_setzero_ps(); 2];
        for (i, b) in row.chunks_exact(18).enumerate() {
            // SAFETY: as for Q4_1.
            unsafe {
                let w = unpack_nibbles(b.as_ptr().add(2));
                let dots = dot4(w, q.as_ptr().add(128 * i), false);
                let d = _mm_set1_ps(f16_at(b, 0));
                let s = _mm_loadu_ps(scales.as_ptr().add(4 * i));
                let m = _mm_loadu_ps(sums.as_ptr().add(4 * i));
                let k = i & 1;
                total[k] = _mm_fmadd_ps(_mm_mul_ps(d, s), dots, total[k]);
                offsets[k] = _mm_fmadd_ps(_mm_mul_ps(d, _mm_set1_ps(8.0)), m, offsets[k]);
            }
        }
        _mm_sub_ps(
            _mm_add_ps(total[0], total[1]),
            _mm_add_ps(offsets[0], offsets[1]),
        )
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_one(row: &[u8], a: &Q8Activations) -> f32 {
        let mut total = [0f32; 2];
        for (i, b) in row.chunks_exact(34).enumerate() {
            // SAFETY: 32 weight bytes and 32 activation bytes per block.
            let dot = unsafe {
                let w = _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i);
                let x = _mm256_loadu_si256(a.q.as_ptr().add(32 * i) as *const __m256i);
                // maddubs needs one unsigned side: |w| × (x with w's sign).
                idot(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
            };
            let k = i & 1;
            total[k] = (f16_at(b, 0) * a.scales[i]).mul_add(dot, total[k]);
        }
        total[0] + total[1]
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_four(row: &[u8], q: &[i8], scales: &[f32], _sums: &[f32]) -> __m128 {
        let mut total = [_mm_setzero_ps(); 2];
        for (i, b) in row.chunks_exact(34).enumerate() {
            // SAFETY: as for Q4_1.
            unsafe {
                let w = _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i);
                let dots = dot4(w, q.as_ptr().add(128 * i), true);
                let s = _mm_loadu_ps(scales.as_ptr().add(4 * i));
                let k = i & 1;
                total[k] = _mm_fmadd_ps(_mm_mul_ps(_mm_set1_ps(f16_at(b, 0)), s), dots, total[k]);
            }
        }
        _mm_add_ps(total[0], total[1])
    }

    type One = unsafe fn(&[u8], &Q8Activations) -> f32;
    type Four = unsafe fn(&[u8], &[i8], &[f32], &[f32]) -> __m128;

    /// Whole groups with `four`, the rest with `one`; the row's blocks are
    /// `block_bytes` long.
    fn run(row: &[u8], block_bytes: usize, batch: &Q8Batch, out: &mut [f32], one: One, four: Four) {
        let blocks = row.len() / block_bytes;
        assert_eq!(batch.vectors.len(), out.len());
        for a in &batch.vectors {
            assert!(a.q.len() >= 32 * blocks && a.scales.len() >= blocks && a.sums.len() >= blocks);
        }
        let groups = batch.group_q.len();
        for g in 0..groups {
            let (q, s, m) = (
                &batch.group_q[g],
                &batch.group_scales[g],
                &batch.group_sums[g],
            );
            assert!(q.len() >= 128 * blocks && s.len() >= 4 * blocks && m.len() >= 4 * blocks);
            // SAFETY: selected only after the CPU reported AVX2, FMA and F16C;
            // sizes asserted above.
            unsafe {
                let lanes = four(row, q, s, m);
                _mm_storeu_ps(out.as_mut_ptr().add(GROUP * g), lanes);
            }
        }
        let rest = GROUP * groups;
        for (o, a) in out[rest..].iter_mut().zip(&batch.vectors[rest..]) {
            // SAFETY: as above.
            *o = unsafe { one(row, a) };
        }
    }

    pub(super) fn q4_0(row: &[u8], batch: &Q8Batch, out: &mut [f32]) {
        run(row, 18, batch, out, q4_0_one, q4_0_four)
    }
    pub(super) fn q4_1(row: &[u8], batch: &Q8Batch, out: &mut [f32]) {
        run(row, 20, batch, out, q4_1_one, q4_1_four)
    }
    pub(super) fn q8_0(row: &[u8], batch: &Q8Batch, out: &mut [f32]) {
        run(row, 34, batch, out, q8_0_one, q8_0_four)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dot_dequantized, test_noise as noise};

    fn vector(cols: usize, seed: u64) -> Vec<f32> {
        noise(cols, seed)
            .iter()
            .map(|&b| b as f32 / 128.0 - 1.0)
            .collect()
    }

    fn weights(ty: GgmlType, cols: usize, seed: u64) -> Vec<u8> {
        let (_, size) = ty.block_layout().unwrap();
        let mut row = noise(size * cols / 32, seed);
        for (i, b) in row.chunks_exact_mut(size).enumerate() {
            b[..2].copy_from_slice(&f16::from_f32(0.01 + (i % 5) as f32 * 0.002).to_le_bytes());
            if ty == GgmlType::Q4_1 {
                b[2..4].copy_from_slice(&f16::from_f32(-0.05).to_le_bytes());
            }
        }
        row
    }

    #[test]
    fn integer_kernels_match_f32_within_activation_rounding() {
        let cols = 512;
        let x = vector(cols, 5);
        let batch = Q8Batch::quantize(&x, 1);
        let mut scratch = Vec::new();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            for seed in 0..20u64 {
                let row = weights(ty, cols, seed);
                let want = dot_dequantized(ty, &row, &x, &mut scratch);
                let magnitude: f32 = scratch.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                let one = |k: Q8DotFn| {
                    let mut out = [0f32];
                    k(&row, &batch, &mut out);
                    out[0]
                };
                for (name, k) in [
                    ("portable", portable_q8_kernel(ty).unwrap()),
                    ("selected", q8_kernel(ty).unwrap()),
                ] {
                    let got = one(k);
                    // Each activation moves by at most half a quantization step (1/254 of its block's max).
                    assert!(
                        (got - want).abs() <= 0.01 * magnitude,
                        "{ty} {name} seed {seed}: {got} vs {want}"
                    );
                }
                let portable = one(portable_q8_kernel(ty).unwrap());
                let selected = one(q8_kernel(ty).unwrap());
                assert!(
                    (portable - selected).abs() <= 1e-4 * magnitude,
                    "{ty}: integer kernels disagree"
                );
            }
        }
    }

    /// A batch of vectors (whole interleaved groups and a remainder) gives
    /// exactly what each vector gives alone: batch invariance.
    #[test]
    fn batched_vectors_match_one_at_a_time() {
        let (cols, n) = (256, 11);
        let x: Vec<f32> = (0..n).flat_map(|t| vector(cols, 100 + t)).collect();
        let batch = Q8Batch::quantize(&x, n as usize);
        assert_eq!(batch.len(), n as usize);
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let row = weights(ty, cols, 9);
            let mut scratch = Vec::new();
            for kernel in [q8_kernel(ty).unwrap(), portable_q8_kernel(ty).unwrap()] {
                let mut all = vec![0f32; n as usize];
                kernel(&row, &batch, &mut all);
                for t in 0..n as usize {
                    let xt = &x[t * cols..(t + 1) * cols];
                    let alone = Q8Batch::quantize(xt, 1);
                    let mut one = [0f32];
                    kernel(&row, &alone, &mut one);
                    dot_dequantized(ty, &row, xt, &mut scratch);
                    let magnitude: f32 = scratch.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
                    assert_eq!(all[t], one[0], "{ty} vector {t}");
                    assert!(one[0].is_finite() && magnitude > 0.0);
                }
            }
        }
    }
}
