//! The AVX2 kernels. Per block, the 32 integer products of a (row, vector)
//! pair are summed exactly in integer registers, converted to f32 once and
//! accumulated with one fused multiply-add by the pair's combined scale;
//! offset terms (Q4_0's −8, Q4_1's minimum) go into a second accumulator
//! added at the end. Shapes: with few vectors (decode), four rows at a time
//! against each vector, straight from the blocks (eight rows at a time for
//! weights the loader interleaved, [`crate::quant::interleave`]); with more
//! (prefill, batched decode), tiles of eight rows unpacked and transposed
//! once so that one broadcast activation dword meets all eight rows in one
//! instruction, two tiles against two vectors at a time ([`tiles`]).
//!
//! Batch invariance: a (row, vector) pair's float operations are the same in
//! every shape — the same fused multiply-adds in the same block order, the
//! same final addition — and integer sums are exact in any order, so a
//! vector's result is bit-for-bit the same alone or beside other vectors and
//! rows. A request's tokens never depend on what else shares its batch.

use std::arch::x86_64::*;
use std::marker::PhantomData;

use super::super::interleave::GROUP_ROWS;
use super::{Outputs, Q8Activations, Q8Batch};

mod tiles;

/// [`super::quantize_block`] in AVX2 (the same results).
///
/// # Safety
/// The CPU must have AVX2; `block` and `q` hold 32 values.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_block(block: &[f32], inv: f32, q: &mut [i8]) -> i32 {
    assert!(block.len() == 32 && q.len() == 32);
    // SAFETY: AVX2 is enabled here; `block` and `q` hold 32 values (asserted
    // above), so the four 8-float loads from `p` (in `round8`) and the
    // unaligned 32-byte store into `q` stay in bounds.
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

/// [`Q8Activations::quantize`] with the blocks' largest magnitudes and the
/// f16 roundings in vector instructions: the same scales, bytes and sums.
///
/// # Safety
/// The CPU must have AVX2 and F16C; `a` is sized for `x` (whole blocks).
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn quantize(x: &[f32], a: &mut Q8Activations) {
    let blocks = x.len() / 32;
    assert!(a.q.len() == 32 * blocks && a.scales.len() == blocks && a.sums.len() == blocks);
    let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    for (i, block) in x.chunks_exact(32).enumerate() {
        // SAFETY: the block holds 32 values.
        let max = unsafe {
            let p = block.as_ptr();
            // `max_ps` returns its second operand when either is NaN: NaN
            // values are skipped, as `f32::max` skips them.
            let mut m = _mm256_setzero_ps();
            for k in 0..4 {
                m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(p.add(8 * k)), magnitude), m);
            }
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
        };
        let (scale, inv) = super::scale_of(max);
        // SAFETY: the CPU has AVX2 (the contract); both hold 32 values.
        let sum = unsafe { quantize_block(block, inv, &mut a.q[32 * i..32 * (i + 1)]) };
        a.scales[i] = through_f16(scale);
        a.sums[i] = through_f16(sum as f32 * scale);
    }
}

/// `v` rounded to the nearest f16 (ties to even) and back, as
/// `f16::from_f32(v).to_f32()` gives it.
#[inline]
#[target_feature(enable = "f16c")]
fn through_f16(v: f32) -> f32 {
    let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(v));
    _mm_cvtss_f32(_mm_cvtph_ps(h))
}

