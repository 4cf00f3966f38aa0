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

/// A kernel: for each weight row of `rows` (whole rows of `row_bytes` bytes,
/// each holding whole blocks covering a vector), `out[r * n + t] = row r ·
/// vector t`, where `n` is the batch's length.
pub type Q8DotFn = fn(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut [f32]);

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
        GgmlType::Q4_0 => Some(|rows, row_bytes, batch, out| {
            portable::each(rows, row_bytes, batch, out, portable::q4_0)
        }),
        GgmlType::Q4_1 => Some(|rows, row_bytes, batch, out| {
            portable::each(rows, row_bytes, batch, out, portable::q4_1)
        }),
        GgmlType::Q8_0 => Some(|rows, row_bytes, batch, out| {
            portable::each(rows, row_bytes, batch, out, portable::q8_0)
        }),
        _ => None,
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

mod portable {
    use super::*;

    /// Every row with every activation vector, one at a time.
    pub(super) fn each(
        rows: &[u8],
        row_bytes: usize,
        batch: &Q8Batch,
        out: &mut [f32],
        kernel: fn(&[u8], &Q8Activations) -> f32,
    ) {
        let n = batch.len();
        for (row, ys) in rows.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
            for (a, y) in batch.vectors.iter().zip(ys) {
                *y = kernel(row, a);
            }
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

/// The AVX2 kernels. Per block, a weight block's 32 integer products with an
/// activation block are summed pairwise into 8 i32 lanes, converted to f32
/// and accumulated lane-wise with the block's combined scale (no horizontal
/// sum per block: one per output at the end, as llama.cpp does). Shapes: one
/// vector against two rows at a time (decode; the two rows share each
/// activation load and give independent dependency chains), and one row
/// against an interleaved group of four vectors (prefill, concurrent
/// decodes; the weight block is unpacked once for all four).
///
/// Batch invariance: every shape applies, for each (row, vector), the same
/// float operations in the same order — lane-wise fused multiply-adds into
/// even- and odd-block accumulators, then the same final reduction — so a
/// vector's result is bit-for-bit the same alone, in a group, or beside
/// another row. A request's tokens never depend on what else shares its batch.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::x86::{f16_at, hsum};
    use super::{GROUP, Q8Activations, Q8Batch};

    /// How one weight type's blocks are read.
    trait Layout {
        /// Bytes per block of 32 weights.
        const BYTES: usize;
        /// Whether blocks add `offset × Σx` (Q4_1's minimum, Q4_0's −8).
        const HAS_OFFSET: bool;
        /// The 32 weights as `maddubs`' unsigned operand, and the signs to
        /// move onto the activations (signed weights only).
        unsafe fn weights(b: &[u8]) -> (__m256i, __m256i);
        /// The block's offset factor (multiplies the activation block's sum).
        fn offset(b: &[u8]) -> f32;
    }

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

    struct Q4_0;
    impl Layout for Q4_0 {
        const BYTES: usize = 18;
        const HAS_OFFSET: bool = true;
        #[inline(always)]
        unsafe fn weights(b: &[u8]) -> (__m256i, __m256i) {
            // SAFETY: a block holds 16 nibble bytes after its scale.
            let w = unsafe { unpack_nibbles(b.as_ptr().add(2)) };
            (w, w)
        }
        #[inline(always)]
        fn offset(b: &[u8]) -> f32 {
            -8.0 * f16_at(b, 0)
        }
    }

    struct Q4_1;
    impl Layout for Q4_1 {
        const BYTES: usize = 20;
        const HAS_OFFSET: bool = true;
        #[inline(always)]
        unsafe fn weights(b: &[u8]) -> (__m256i, __m256i) {
            // SAFETY: a block holds 16 nibble bytes after its scale and minimum.
            let w = unsafe { unpack_nibbles(b.as_ptr().add(4)) };
            (w, w)
        }
        #[inline(always)]
        fn offset(b: &[u8]) -> f32 {
            f16_at(b, 2)
        }
    }

    struct Q8_0;
    impl Layout for Q8_0 {
        const BYTES: usize = 34;
        const HAS_OFFSET: bool = false;
        #[inline(always)]
        unsafe fn weights(b: &[u8]) -> (__m256i, __m256i) {
            // SAFETY: a block holds 32 weight bytes after its scale.
            unsafe {
                let w = _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i);
                // maddubs needs one unsigned side: |w| × (x with w's sign).
                (_mm256_sign_epi8(w, w), w)
            }
        }
        #[inline(always)]
        fn offset(_: &[u8]) -> f32 {
            0.0
        }
    }

