//! Integer dot products against 8-bit activations, as llama.cpp does it: the
//! activation vector is quantized once per matrix-vector product to blocks of
//! 32 signed bytes with an f32 scale, and each weight block is multiplied with
//! integer instructions (AVX2 `maddubs`), halving the data the inner loop
//! moves and quadrupling the work per instruction.

use half::f16;

use super::kquant;
use super::outputs::Outputs;
use crate::gguf::GgmlType;
use crate::isa::Isa;

use super::f16_at;

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
    /// Quantizes `x` (a whole number of 32-value blocks) into `self`:
    /// per block, `scale = max|v| / 127` and `q = v / scale` rounded to the
    /// nearest integer, ties to even (as llama.cpp's AVX2 code rounds).
    pub fn quantize(&mut self, x: &[f32]) {
        assert!(x.len().is_multiple_of(32), "whole blocks of 32 values");
        let blocks = x.len() / 32;
        self.q.resize(x.len(), 0);
        self.scales.resize(blocks, 0.0);
        self.sums.resize(blocks, 0.0);
        #[cfg(target_arch = "x86_64")]
        if crate::isa::isa() == crate::isa::Isa::Avx2 {
            // SAFETY: the CPU has AVX2 and F16C; the buffers were sized above.
            unsafe { avx2::quantize(x, self) };
            return;
        }
        for (i, (block, q)) in x
            .chunks_exact(32)
            .zip(self.q.chunks_exact_mut(32))
            .enumerate()
        {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (scale, inv) = scale_of(max);
            let sum = quantize_block(block, inv, q);
            // Stored as f16, as llama.cpp's q8_0/q8_1 blocks do, so results match it closely.
            self.scales[i] = f16::from_f32(scale).to_f32();
            self.sums[i] = f16::from_f32(sum as f32 * scale).to_f32();
        }
    }
}

/// A block's scale for its largest magnitude `max`, and the scale's
/// inverse: zero for an all-zero block, and for a non-finite or subnormal
/// maximum (whose inverse overflows): those blocks quantize to 0.
fn scale_of(max: f32) -> (f32, f32) {
    let scale = max / 127.0;
    let inv = Some(1.0 / scale)
        .filter(|inv| inv.is_finite() && scale > 0.0)
        .unwrap_or(0.0);
    (scale, inv)
}

/// `q = round(v × inv)` (ties to even; NaN → 0) for one block; returns `Σq`.
fn quantize_block(block: &[f32], inv: f32, q: &mut [i8]) -> i32 {
    let mut sum = 0i32;
    for (v, out) in block.iter().zip(q.iter_mut()) {
        let r = (v * inv).round_ties_even() as i32;
        *out = r as i8;
        sum += r;
    }
    sum
}

/// Several activation vectors quantized for the integer kernels.
#[derive(Debug, Clone, Default)]
pub struct Q8Batch {
    /// The vectors, in order.
    pub vectors: Vec<Q8Activations>,
}