/// Eight values from `p`, times `scale`, rounded (ties to even) to i32.
///
/// # Safety
/// `p..p + 8` must be readable; only call from AVX2 code.
#[inline(always)]
unsafe fn round8(p: *const f32, scale: __m256) -> __m256i {
    // SAFETY: `p..p + 8` is readable, loaded unaligned; the caller is
    // compiled with AVX2 (both the contract).
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
    /// How many `maddubs` results (each a pair sum per i16 lane) of
    /// consecutive 4-byte positions add up within i16: weights below 16
    /// give 8 (a whole block), below 32 give 4, signed bytes only 1.
    const I16_TERMS: usize;
    /// Where a block's 16 bytes of nibbles start, for layouts whose
    /// weights are exactly those nibbles (values `j` and `j + 16` in
    /// byte `j`): their tiles are transposed before unpacking.
    const NIBBLES: Option<usize> = None;
    /// The 32 weights as `maddubs`' unsigned operand, and the signs to
    /// move onto the activations (signed weights only).
    ///
    /// # Safety
    /// `b` must hold a whole block (`BYTES` bytes); only call from AVX2 code.
    unsafe fn weights(b: &[u8]) -> (__m256i, __m256i);
    /// Four blocks' scales and offset factors, as 4 lanes each (the same
    /// values the portable kernels read, converted four at a time).
    ///
    /// # Safety
    /// Only call from code compiled with AVX2, FMA and F16C.
    unsafe fn scales_and_offsets(b: [&[u8]; 4]) -> (__m128, __m128);
}

/// The f16 at byte `at` of each of four blocks, as 4 f32 lanes.
///
/// # Safety
/// Only call from code compiled with F16C.
#[inline(always)]
unsafe fn f16x4(b: [&[u8]; 4], at: usize) -> __m128 {
    let h = |k: usize| i16::from_le_bytes([b[k][at], b[k][at + 1]]);
    // SAFETY: register-only intrinsics (the bytes were read with checked
    // indexing); the caller is compiled with F16C (the contract).
    unsafe { _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, h(3), h(2), h(1), h(0))) }
}

/// 16 bytes of nibbles → 32 unsigned bytes: low nibbles first, then high nibbles.
///
/// # Safety
/// `p..p + 16` must be readable; only call from AVX2 code.
#[inline(always)]
unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
    // SAFETY: `p..p + 16` is readable, loaded unaligned; the caller is
    // compiled with AVX2 (both the contract).
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
    const I16_TERMS: usize = 8;
    const NIBBLES: Option<usize> = Some(2);
    #[inline(always)]
    unsafe fn weights(b: &[u8]) -> (__m256i, __m256i) {
        // SAFETY: a block holds 16 nibble bytes after its scale.
        let w = unsafe { unpack_nibbles(b.as_ptr().add(2)) };
        (w, w)
    }
    #[inline(always)]
    unsafe fn scales_and_offsets(b: [&[u8]; 4]) -> (__m128, __m128) {
        // SAFETY: `f16x4` needs F16C, which the caller has (the contract);
        // the rest is register-only SSE.
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
    const I16_TERMS: usize = 8;
    const NIBBLES: Option<usize> = Some(4);
    #[inline(always)]
    unsafe fn weights(b: &[u8]) -> (__m256i, __m256i) {
        // SAFETY: a block holds 16 nibble bytes after its scale and minimum.
        let w = unsafe { unpack_nibbles(b.as_ptr().add(4)) };
        (w, w)
    }
    #[inline(always)]
    unsafe fn scales_and_offsets(b: [&[u8]; 4]) -> (__m128, __m128) {
        // SAFETY: `f16x4` needs F16C, which the caller has (the contract).
        unsafe { (f16x4(b, 0), f16x4(b, 2)) }
    }
}

/// Layouts the loader interleaves eight rows at a time
/// ([`crate::quant::interleave`]).
trait Interleaved: Layout {
    /// Where an interleaved block's weight registers start: after the
    /// eight rows' headers.
    const REGISTERS: usize;
    /// The eight rows' scales and offset factors of the interleaved block
    /// at `p` (the same values as [`Layout::scales_and_offsets`]).
    ///
    /// # Safety
    /// `p` must start an interleaved block (its `REGISTERS` header bytes
    /// readable); only call from code compiled with AVX2 and F16C.
    unsafe fn group_scales(p: *const u8) -> (__m256, __m256);
}