    /// Σ w × x over the block, as 8 exact i32 lanes converted to f32.
    #[inline(always)]
    unsafe fn dot<L: Layout>(w: (__m256i, __m256i), x: *const i8) -> __m256 {
        unsafe {
            let mut x = _mm256_loadu_si256(x as *const __m256i);
            if !L::HAS_OFFSET {
                x = _mm256_sign_epi8(x, w.1);
            }
            let pairs = _mm256_maddubs_epi16(w.0, x);
            _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    }

    /// Accumulators of one (row, vector) output: lane-wise, even and odd blocks.
    #[derive(Clone, Copy)]
    struct Acc {
        dots: [__m256; 2],
        offsets: [f32; 2],
    }

    impl Acc {
        #[inline(always)]
        unsafe fn new() -> Acc {
            Acc {
                dots: unsafe { [_mm256_setzero_ps(); 2] },
                offsets: [0.0; 2],
            }
        }

        /// Adds block `b` (weights `w`) against activation block `x` with
        /// scale `scale` and sum `sum` into the accumulators of parity `K`
        /// (the block index's low bit; a constant, so they stay in registers).
        #[inline(always)]
        unsafe fn add<L: Layout, const K: usize>(
            &mut self,
            b: &[u8],
            w: (__m256i, __m256i),
            x: *const i8,
            scale: f32,
            sum: f32,
        ) {
            unsafe {
                let d = _mm256_set1_ps(f16_at(b, 0) * scale);
                self.dots[K] = _mm256_fmadd_ps(d, dot::<L>(w, x), self.dots[K]);
            }
            if L::HAS_OFFSET {
                self.offsets[K] = L::offset(b).mul_add(sum, self.offsets[K]);
            }
        }

        #[inline(always)]
        unsafe fn total(&self) -> f32 {
            unsafe {
                hsum(_mm256_add_ps(self.dots[0], self.dots[1]))
                    + (self.offsets[0] + self.offsets[1])
            }
        }
    }

    /// Block `i` of vector `a` and of each row of `rows` into `acc`, with
    /// parity `K`.
    #[inline(always)]
    unsafe fn rows_block<L: Layout, const R: usize, const K: usize>(
        acc: &mut [Acc; R],
        rows: [&[u8]; R],
        a: &Q8Activations,
        i: usize,
    ) {
        // SAFETY: activation sizes checked by `run`; `i` is a block of every row.
        unsafe {
            let x = a.q.as_ptr().add(32 * i);
            for (acc, row) in acc.iter_mut().zip(rows) {
                let b = &row[i * L::BYTES..(i + 1) * L::BYTES];
                acc.add::<L, K>(b, L::weights(b), x, a.scales[i], a.sums[i]);
            }
        }
    }

    /// Vector `t` against `R` rows (two for decode: they share each
    /// activation load and give independent dependency chains).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_one<L: Layout, const R: usize>(
        rows: [&[u8]; R],
        batch: &Q8Batch,
        t: usize,
    ) -> [f32; R] {
        let a = &batch.vectors[t];
        let blocks = rows[0].len() / L::BYTES;
        let mut acc = unsafe { [Acc::new(); R] };
        let mut i = 0;
        while i + 1 < blocks {
            unsafe {
                rows_block::<L, R, 0>(&mut acc, rows, a, i);
                rows_block::<L, R, 1>(&mut acc, rows, a, i + 1);
            }
            i += 2;
        }
        if i < blocks {
            unsafe { rows_block::<L, R, 0>(&mut acc, rows, a, i) };
        }
        unsafe { acc.map(|a| a.total()) }
    }

    /// Block `i` of `row` against the group's four vectors, with parity `K`.
    #[inline(always)]
    unsafe fn group_block<L: Layout, const K: usize>(
        acc: &mut [Acc; GROUP],
        row: &[u8],
        batch: &Q8Batch,
        g: usize,
        i: usize,
    ) {
        let (q, scales, sums) = (
            &batch.group_q[g],
            &batch.group_scales[g],
            &batch.group_sums[g],
        );
        let b = &row[i * L::BYTES..(i + 1) * L::BYTES];
        // SAFETY: group sizes checked by `run`.
        unsafe {
            let w = L::weights(b);
            for (v, acc) in acc.iter_mut().enumerate() {
                let x = q.as_ptr().add(32 * (GROUP * i + v));
                acc.add::<L, K>(b, w, x, scales[GROUP * i + v], sums[GROUP * i + v]);
            }
        }
    }

