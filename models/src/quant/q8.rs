//! Integer dot products against 8-bit activations, as llama.cpp does it: the
//! activation vector is quantized once per matrix-vector product to blocks of
//! 32 signed bytes with an f32 scale, and each weight block is multiplied with
//! integer instructions (AVX2 `maddubs`), halving the data the inner loop
//! moves and quadrupling the work per instruction.

use half::f16;

use super::kquant;
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
    /// Quantizes `x` (a whole number of 32-value blocks) into `self`:
    /// per block, `scale = max|v| / 127` and `q = v / scale` rounded to the
    /// nearest integer, ties to even (as llama.cpp's AVX2 code rounds).
    pub fn quantize(&mut self, x: &[f32]) {
        debug_assert!(x.len().is_multiple_of(32));
        self.q.resize(x.len(), 0);
        self.scales.clear();
        self.sums.clear();
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::is_x86_feature_detected!("avx2");
        for (block, q) in x.chunks_exact(32).zip(self.q.chunks_exact_mut(32)) {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = max / 127.0;
            // Zero for an all-zero block, and for a non-finite or subnormal
            // maximum (whose inverse overflows): those blocks quantize to 0.
            let inv = Some(1.0 / scale)
                .filter(|inv| inv.is_finite() && scale > 0.0)
                .unwrap_or(0.0);
            #[cfg(target_arch = "x86_64")]
            let sum = if avx2 {
                // SAFETY: the CPU has AVX2; both blocks hold 32 values.
                unsafe { avx2::quantize_block(block, inv, q) }
            } else {
                quantize_block(block, inv, q)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let sum = quantize_block(block, inv, q);
            // Stored as f16, as llama.cpp's q8_0/q8_1 blocks do, so results match it closely.
            self.scales.push(f16::from_f32(scale).to_f32());
            self.sums.push(f16::from_f32(sum as f32 * scale).to_f32());
        }
    }
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

/// Vectors per interleaved group of a [`Q8Batch`].
pub const GROUP: usize = 4;

/// Several activation vectors quantized for the integer kernels: each one
/// alone, and whole groups of four (`GROUP`) interleaved block by block (the four
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
        Self::from_vectors(vectors)
    }

    /// The batch of already quantized vectors (all of one length).
    pub fn from_vectors(vectors: Vec<Q8Activations>) -> Self {
        let cols = vectors.first().map_or(0, |a| a.q.len());
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
/// each holding whole blocks covering a vector), `out[t * count + r] = row r ·
/// vector t`, where `count` is the number of rows (token-major).
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

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Every row with every activation vector through `kernel`, one pair at a
/// time (the portable kernels), written token-major as [`Q8DotFn`] says.
pub(super) fn each(
    rows: &[u8],
    row_bytes: usize,
    batch: &Q8Batch,
    out: &mut [f32],
    kernel: fn(&[u8], &Q8Activations) -> f32,
) {
    let count = rows.len() / row_bytes;
    for (r, row) in rows.chunks_exact(row_bytes).enumerate() {
        for (t, a) in batch.vectors.iter().enumerate() {
            out[t * count + r] = kernel(row, a);
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

/// The AVX2 kernels. Four outputs — four (row, vector) pairs, called slots —
/// are computed together: per block, each slot's 32 integer products are
/// summed exactly into two i32 halves, the four slots' halves are packed into
/// one 8-lane register (slot j in lanes j and j + 4), converted to f32 and
/// accumulated with one fused multiply-add by the slots' combined scales.
/// There is no horizontal sum per block, only one per output at the end.
/// Shapes: one row against an interleaved group of four vectors (prefill,
/// concurrent decodes; the weight block is unpacked once for all four), and
/// one vector against four rows (decode; the rows share each activation
/// load).
///
/// Batch invariance: a slot's float operations are the same in every shape —
/// the same lane-wise fused multiply-adds into even- and odd-block
/// accumulators, then the same final reduction — and integer sums are exact
/// in any order, so a vector's result is bit-for-bit the same alone, in a
/// group, or beside other rows. A request's tokens never depend on what else
/// shares its batch.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use super::super::x86::f16_at;
    use super::{GROUP, Q8Activations, Q8Batch};

    /// [`super::quantize_block`] in AVX2 (the same results).
    ///
    /// # Safety
    /// The CPU must have AVX2; `block` and `q` hold 32 values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_block(block: &[f32], inv: f32, q: &mut [i8]) -> i32 {
        assert!(block.len() == 32 && q.len() == 32);
        unsafe {
            let scale = _mm256_set1_ps(inv);
            let p = block.as_ptr();
            let (a, b, c, d) = (
                round8(p, scale),
                round8(p.add(8), scale),
                round8(p.add(16), scale),
                round8(p.add(24), scale),
            );
            let sum = _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d));
            let sum = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256(sum, 1),
            );
            let sum = _mm_hadd_epi32(sum, sum);
            let sum = _mm_cvtsi128_si32(_mm_hadd_epi32(sum, sum));
            // Packing works within 128-bit lanes; the permutation restores the order.
            let packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
            let ordered =
                _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, ordered);
            sum
        }
    }

    /// Eight values from `p`, times `scale`, rounded (ties to even) to i32.
    #[inline(always)]
    unsafe fn round8(p: *const f32, scale: __m256) -> __m256i {
        unsafe {
            let v = _mm256_mul_ps(_mm256_loadu_ps(p), scale);
            // NaN lanes become 0, as `as i32` makes them in the portable code.
            let v = _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
            _mm256_cvtps_epi32(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(v))
        }
    }

    /// How one weight type's blocks are read.
    trait Layout {
        /// Bytes per block of 32 weights.
        const BYTES: usize;
        /// Whether blocks add `offset × Σx` (Q4_1's minimum, Q4_0's −8);
        /// layouts without one have signed weights.
        const HAS_OFFSET: bool;
        /// Whether weights are below 32, so four `maddubs` pair sums of a
        /// block fit in i16.
        const SMALL: bool;
        /// Where a block's 16 bytes of nibbles start, for layouts whose
        /// weights are exactly those nibbles (values `j` and `j + 16` in
        /// byte `j`): their tiles are transposed before unpacking.
        const NIBBLES: Option<usize> = None;
        /// The 32 weights as `maddubs`' unsigned operand, and the signs to
        /// move onto the activations (signed weights only).
        unsafe fn weights(b: &[u8]) -> (__m256i, __m256i);
        /// The block's offset factor (multiplies the activation block's sum).
        fn offset(b: &[u8]) -> f32;
        /// Four blocks' scales and offset factors, as 4 lanes each (the same
        /// values as `f16_at(b, 0)` and `offset`, converted four at a time).
        unsafe fn scales_and_offsets(b: [&[u8]; 4]) -> (__m128, __m128);
    }

    /// The f16 at byte `at` of each of four blocks, as 4 f32 lanes.
    #[inline(always)]
    unsafe fn f16x4(b: [&[u8]; 4], at: usize) -> __m128 {
        let h = |k: usize| i16::from_le_bytes([b[k][at], b[k][at + 1]]);
        unsafe { _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, h(3), h(2), h(1), h(0))) }
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
        const SMALL: bool = true;
        const NIBBLES: Option<usize> = Some(2);
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
        #[inline(always)]
        unsafe fn scales_and_offsets(b: [&[u8]; 4]) -> (__m128, __m128) {
            unsafe {
                let d = f16x4(b, 0);
                (d, _mm_mul_ps(d, _mm_set1_ps(-8.0)))
            }
        }
    }

    struct Q4_1;
    impl Layout for Q4_1 {
        const BYTES: usize = 20;
        const HAS_OFFSET: bool = true;
        const SMALL: bool = true;
        const NIBBLES: Option<usize> = Some(4);
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
        #[inline(always)]
        unsafe fn scales_and_offsets(b: [&[u8]; 4]) -> (__m128, __m128) {
            unsafe { (f16x4(b, 0), f16x4(b, 2)) }
        }
    }

    /// 32 bits → 32 bytes: byte j is 0x10 if bit j is set, else 0.
    #[inline(always)]
    unsafe fn fifth_bits(p: *const u8) -> __m256i {
        unsafe {
            let bits = (p as *const u32).read_unaligned();
            // Byte j gets the byte of `bits` holding bit j, then is tested
            // against a mask with only bit (j mod 8) clear.
            let spread = _mm256_shuffle_epi8(
                _mm256_set1_epi32(bits as i32),
                _mm256_set_epi64x(
                    0x0303030303030303,
                    0x0202020202020202,
                    0x0101010101010101,
                    0x0000000000000000,
                ),
            );
            let set = _mm256_cmpeq_epi8(
                _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
                _mm256_set1_epi64x(-1),
            );
            _mm256_and_si256(set, _mm256_set1_epi8(0x10))
        }
    }

    struct Q5_0;
    impl Layout for Q5_0 {
        const BYTES: usize = 22;
        const HAS_OFFSET: bool = true;
        const SMALL: bool = true;
        #[inline(always)]
        unsafe fn weights(b: &[u8]) -> (__m256i, __m256i) {
            // SAFETY: a block holds 4 bytes of fifth bits and 16 nibble bytes after its scale.
            let w = unsafe {
                _mm256_or_si256(
                    unpack_nibbles(b.as_ptr().add(6)),
                    fifth_bits(b.as_ptr().add(2)),
                )
            };
            (w, w)
        }
        #[inline(always)]
        fn offset(b: &[u8]) -> f32 {
            -16.0 * f16_at(b, 0)
        }
        #[inline(always)]
        unsafe fn scales_and_offsets(b: [&[u8]; 4]) -> (__m128, __m128) {
            unsafe {
                let d = f16x4(b, 0);
                (d, _mm_mul_ps(d, _mm_set1_ps(-16.0)))
            }
        }
    }

    struct Q8_0;
    impl Layout for Q8_0 {
        const BYTES: usize = 34;
        const HAS_OFFSET: bool = false;
        const SMALL: bool = false;
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
        #[inline(always)]
        unsafe fn scales_and_offsets(b: [&[u8]; 4]) -> (__m128, __m128) {
            unsafe { (f16x4(b, 0), _mm_setzero_ps()) }
        }
    }

    /// Σ w × x over the block, summed exactly into 8 i32 lanes.
    #[inline(always)]
    unsafe fn dot<L: Layout>(w: (__m256i, __m256i), x: *const i8) -> __m256i {
        unsafe {
            let mut x = _mm256_loadu_si256(x as *const __m256i);
            if !L::HAS_OFFSET {
                x = _mm256_sign_epi8(x, w.1);
            }
            let pairs = _mm256_maddubs_epi16(w.0, x);
            _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
        }
    }

    /// The accumulators of four slots: lanes j and j + 4 of `dots` hold slot
    /// j's two halves, lane j of `offsets` its offset term; even and odd blocks apart.
    #[derive(Clone, Copy)]
    struct Slots {
        dots: [__m256; 2],
        offsets: [__m128; 2],
    }

    impl Slots {
        #[inline(always)]
        unsafe fn new() -> Slots {
            unsafe {
                Slots {
                    dots: [_mm256_setzero_ps(); 2],
                    offsets: [_mm_setzero_ps(); 2],
                }
            }
        }

        /// Adds one block: `p[j]` is slot j's integer products (8 lanes),
        /// `scales` the slots' combined scales, `offsets × sums` their offset
        /// terms. `K` is the block index's parity (a constant, so the
        /// accumulators stay in registers).
        #[inline(always)]
        unsafe fn add<L: Layout, const K: usize>(
            &mut self,
            p: [__m256i; 4],
            scales: __m128,
            offsets: __m128,
            sums: __m128,
        ) {
            unsafe {
                let halves =
                    _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
                let d = _mm256_set_m128(scales, scales);
                self.dots[K] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(halves), self.dots[K]);
                if L::HAS_OFFSET {
                    self.offsets[K] = _mm_fmadd_ps(offsets, sums, self.offsets[K]);
                }
            }
        }

        /// The four slots' results.
        #[inline(always)]
        unsafe fn totals(&self) -> [f32; 4] {
            unsafe {
                let s = _mm256_add_ps(self.dots[0], self.dots[1]);
                let halves = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
                let total = _mm_add_ps(halves, _mm_add_ps(self.offsets[0], self.offsets[1]));
                let mut out = [0f32; 4];
                _mm_storeu_ps(out.as_mut_ptr(), total);
                out
            }
        }
    }

    #[inline(always)]
    fn scale(b: &[u8]) -> f32 {
        f16_at(b, 0)
    }

    /// Block `i` of vector `a` against four rows (fewer rows repeat the
    /// first), with parity `K`.
    #[inline(always)]
    unsafe fn rows_block<L: Layout, const K: usize>(
        acc: &mut Slots,
        rows: [&[u8]; 4],
        a: &Q8Activations,
        i: usize,
    ) {
        // No closures or fn pointers in this file's AVX2 code: they would not
        // inherit the caller's target features, and every intrinsic in them
        // would become a call.
        let block = |r: usize| &rows[r][i * L::BYTES..(i + 1) * L::BYTES];
        let (b0, b1, b2, b3) = (block(0), block(1), block(2), block(3));
        // SAFETY: activation sizes checked by `run`.
        unsafe {
            let x = a.q.as_ptr().add(32 * i);
            let p = [
                dot::<L>(L::weights(b0), x),
                dot::<L>(L::weights(b1), x),
                dot::<L>(L::weights(b2), x),
                dot::<L>(L::weights(b3), x),
            ];
            let (d, offsets) = L::scales_and_offsets([b0, b1, b2, b3]);
            let scales = _mm_mul_ps(d, _mm_set1_ps(a.scales[i]));
            acc.add::<L, K>(p, scales, offsets, _mm_set1_ps(a.sums[i]));
        }
    }

    /// Vector `t` against four rows (`rows` may repeat a row to fill), while
    /// the `4 × blocks` blocks from `next` on (four rows a little further
    /// on) are prefetched: four short row streams at once defeat the
    /// hardware prefetcher, which left large Q8_0 matrices at a third of the
    /// memory bandwidth.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_one<L: Layout>(
        rows: [&[u8]; 4],
        next: *const u8,
        batch: &Q8Batch,
        t: usize,
    ) -> [f32; 4] {
        let a = &batch.vectors[t];
        let blocks = rows[0].len() / L::BYTES;
        let mut acc = unsafe { Slots::new() };
        let mut i = 0;
        while i + 1 < blocks {
            // The next rows' bytes at the pace these are read (4 rows × 2 blocks per step).
            let ahead = next.wrapping_add(4 * L::BYTES * i);
            for line in 0..(8 * L::BYTES).div_ceil(64) {
                // A prefetch is a hint: it never faults, wherever it points.
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
            }
            unsafe {
                rows_block::<L, 0>(&mut acc, rows, a, i);
                rows_block::<L, 1>(&mut acc, rows, a, i + 1);
            }
            i += 2;
        }
        if i < blocks {
            unsafe { rows_block::<L, 0>(&mut acc, rows, a, i) };
        }
        unsafe { acc.totals() }
    }

    /// Block `i` of `row` against the group's four vectors, with parity `K`.
    #[inline(always)]
    unsafe fn group_block<L: Layout, const K: usize>(
        acc: &mut Slots,
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
            let x = q.as_ptr().add(GROUP * 32 * i);
            let p = [
                dot::<L>(w, x),
                dot::<L>(w, x.add(32)),
                dot::<L>(w, x.add(64)),
                dot::<L>(w, x.add(96)),
            ];
            let s = _mm_loadu_ps(scales.as_ptr().add(GROUP * i));
            let m = _mm_loadu_ps(sums.as_ptr().add(GROUP * i));
            let scales = _mm_mul_ps(_mm_set1_ps(scale(b)), s);
            acc.add::<L, K>(p, scales, _mm_set1_ps(L::offset(b)), m);
        }
    }

    /// Group `g` (vectors `4g..4g + 4`) against one row.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group<L: Layout>(row: &[u8], batch: &Q8Batch, g: usize) -> [f32; GROUP] {
        let blocks = row.len() / L::BYTES;
        let mut acc = unsafe { Slots::new() };
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
        unsafe { acc.totals() }
    }

    /// Rows per tile of the batched kernel.
    const TILE: usize = 8;

    /// Eight rows' blocks unpacked and transposed for the batched kernel:
    /// per block, eight registers (one per 4-byte position `k` of the block)
    /// each holding the eight rows' bytes at that position, the same for the
    /// weights' signs (signed layouts), and the rows' scales and offsets.
    struct Tile {
        weights: Vec<__m256i>,
        signs: Vec<__m256i>,
        scales: Vec<__m256>,
        offsets: Vec<__m256>,
    }

    /// `r[j]`'s dword `k` in lane `j` of output `k` (an 8 × 8 dword transpose).
    #[inline(always)]
    unsafe fn transpose8(r: [__m256i; 8]) -> [__m256i; 8] {
        unsafe {
            let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
            let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
            let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
            let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
            let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
            let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
            let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
            let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
            let u0 = _mm256_unpacklo_epi64(t0, t2);
            let u1 = _mm256_unpackhi_epi64(t0, t2);
            let u2 = _mm256_unpacklo_epi64(t1, t3);
            let u3 = _mm256_unpackhi_epi64(t1, t3);
            let u4 = _mm256_unpacklo_epi64(t4, t6);
            let u5 = _mm256_unpackhi_epi64(t4, t6);
            let u6 = _mm256_unpacklo_epi64(t5, t7);
            let u7 = _mm256_unpackhi_epi64(t5, t7);
            [
                _mm256_permute2x128_si256::<0x20>(u0, u4),
                _mm256_permute2x128_si256::<0x20>(u1, u5),
                _mm256_permute2x128_si256::<0x20>(u2, u6),
                _mm256_permute2x128_si256::<0x20>(u3, u7),
                _mm256_permute2x128_si256::<0x31>(u0, u4),
                _mm256_permute2x128_si256::<0x31>(u1, u5),
                _mm256_permute2x128_si256::<0x31>(u2, u6),
                _mm256_permute2x128_si256::<0x31>(u3, u7),
            ]
        }
    }

    thread_local! {
        /// This thread's tile, kept from task to task (a task is a few tiles).
        static THREAD_TILE: RefCell<Tile> = const {
            RefCell::new(Tile {
                weights: Vec::new(),
                signs: Vec::new(),
                scales: Vec::new(),
                offsets: Vec::new(),
            })
        };
    }

    /// Eight nibble blocks (16 bytes from `at`) as [`transpose8`] of their
    /// unpacked weights gives them, but transposed while still packed: dword
    /// `k < 4` of every row holds weights `4k..4k + 4` in its low nibbles and
    /// `16 + 4k..` in its high ones, so one 4 × 4 dword transpose per half
    /// and a mask or shift per output replace unpacking eight rows and an
    /// 8 × 8 transpose.
    ///
    /// # Safety
    /// Every block must hold 16 bytes from `at`; only call from AVX2 code.
    #[inline(always)]
    unsafe fn nibble_tile(b: [&[u8]; TILE], at: usize) -> [__m256i; 8] {
        assert!(b.iter().all(|block| block.len() >= at + 16));
        unsafe {
            let mut rows = [_mm_setzero_si128(); TILE];
            for (row, block) in rows.iter_mut().zip(b) {
                *row = _mm_loadu_si128(block.as_ptr().add(at).cast());
            }
            // Rows r and r + 4 side by side, so lane j ends up holding row j.
            let p0 = _mm256_set_m128i(rows[4], rows[0]);
            let p1 = _mm256_set_m128i(rows[5], rows[1]);
            let p2 = _mm256_set_m128i(rows[6], rows[2]);
            let p3 = _mm256_set_m128i(rows[7], rows[3]);
            let t0 = _mm256_unpacklo_epi32(p0, p1);
            let t1 = _mm256_unpackhi_epi32(p0, p1);
            let t2 = _mm256_unpacklo_epi32(p2, p3);
            let t3 = _mm256_unpackhi_epi32(p2, p3);
            let dwords = [
                _mm256_unpacklo_epi64(t0, t2),
                _mm256_unpackhi_epi64(t0, t2),
                _mm256_unpacklo_epi64(t1, t3),
                _mm256_unpackhi_epi64(t1, t3),
            ];
            let mask = _mm256_set1_epi8(0x0F);
            let mut out = [_mm256_setzero_si256(); 8];
            for (k, d) in dwords.into_iter().enumerate() {
                out[k] = _mm256_and_si256(d, mask);
                out[k + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(d), mask);
            }
            out
        }
    }

    impl Tile {
        /// Sized for rows of `blocks` blocks.
        fn resize(&mut self, blocks: usize) {
            // SAFETY: AVX is available to every caller (the AVX2 kernels).
            let (zi, zf) = unsafe { (_mm256_setzero_si256(), _mm256_setzero_ps()) };
            self.weights.resize(8 * blocks, zi);
            self.signs.resize(8 * blocks, zi);
            self.scales.resize(blocks, zf);
            self.offsets.resize(blocks, zf);
        }

        /// Fills the tile from eight rows, prefetching the `8 × blocks`
        /// blocks from `next` on (the next tile) as it goes.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn fill<L: Layout>(&mut self, rows: [&[u8]; TILE], next: *const u8) {
            for i in 0..self.scales.len() {
                let ahead = next.wrapping_add(TILE * L::BYTES * i);
                for line in 0..(TILE * L::BYTES).div_ceil(64) {
                    // A prefetch is a hint: it never faults, wherever it points.
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
                }
                let mut b: [&[u8]; TILE] = [&[]; TILE];
                for (block, row) in b.iter_mut().zip(rows) {
                    *block = &row[i * L::BYTES..(i + 1) * L::BYTES];
                }
                // SAFETY: every block holds its layout's bytes.
                unsafe {
                    if let Some(at) = L::NIBBLES {
                        self.weights[8 * i..8 * i + 8].copy_from_slice(&nibble_tile(b, at));
                    } else {
                        let mut unsigned = [_mm256_setzero_si256(); TILE];
                        let mut signs = [_mm256_setzero_si256(); TILE];
                        for r in 0..TILE {
                            (unsigned[r], signs[r]) = L::weights(b[r]);
                        }
                        self.weights[8 * i..8 * i + 8].copy_from_slice(&transpose8(unsigned));
                        if !L::HAS_OFFSET {
                            self.signs[8 * i..8 * i + 8].copy_from_slice(&transpose8(signs));
                        }
                    }
                    let (d0, o0) = L::scales_and_offsets([b[0], b[1], b[2], b[3]]);
                    let (d1, o1) = L::scales_and_offsets([b[4], b[5], b[6], b[7]]);
                    self.scales[i] = _mm256_set_m128(d1, d0);
                    self.offsets[i] = _mm256_set_m128(o1, o0);
                }
            }
        }
    }

    /// Activation bytes `4k..4k + 4` at `x` in every dword, with the weights'
    /// signs moved onto them for signed layouts.
    #[inline(always)]
    unsafe fn broadcast4<L: Layout>(x: *const i8, k: usize, signs: &[__m256i]) -> __m256i {
        unsafe {
            let x = _mm256_set1_epi32((x.add(4 * k) as *const i32).read_unaligned());
            if L::HAS_OFFSET {
                x
            } else {
                _mm256_sign_epi8(x, signs[k])
            }
        }
    }

    /// Σ over 4-byte positions `first..first + 4` of tile block `w` against the
    /// activation bytes at `x`, as eight exact i32 lanes (one per row).
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // See the loops' comment.
    unsafe fn tile_half<L: Layout>(
        w: &[__m256i],
        signs: &[__m256i],
        x: *const i8,
        first: usize,
    ) -> __m256i {
        unsafe {
            if L::SMALL {
                // Weights below 32: four pair sums stay within i16.
                let mut pairs = _mm256_maddubs_epi16(w[first], broadcast4::<L>(x, first, signs));
                // Index loops, not iterator adapters: in builds that do not
                // inline across codegen units (tests) an adapter's `next` is
                // a call per weight register.
                for k in first + 1..first + 4 {
                    let x = broadcast4::<L>(x, k, signs);
                    pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(w[k], x));
                }
                _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
            } else {
                let mut sum = _mm256_setzero_si256();
                for k in first..first + 4 {
                    let pairs = _mm256_maddubs_epi16(w[k], broadcast4::<L>(x, k, signs));
                    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
                }
                sum
            }
        }
    }

    /// Block `i` of the tile against vector `a`, with parity `K`: the same
    /// float operations, per (row, vector), as [`Slots::add`].
    #[inline(always)]
    unsafe fn tile_block<L: Layout, const K: usize>(
        acc: &mut TileSlots,
        tile: &Tile,
        a: &Q8Activations,
        i: usize,
    ) {
        unsafe {
            let (w, s) = (
                &tile.weights[8 * i..8 * i + 8],
                &tile.signs[8 * i..8 * i + 8],
            );
            let x = a.q.as_ptr().add(32 * i);
            let lo = tile_half::<L>(w, s, x, 0);
            let hi = tile_half::<L>(w, s, x, 4);
            let d = _mm256_mul_ps(tile.scales[i], _mm256_set1_ps(a.scales[i]));
            acc.lo[K] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lo), acc.lo[K]);
            acc.hi[K] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(hi), acc.hi[K]);
            if L::HAS_OFFSET {
                acc.offsets[K] =
                    _mm256_fmadd_ps(tile.offsets[i], _mm256_set1_ps(a.sums[i]), acc.offsets[K]);
            }
        }
    }

    /// Eight rows' accumulators for one vector: the low and high 16-value
    /// halves of each block and the offset terms, even and odd blocks apart.
    struct TileSlots {
        lo: [__m256; 2],
        hi: [__m256; 2],
        offsets: [__m256; 2],
    }

    /// The tile's eight rows against vector `a`, reduced as [`Slots::totals`] does.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_one<L: Layout>(tile: &Tile, a: &Q8Activations) -> [f32; TILE] {
        let zero = _mm256_setzero_ps();
        let mut acc = TileSlots {
            lo: [zero; 2],
            hi: [zero; 2],
            offsets: [zero; 2],
        };
        let blocks = tile.scales.len();
        let mut i = 0;
        // SAFETY: `run` asserted the vector covers every block.
        unsafe {
            while i + 1 < blocks {
                tile_block::<L, 0>(&mut acc, tile, a, i);
                tile_block::<L, 1>(&mut acc, tile, a, i + 1);
                i += 2;
            }
            if i < blocks {
                tile_block::<L, 0>(&mut acc, tile, a, i);
            }
        }
        let halves = _mm256_add_ps(
            _mm256_add_ps(acc.lo[0], acc.lo[1]),
            _mm256_add_ps(acc.hi[0], acc.hi[1]),
        );
        let total = _mm256_add_ps(halves, _mm256_add_ps(acc.offsets[0], acc.offsets[1]));
        let mut out = [0f32; TILE];
        // SAFETY: `out` holds eight floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), total) };
        out
    }

    /// Every row of `rows` against every vector of `batch`: with four or
    /// more vectors, tiles of eight rows (unpacked once, each vector's bytes
    /// broadcast against all eight rows at a time), the other rows by `rest`.
    fn run<L: Layout>(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut [f32]) {
        let (n, count) = (batch.len(), rows.len() / row_bytes);
        let blocks = row_bytes / L::BYTES;
        assert_eq!(row_bytes % L::BYTES, 0);
        assert_eq!(count * n, out.len());
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
        // SAFETY (all calls): selected only after the CPU reported AVX2, FMA
        // and F16C; sizes asserted above.
        let tiled = if n >= GROUP {
            rows.len() / row_bytes / TILE * TILE
        } else {
            0
        };
        if tiled > 0 {
            THREAD_TILE.with(|tile| {
                let mut tile = tile.borrow_mut();
                tile.resize(blocks);
                let tiles = rows[..tiled * row_bytes].chunks_exact(TILE * row_bytes);
                for (q, eight) in tiles.enumerate() {
                    let next = eight.as_ptr().wrapping_add(eight.len());
                    let mut rows: [&[u8]; TILE] = [&[]; TILE];
                    for (row, bytes) in rows.iter_mut().zip(eight.chunks_exact(row_bytes)) {
                        *row = bytes;
                    }
                    unsafe { tile.fill::<L>(rows, next) };
                    for (t, a) in batch.vectors.iter().enumerate() {
                        let ys = unsafe { tile_one::<L>(&tile, a) };
                        out[t * count + TILE * q..][..TILE].copy_from_slice(&ys);
                    }
                }
            });
        }
        rest::<L>(&rows[tiled * row_bytes..], row_bytes, batch, out, tiled);
    }

    /// [`run`] on rows outside whole tiles (or all rows of a single-vector
    /// batch), which are rows `first..` of `out`: whole groups of four
    /// vectors per row, the remaining vectors four rows at a time.
    fn rest<L: Layout>(
        rows: &[u8],
        row_bytes: usize,
        batch: &Q8Batch,
        out: &mut [f32],
        first: usize,
    ) {
        let n = batch.len();
        let count = out.len() / n.max(1);
        let grouped = GROUP * batch.group_q.len();
        // SAFETY (all calls): as in `run`.
        for (r, row) in rows.chunks_exact(row_bytes).enumerate() {
            for g in 0..grouped / GROUP {
                let ys = unsafe { group::<L>(row, batch, g) };
                for (j, y) in ys.into_iter().enumerate() {
                    out[(GROUP * g + j) * count + first + r] = y;
                }
            }
        }
        if grouped == n {
            return;
        }
        for (q, quad) in rows.chunks(4 * row_bytes).enumerate() {
            let in_quad = quad.len() / row_bytes;
            let row = |k: usize| &quad[k.min(in_quad - 1) * row_bytes..][..row_bytes];
            let four = [row(0), row(1), row(2), row(3)];
            // Two quads ahead: far enough to hide the memory latency (one
            // ahead gained half as much on this machine, four ahead less).
            let next = quad.as_ptr().wrapping_add(2 * quad.len());
            for t in grouped..n {
                let ys = unsafe { rows_one::<L>(four, next, batch, t) };
                for (k, y) in ys.into_iter().take(in_quad).enumerate() {
                    out[t * count + first + 4 * q + k] = y;
                }
            }
        }
    }

    pub(super) fn q4_0(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut [f32]) {
        run::<Q4_0>(rows, row_bytes, batch, out)
    }
    pub(super) fn q4_1(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut [f32]) {
        run::<Q4_1>(rows, row_bytes, batch, out)
    }
    pub(super) fn q5_0(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut [f32]) {
        run::<Q5_0>(rows, row_bytes, batch, out)
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

    /// Every type with an integer kernel.
    const TYPES: [GgmlType; 7] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// The dispatched (AVX2) block quantization gives the portable code's
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
        for block in blocks {
            let mut a = Q8Activations::default();
            a.quantize(&block);
            let scale = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            let inv = Some(1.0 / scale)
                .filter(|inv| inv.is_finite() && scale > 0.0)
                .unwrap_or(0.0);
            let mut want = [0i8; 32];
            let sum = quantize_block(&block, inv, &mut want);
            assert_eq!(a.q, want, "{block:?}");
            assert!(a.q.iter().all(|&q| q != i8::MIN), "{block:?}");
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
    /// several rows (a whole quad and a partial one) gives exactly what each vector
    /// gives alone against each row alone: batch invariance.
    #[test]
    fn batched_vectors_and_rows_match_one_at_a_time() {
        // Eleven rows: one tile of eight and three rows outside it.
        let (cols, n, rows) = (512, 11, 11);
        let x: Vec<f32> = (0..n).flat_map(|t| vector(cols, 100 + t as u64)).collect();
        let batch = Q8Batch::quantize(&x, n);
        assert_eq!(batch.len(), n);
        for ty in TYPES {
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