impl Interleaved for Q4_0 {
    const REGISTERS: usize = 16;
    #[inline(always)]
    unsafe fn group_scales(p: *const u8) -> (__m256, __m256) {
        // SAFETY: the block's header is the eight rows' f16 scales, 16
        // readable bytes at `p`, loaded unaligned; the caller is compiled
        // with AVX2 and F16C (both the contract).
        unsafe {
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
            (d, _mm256_mul_ps(d, _mm256_set1_ps(-8.0)))
        }
    }
}

impl Interleaved for Q4_1 {
    const REGISTERS: usize = 32;
    #[inline(always)]
    unsafe fn group_scales(p: *const u8) -> (__m256, __m256) {
        // SAFETY: the block's 32-byte header is the eight rows' f16 scales,
        // then their f16 minimums, readable from `p`, loaded unaligned; the
        // caller is compiled with AVX2 and F16C (both the contract).
        unsafe {
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
            (d, _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast())))
        }
    }
}

impl Interleaved for Q8_0 {
    const REGISTERS: usize = 16;
    #[inline(always)]
    unsafe fn group_scales(p: *const u8) -> (__m256, __m256) {
        // SAFETY: the block's header is the eight rows' f16 scales, 16
        // readable bytes at `p`, loaded unaligned; the caller is compiled
        // with AVX2 and F16C (both the contract).
        unsafe {
            (
                _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                _mm256_setzero_ps(),
            )
        }
    }
}

/// 32 bits → 32 bytes: byte j is 0x10 if bit j is set, else 0.
///
/// # Safety
/// `p..p + 4` must be readable; only call from AVX2 code.
#[inline(always)]
unsafe fn fifth_bits(p: *const u8) -> __m256i {
    // SAFETY: `p..p + 4` is readable, read unaligned; the rest are
    // register-only AVX2 intrinsics, which the caller has (both the contract).
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
    const I16_TERMS: usize = 4;
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
    unsafe fn scales_and_offsets(b: [&[u8]; 4]) -> (__m128, __m128) {
        // SAFETY: `f16x4` needs F16C, which the caller has (the contract);
        // the rest is register-only SSE.
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
    const I16_TERMS: usize = 1;
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
    unsafe fn scales_and_offsets(b: [&[u8]; 4]) -> (__m128, __m128) {
        // SAFETY: `f16x4` needs F16C, which the caller has (the contract).
        unsafe { (f16x4(b, 0), _mm_setzero_ps()) }
    }
}

/// Σ w × x over the block, summed exactly into 8 i32 lanes.
///
/// # Safety
/// `x` must point at the block's 32 readable activation bytes; only call
/// from AVX2 code.
#[inline(always)]
unsafe fn dot<L: Layout>(w: (__m256i, __m256i), x: *const i8) -> __m256i {
    // SAFETY: `x` points at 32 readable bytes, loaded unaligned; the caller
    // is compiled with AVX2 (both the contract).
    unsafe {
        let mut x = _mm256_loadu_si256(x as *const __m256i);
        if !L::HAS_OFFSET {
            x = _mm256_sign_epi8(x, w.1);
        }
        let pairs = _mm256_maddubs_epi16(w.0, x);
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }
}

/// The accumulators of four outputs (four rows against one vector), lane
/// j holding row j's: the scaled block sums and the offset terms.
#[derive(Clone, Copy)]
struct Slots {
    dots: __m128,
    offsets: __m128,
}

impl Slots {
    #[inline(always)]
    unsafe fn new() -> Slots {
        // SAFETY: SSE register intrinsics only, and every x86-64 CPU has SSE.
        unsafe {
            Slots {
                dots: _mm_setzero_ps(),
                offsets: _mm_setzero_ps(),
            }
        }
    }

    /// Adds one block: `p[j]` is row j's integer products (8 lanes),
    /// `scales` the rows' combined scales, `offsets × sums` their offset
    /// terms.
    ///
    /// # Safety
    /// Only call from code compiled with AVX2 and FMA.
    #[inline(always)]
    unsafe fn add<L: Layout>(
        &mut self,
        p: [__m256i; 4],
        scales: __m128,
        offsets: __m128,
        sums: __m128,
    ) {
        // SAFETY: register-only AVX2 and FMA intrinsics; the caller is
        // compiled with both (the contract).
        unsafe {
            // Lane j: row j's low 16 products; lane j + 4: its high 16.
            let halves =
                _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
            let rows = _mm_add_epi32(
                _mm256_castsi256_si128(halves),
                _mm256_extracti128_si256(halves, 1),
            );
            self.dots = _mm_fmadd_ps(scales, _mm_cvtepi32_ps(rows), self.dots);
            if L::HAS_OFFSET {
                self.offsets = _mm_fmadd_ps(offsets, sums, self.offsets);
            }
        }
    }

    /// The four rows' results.
    #[inline(always)]
    unsafe fn totals<L: Layout>(&self) -> [f32; 4] {
        let mut out = [0f32; 4];
        // SAFETY: `out` holds the four floats the unaligned store writes; the
        // intrinsics are SSE, which every x86-64 CPU has.
        unsafe {
            let total = if L::HAS_OFFSET {
                _mm_add_ps(self.dots, self.offsets)
            } else {
                self.dots
            };
            _mm_storeu_ps(out.as_mut_ptr(), total);
        }
        out
    }
}

/// Block `i` of vector `a` against four rows (fewer rows repeat the
/// first).
///
/// # Safety
/// `a.q` must hold block `i` (`32 * (i + 1)` bytes); only call from code
/// compiled with AVX2, FMA and F16C.
#[inline(always)]
unsafe fn rows_block<L: Layout>(acc: &mut Slots, rows: [&[u8]; 4], a: &Q8Activations, i: usize) {
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
        acc.add::<L>(p, scales, offsets, _mm_set1_ps(a.sums[i]));
    }
}