    /// Group `g` (vectors `4g..4g + 4`) against one row.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group<L: Layout>(row: &[u8], batch: &Q8Batch, g: usize) -> [f32; GROUP] {
        let blocks = row.len() / L::BYTES;
        let mut acc = unsafe { [Acc::new(); GROUP] };
        let mut i = 0;
        while i + 1 < blocks {
            unsafe {
                group_block::<L, 0>(&mut acc, row, batch, g, i);
                group_block::<L, 1>(&mut acc, row, batch, g, i + 1);
            }
            i += 2;
        }
        if i < blocks {
            unsafe { group_block::<L, 0>(&mut acc, row, batch, g, i) };
        }
        unsafe { acc.map(|a| a.total()) }
    }

    /// Every row of `rows` against every vector of `batch`: whole groups of
    /// four per row, the remaining vectors two rows at a time.
    fn run<L: Layout>(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut [f32]) {
        let n = batch.len();
        let blocks = row_bytes / L::BYTES;
        assert_eq!(row_bytes % L::BYTES, 0);
        assert_eq!(rows.len() / row_bytes * n, out.len());
        for a in &batch.vectors {
            assert!(a.q.len() >= 32 * blocks && a.scales.len() >= blocks && a.sums.len() >= blocks);
        }
        for g in 0..batch.group_q.len() {
            assert!(
                batch.group_q[g].len() >= GROUP * 32 * blocks
                    && batch.group_scales[g].len() >= GROUP * blocks
                    && batch.group_sums[g].len() >= GROUP * blocks
            );
        }
        let grouped = GROUP * batch.group_q.len();
        let mut pairs = rows.chunks_exact(2 * row_bytes);
        let mut r = 0;
        // SAFETY (all calls): selected only after the CPU reported AVX2, FMA
        // and F16C; sizes asserted above.
        for pair in pairs.by_ref() {
            let (row0, row1) = pair.split_at(row_bytes);
            for g in 0..grouped / GROUP {
                for (k, row) in [row0, row1].into_iter().enumerate() {
                    let ys = unsafe { group::<L>(row, batch, g) };
                    out[(r + k) * n + GROUP * g..][..GROUP].copy_from_slice(&ys);
                }
            }
            for t in grouped..n {
                let [y0, y1] = unsafe { rows_one::<L, 2>([row0, row1], batch, t) };
                out[r * n + t] = y0;
                out[(r + 1) * n + t] = y1;
            }
            r += 2;
        }
        let last = pairs.remainder();
        if !last.is_empty() {
            for g in 0..grouped / GROUP {
                let ys = unsafe { group::<L>(last, batch, g) };
                out[r * n + GROUP * g..][..GROUP].copy_from_slice(&ys);
            }
            for t in grouped..n {
                out[r * n + t] = unsafe { rows_one::<L, 1>([last], batch, t) }[0];
            }
        }
    }

    pub(super) fn q4_0(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut [f32]) {
        run::<Q4_0>(rows, row_bytes, batch, out)
    }
    pub(super) fn q4_1(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut [f32]) {
        run::<Q4_1>(rows, row_bytes, batch, out)
    }
    pub(super) fn q8_0(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut [f32]) {
        run::<Q8_0>(rows, row_bytes, batch, out)
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
                    k(&row, row.len(), &batch, &mut out);
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

    /// A batch of vectors (whole interleaved groups and a remainder) against
    /// several rows (pairs and a last odd one) gives exactly what each vector
    /// gives alone against each row alone: batch invariance.
    #[test]
    fn batched_vectors_and_rows_match_one_at_a_time() {
        let (cols, n, rows) = (256, 11, 3);
        let x: Vec<f32> = (0..n).flat_map(|t| vector(cols, 100 + t as u64)).collect();
        let batch = Q8Batch::quantize(&x, n);
        assert_eq!(batch.len(), n);
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let matrix: Vec<u8> = (0..rows)
                .flat_map(|r| weights(ty, cols, 9 + r as u64))
                .collect();
            let row_bytes = matrix.len() / rows;
            let mut scratch = Vec::new();
            for kernel in [q8_kernel(ty).unwrap(), portable_q8_kernel(ty).unwrap()] {
                let mut all = vec![0f32; rows * n];
                kernel(&matrix, row_bytes, &batch, &mut all);
                for (r, row) in matrix.chunks_exact(row_bytes).enumerate() {
                    for t in 0..n {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let alone = Q8Batch::quantize(xt, 1);
                        let mut one = [0f32];
                        kernel(row, row_bytes, &alone, &mut one);
                        assert_eq!(all[r * n + t], one[0], "{ty} row {r} vector {t}");
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