impl Q8Batch {
    /// Quantizes `n` vectors, the rows of `x`.
    pub fn quantize(x: &[f32], n: usize) -> Self {
        let cols = x.len() / n.max(1);
        let vectors = x
            .chunks_exact(cols.max(1))
            .map(|row| {
                let mut a = Q8Activations::default();
                a.quantize(row);
                a
            })
            .collect();
        Q8Batch { vectors }
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

/// A kernel: for each weight row `r` of `rows` (whole rows of `row_bytes`
/// bytes, each holding whole blocks covering a vector) and each vector `t`
/// of `batch`, puts `row r · vector t` at `out`'s value `r` of vector `t`
/// (`out` covers as many values as there are rows).
pub type Q8DotFn = fn(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>);

/// The integer kernel for weights of type `ty` on `isa`, if there is one.
pub(super) fn q8_kernel(isa: Isa, ty: GgmlType) -> Option<Q8DotFn> {
    #[cfg(target_arch = "x86_64")]
    {
        if isa == Isa::Avx2 {
            return match ty {
                GgmlType::Q4_0 => Some(avx2::q4_0),
                GgmlType::Q4_1 => Some(avx2::q4_1),
                GgmlType::Q5_0 => Some(avx2::q5_0),
                GgmlType::Q8_0 => Some(avx2::q8_0),
                GgmlType::Q4K => Some(kquant::avx2::q4_k),
                GgmlType::Q5K => Some(kquant::avx2::q5_k),
                GgmlType::Q6K => Some(kquant::avx2::q6_k),
                _ => None,
            };
        }
    }
    portable_q8_kernel(ty)
}

/// The integer kernel for weights of type `ty` interleaved by
/// [`interleave`](super::interleave::interleave), if there is one: only
/// where the AVX2 kernels run (elsewhere weights stay as the file has them).
pub(super) fn interleaved_kernel(isa: Isa, ty: GgmlType) -> Option<Q8DotFn> {
    #[cfg(target_arch = "x86_64")]
    {
        if isa == Isa::Avx2 {
            return match ty {
                GgmlType::Q4_0 => Some(avx2::q4_0_groups),
                GgmlType::Q4_1 => Some(avx2::q4_1_groups),
                GgmlType::Q8_0 => Some(avx2::q8_0_groups),
                _ => None,
            };
        }
    }
    let _ = (isa, ty);
    None
}

fn portable_q8_kernel(ty: GgmlType) -> Option<Q8DotFn> {
    match ty {
        GgmlType::Q4_0 => {
            Some(|rows, row_bytes, batch, out| each(rows, row_bytes, batch, out, portable::q4_0))
        }
        GgmlType::Q4_1 => {
            Some(|rows, row_bytes, batch, out| each(rows, row_bytes, batch, out, portable::q4_1))
        }
        GgmlType::Q5_0 => {
            Some(|rows, row_bytes, batch, out| each(rows, row_bytes, batch, out, portable::q5_0))
        }
        GgmlType::Q8_0 => {
            Some(|rows, row_bytes, batch, out| each(rows, row_bytes, batch, out, portable::q8_0))
        }
        GgmlType::Q4K => Some(kquant::portable::q4_k),
        GgmlType::Q5K => Some(kquant::portable::q5_k),
        GgmlType::Q6K => Some(kquant::portable::q6_k),
        _ => None,
    }
}

/// Every row with every activation vector through `kernel`, one pair at a
/// time (the portable kernels), written as [`Q8DotFn`] says.
pub(super) fn each(
    rows: &[u8],
    row_bytes: usize,
    batch: &Q8Batch,
    out: &mut Outputs<'_>,
    kernel: fn(&[u8], &Q8Activations) -> f32,
) {
    assert_eq!(out.count(), rows.len() / row_bytes);
    assert_eq!(out.vectors(), batch.len());
    for (r, row) in rows.chunks_exact(row_bytes).enumerate() {
        for (t, a) in batch.vectors.iter().enumerate() {
            out.put(t, r, &[kernel(row, a)]);
        }
    }
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

    pub(super) fn q5_0(row: &[u8], a: &Q8Activations) -> f32 {
        let mut total = 0.0;
        for (i, b) in row.chunks_exact(22).enumerate() {
            let xq = &a.q[32 * i..32 * i + 32];
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let mut s = 0i32;
            for j in 0..16 {
                let lo = (b[6 + j] & 0x0F) as i32 | (((qh >> j) & 1) << 4) as i32;
                let hi = (b[6 + j] >> 4) as i32 | (((qh >> (j + 16)) & 1) << 4) as i32;
                s += (lo - 16) * xq[j] as i32 + (hi - 16) * xq[j + 16] as i32;
            }
            total += f16_at(b, 0) * a.scales[i] * s as f32;
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
mod avx2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{OutputRows, dot_dequantized, test_noise as noise};

    /// `kernel` writing `out` token-major.
    fn into(kernel: Q8DotFn, rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut [f32]) {
        kernel(
            rows,
            row_bytes,
            batch,
            &mut OutputRows::token_major(out, batch.len()).all(),
        );
    }

    fn vector(cols: usize, seed: u64) -> Vec<f32> {
        noise(cols, seed)
            .iter()
            .map(|&b| b as f32 / 128.0 - 1.0)
            .collect()
    }

    /// A random row of `cols` weights of type `ty` with sane f16 scales.
    fn weights(ty: GgmlType, cols: usize, seed: u64) -> Vec<u8> {
        let (block, size) = ty.block_layout().unwrap();
        let mut row = noise(size * cols / block, seed);
        let f16 = |v: f32| f16::from_f32(v).to_le_bytes();
        for (i, b) in row.chunks_exact_mut(size).enumerate() {
            let d = f16(0.01 + (i % 5) as f32 * 0.002);
            match ty {
                GgmlType::Q6K => b[208..210].copy_from_slice(&d),
                GgmlType::Q4K | GgmlType::Q5K => {
                    b[..2].copy_from_slice(&d);
                    b[2..4].copy_from_slice(&f16(0.004));
                }
                GgmlType::Q4_1 => {
                    b[..2].copy_from_slice(&d);
                    b[2..4].copy_from_slice(&f16(-0.05));
                }
                _ => b[..2].copy_from_slice(&d),
            }
        }
        row
    }

    use crate::quant::INTEGER_TYPES as TYPES;

    /// The dispatched (AVX2) quantization gives the portable code's scales,
    /// bytes and sums, ties included.
    #[test]
    fn activation_quantization_matches_the_portable_code() {
        let mut blocks: Vec<Vec<f32>> = (0..50).map(|seed| vector(32, seed)).collect();
        // max 127 makes the scale 1: halves are exact ties.
        blocks.push(
            (0..32)
                .map(|i| if i == 0 { 127.0 } else { i as f32 - 15.5 })
                .collect(),
        );
        blocks.push(vec![0.0; 32]);
        // Overflowed activations: NaN and infinite values, a subnormal maximum.
        let mut odd = vector(32, 7);
        (odd[3], odd[9]) = (f32::NAN, -f32::NAN);
        blocks.push(odd);
        blocks.push(
            (0..32)
                .map(|i| if i == 5 { f32::INFINITY } else { 1.0 })
                .collect(),
        );
        blocks.push(vec![1e-40; 32]);
        // Scales past f16's range, and within its subnormals.
        blocks.push(vector(32, 8).iter().map(|v| v * 1e7).collect());
        blocks.push(vector(32, 9).iter().map(|v| v * 1e-4).collect());
        for block in blocks {
            let mut a = Q8Activations::default();
            a.quantize(&block);
            let (scale, inv) = scale_of(block.iter().fold(0f32, |m, v| m.max(v.abs())));
            let mut want = [0i8; 32];
            let sum = quantize_block(&block, inv, &mut want);
            assert_eq!(a.q, want, "{block:?}");
            assert!(a.q.iter().all(|&q| q != i8::MIN), "{block:?}");
            assert_eq!(a.scales, [f16::from_f32(scale).to_f32()], "{block:?}");
            let want_sum = f16::from_f32(sum as f32 * scale).to_f32();
            assert!(a.sums[0] == want_sum || a.sums[0].is_nan() && want_sum.is_nan());
        }
    }

    #[test]
    fn integer_kernels_match_f32_within_activation_rounding() {
        let cols = 512;
        let x = vector(cols, 5);
        let batch = Q8Batch::quantize(&x, 1);
        let mut scratch = Vec::new();
        for ty in TYPES {
            for seed in 0..20u64 {
                let row = weights(ty, cols, seed);
                let want = dot_dequantized(ty, &row, &x, &mut scratch);
                let magnitude: f32 = scratch.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                let one = |k: Q8DotFn| {
                    let mut out = [0f32];
                    into(k, &row, row.len(), &batch, &mut out);
                    out[0]
                };
                for (name, k) in [
                    ("portable", portable_q8_kernel(ty).unwrap()),
                    ("selected", q8_kernel(crate::isa::isa(), ty).unwrap()),
                ] {
                    let got = one(k);
                    // Each activation moves by at most half a quantization step (1/254 of its block's max).
                    assert!(
                        (got - want).abs() <= 0.01 * magnitude,
                        "{ty} {name} seed {seed}: {got} vs {want}"
                    );
                }
                let portable = one(portable_q8_kernel(ty).unwrap());
                let selected = one(q8_kernel(crate::isa::isa(), ty).unwrap());
                assert!(
                    (portable - selected).abs() <= 1e-4 * magnitude,
                    "{ty}: integer kernels disagree"
                );
            }
        }
    }

    /// Interleaved weights give bit for bit what the file's encoding gives,
    /// one vector or many (the interleaved kernels' two shapes).
    #[test]
    fn interleaved_rows_match_the_files_encoding() {
        use crate::quant::interleave::Interleaving;
        let (cols, rows) = (512, 24);
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let (Some(grouped), Some(layout)) = (
                interleaved_kernel(crate::isa::isa(), ty),
                Interleaving::of(ty),
            ) else {
                return;
            };
            let matrix: Vec<u8> = (0..rows)
                .flat_map(|r| weights(ty, cols, 40 + r as u64))
                .collect();
            let row_bytes = matrix.len() / rows;
            let mut data = vec![0; matrix.len()];
            layout.interleave(&matrix, row_bytes, &mut data);
            for n in [1, 2, 5, 11] {
                let x: Vec<f32> = (0..n).flat_map(|t| vector(cols, 70 + t as u64)).collect();
                let batch = Q8Batch::quantize(&x, n);
                let (mut want, mut got) = (vec![0f32; rows * n], vec![0f32; rows * n]);
                into(
                    q8_kernel(crate::isa::isa(), ty).unwrap(),
                    &matrix,
                    row_bytes,
                    &batch,
                    &mut want,
                );
                into(grouped, &data, row_bytes, &batch, &mut got);
                assert_eq!(got, want, "{ty} with {n} vectors");
            }
        }
    }

    /// A batch of vectors (whole pairs and fours of vectors and a
    /// remainder) against several rows (a pair of tiles and a padded tile)
    /// gives exactly what each vector gives alone against each row alone:
    /// batch invariance.
    #[test]
    fn batched_vectors_and_rows_match_one_at_a_time() {
        // Nineteen rows: two whole tiles, then three rows in a padded one;
        // eleven vectors: two groups of four, a pair and one; rows of 16
        // blocks, and of 40 (past the kernels' 32-block chunks).
        let (n, rows) = (11, 19);
        for (cols, ty) in [512, 1280]
            .into_iter()
            .flat_map(|c| TYPES.map(|ty| (c, ty)))
        {
            let x: Vec<f32> = (0..n).flat_map(|t| vector(cols, 100 + t as u64)).collect();
            let batch = Q8Batch::quantize(&x, n);
            assert_eq!(batch.len(), n);
            let matrix: Vec<u8> = (0..rows)
                .flat_map(|r| weights(ty, cols, 9 + r as u64))
                .collect();
            let row_bytes = matrix.len() / rows;
            let mut scratch = Vec::new();
            for kernel in [
                q8_kernel(crate::isa::isa(), ty).unwrap(),
                portable_q8_kernel(ty).unwrap(),
            ] {
                let mut all = vec![0f32; rows * n];
                into(kernel, &matrix, row_bytes, &batch, &mut all);
                for (r, row) in matrix.chunks_exact(row_bytes).enumerate() {
                    for t in 0..n {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let alone = Q8Batch::quantize(xt, 1);
                        let mut one = [0f32];
                        into(kernel, row, row_bytes, &alone, &mut one);
                        assert_eq!(all[t * rows + r], one[0], "{ty} row {r} vector {t}");
                        let want = dot_dequantized(ty, row, xt, &mut scratch);
                        let magnitude: f32 =
                            scratch.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
                        assert!((one[0] - want).abs() <= 0.01 * magnitude, "{ty} {r} {t}");
                    }
                }
            }
        }
    }
}