/// Vector `a` against four rows (`rows` may repeat a row to fill), while
/// the `4 × blocks` blocks from `next` on (four rows a little further
/// on) are prefetched: four short row streams at once defeat the
/// hardware prefetcher, which left large Q8_0 matrices at a third of the
/// memory bandwidth.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `a` must cover every block of
/// `rows[0]` (as [`checked`] asserts).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_one<L: Layout>(rows: [&[u8]; 4], next: *const u8, a: &Q8Activations) -> [f32; 4] {
    let blocks = rows[0].len() / L::BYTES;
    // SAFETY: `Slots::new` only zeroes SSE registers.
    let mut acc = unsafe { Slots::new() };
    let mut i = 0;
    while i + 1 < blocks {
        // The next rows' bytes at the pace these are read (4 rows × 2 blocks per step).
        let ahead = next.wrapping_add(4 * L::BYTES * i);
        for line in 0..(8 * L::BYTES).div_ceil(64) {
            // A prefetch is a hint: it never faults, wherever it points.
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
        }
        // SAFETY: AVX2, FMA and F16C are enabled here; `a` covers blocks `i`
        // and `i + 1 < blocks` (the contract).
        unsafe {
            rows_block::<L>(&mut acc, rows, a, i);
            rows_block::<L>(&mut acc, rows, a, i + 1);
        }
        i += 2;
    }
    if i < blocks {
        // SAFETY: as above, for block `i < blocks`.
        unsafe { rows_block::<L>(&mut acc, rows, a, i) };
    }
    // SAFETY: `totals` only adds registers and stores into its own array.
    unsafe { acc.totals::<L>() }
}

/// Every row of `rows` against every vector of `batch`: with
/// [`tiles::TILED_FROM`] vectors or more through tiles ([`tiles::run`]);
/// with fewer, four rows at a time against each vector straight from the
/// blocks.
fn run<L: Layout>(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>) {
    if !checked::<L>(rows, row_bytes, batch, out) {
        return;
    }
    if batch.len() < tiles::TILED_FROM {
        return singles::<L>(rows, row_bytes, batch, out);
    }
    let kind = PhantomData::<(L, tiles::InFile)>;
    let weights = tiles::Weights {
        data: rows,
        row_bytes,
        kind,
    };
    tiles::run(weights, batch, out);
}

/// Checks the shapes every kernel relies on: whole blocks per row, whole
/// rows, one output per row and vector, vectors covering the rows. False
/// when there is nothing to compute.
fn checked<L: Layout>(
    rows: &[u8],
    row_bytes: usize,
    batch: &Q8Batch,
    out: &mut Outputs<'_>,
) -> bool {
    let (n, count) = (batch.len(), rows.len() / row_bytes);
    let blocks = row_bytes / L::BYTES;
    assert_eq!(row_bytes % L::BYTES, 0);
    assert_eq!(rows.len() % row_bytes, 0);
    assert_eq!(count, out.count());
    assert_eq!(n, out.vectors());
    for a in &batch.vectors {
        assert!(a.q.len() >= 32 * blocks && a.scales.len() >= blocks && a.sums.len() >= blocks);
    }
    count > 0 && n > 0
}

/// [`run`] on rows interleaved by the loader (whole groups of eight).
fn run_groups<L: Interleaved>(
    data: &[u8],
    row_bytes: usize,
    batch: &Q8Batch,
    out: &mut Outputs<'_>,
) {
    assert_eq!(data.len() % (GROUP_ROWS * row_bytes.max(1)), 0);
    if !checked::<L>(data, row_bytes, batch, out) {
        return;
    }
    if batch.len() >= tiles::TILED_FROM {
        let kind = PhantomData::<(L, tiles::Grouped)>;
        let weights = tiles::Weights {
            data,
            row_bytes,
            kind,
        };
        return tiles::run(weights, batch, out);
    }
    for (g, group) in data.chunks_exact(GROUP_ROWS * row_bytes).enumerate() {
        // The next group: eight rows on.
        let next = group.as_ptr().wrapping_add(group.len());
        for (t, a) in batch.vectors.iter().enumerate() {
            // SAFETY: selected only after the CPU reported AVX2, FMA and
            // F16C; `checked` asserted the vector's size.
            let ys = unsafe { group_one::<L>(group, next, a) };
            out.put(t, GROUP_ROWS * g, &ys);
        }
    }
}

/// The activation bytes `at..at + 4` in every dword.
///
/// # Safety
/// They must be readable; AVX2 code only.
#[inline(always)]
unsafe fn dword(x: *const i8, at: usize) -> __m256i {
    // SAFETY: `x + at..x + at + 4` is readable, read unaligned; the caller
    // is compiled with AVX2 (both the contract).
    unsafe { _mm256_set1_epi32((x.add(at) as *const i32).read_unaligned()) }
}

/// One interleaved group of eight rows against vector `a`, prefetching the
/// group at `next`: per block, four loads give the eight rows' 4-bit
/// weights (a mask and a shift each), or eight their signed bytes, and each
/// activation dword is broadcast once against all eight rows. The float
/// operations are [`Slots`]'.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_one<L: Interleaved>(group: &[u8], next: *const u8, a: &Q8Activations) -> [f32; 8] {
    let bytes = GROUP_ROWS * L::BYTES;
    let blocks = group.len() / bytes;
    assert!(a.q.len() >= 32 * blocks && a.scales.len() >= blocks && a.sums.len() >= blocks);
    let (mask, ones) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi16(1));
    let (mut dots, mut offsets) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (i, block) in group.chunks_exact(bytes).enumerate() {
        let ahead = next.wrapping_add(bytes * i);
        for line in 0..bytes.div_ceil(64) {
            // A prefetch is a hint: it never faults, wherever it points.
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
        }
        // SAFETY: the block holds its registers after the header; the
        // vector covers block i (asserted above).
        unsafe {
            let p = block.as_ptr().add(L::REGISTERS);
            let x = a.q.as_ptr().add(32 * i);
            let sums = if L::NIBBLES.is_some() {
                let mut pairs = _mm256_setzero_si256();
                for k in 0..4 {
                    let d = _mm256_loadu_si256(p.add(32 * k).cast());
                    let low = _mm256_and_si256(d, mask);
                    let high = _mm256_and_si256(_mm256_srli_epi16::<4>(d), mask);
                    pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(low, dword(x, 4 * k)));
                    pairs =
                        _mm256_add_epi16(pairs, _mm256_maddubs_epi16(high, dword(x, 16 + 4 * k)));
                }
                _mm256_madd_epi16(pairs, ones)
            } else {
                // Signed bytes: magnitudes times the activations with the
                // weights' signs, each pair sum widened (two overflow i16).
                let mut sums = _mm256_setzero_si256();
                for k in 0..8 {
                    let w = _mm256_loadu_si256(p.add(32 * k).cast());
                    let xs = _mm256_sign_epi8(dword(x, 4 * k), w);
                    let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), xs);
                    sums = _mm256_add_epi32(sums, _mm256_madd_epi16(pairs, ones));
                }
                sums
            };
            let (scales, factors) = L::group_scales(block.as_ptr());
            let d = _mm256_mul_ps(scales, _mm256_set1_ps(*a.scales.get_unchecked(i)));
            dots = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums), dots);
            if L::HAS_OFFSET {
                let sum = _mm256_set1_ps(*a.sums.get_unchecked(i));
                offsets = _mm256_fmadd_ps(factors, sum, offsets);
            }
        }
    }
    let total = if L::HAS_OFFSET {
        _mm256_add_ps(dots, offsets)
    } else {
        dots
    };
    let mut out = [0f32; 8];
    // SAFETY: `out` holds eight floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), total) };
    out
}

/// [`run`] with fewer than [`tiles::TILED_FROM`] vectors: four rows at a time
/// against each vector.
fn singles<L: Layout>(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>) {
    for (q, quad) in rows.chunks(4 * row_bytes).enumerate() {
        let in_quad = quad.len() / row_bytes;
        let row = |k: usize| &quad[k.min(in_quad - 1) * row_bytes..][..row_bytes];
        let four = [row(0), row(1), row(2), row(3)];
        // Two quads ahead: far enough to hide the memory latency (one
        // ahead gained half as much on this machine, four ahead less).
        let next = quad.as_ptr().wrapping_add(2 * quad.len());
        for (t, a) in batch.vectors.iter().enumerate() {
            // SAFETY: selected only after the CPU reported AVX2, FMA and
            // F16C; `run` asserted the vector's size.
            let ys = unsafe { rows_one::<L>(four, next, a) };
            out.put(t, 4 * q, &ys[..in_quad]);
        }
    }
}

pub(super) fn q4_0(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>) {
    run::<Q4_0>(rows, row_bytes, batch, out)
}
pub(super) fn q4_1(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>) {
    run::<Q4_1>(rows, row_bytes, batch, out)
}
pub(super) fn q4_0_groups(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>) {
    run_groups::<Q4_0>(rows, row_bytes, batch, out)
}
pub(super) fn q4_1_groups(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>) {
    run_groups::<Q4_1>(rows, row_bytes, batch, out)
}
pub(super) fn q8_0_groups(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>) {
    run_groups::<Q8_0>(rows, row_bytes, batch, out)
}
pub(super) fn q5_0(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>) {
    run::<Q5_0>(rows, row_bytes, batch, out)
}
pub(super) fn q8_0(rows: &[u8], row_bytes: usize, batch: &Q8Batch, out: &mut Outputs<'_>) {
    run::<Q8_0>(rows, row_bytes, batch, out)
}
