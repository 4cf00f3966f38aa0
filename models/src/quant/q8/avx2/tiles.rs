//! The batched shape of the AVX2 kernels: tiles of eight rows, unpacked
//! and transposed once so that one broadcast activation dword meets all
//! eight rows in one `maddubs`, then multiplied by two vectors at a time.

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::mem::MaybeUninit;

use super::{Interleaved, Layout, Outputs, Q8Activations, Q8Batch};

/// Rows per tile of the batched kernel.
const TILE: usize = 8;

/// Eight rows' blocks unpacked and transposed for the batched kernel:
/// per block, eight registers (one per 4-byte position `k` of the block)
/// each holding the eight rows' bytes at that position (unsigned weights,
/// or signed ones for layouts without an offset), and the rows' scales
/// and offsets.
pub(super) struct Tile {
    weights: Vec<__m256i>,
    scales: Vec<__m256>,
    offsets: Vec<__m256>,
}

/// `r[j]`'s dword `k` in lane `j` of output `k` (an 8 × 8 dword transpose).
///
/// # Safety
/// Only call from AVX2 code.
#[inline(always)]
unsafe fn transpose8(r: [__m256i; 8]) -> [__m256i; 8] {
    // SAFETY: register-only AVX2 intrinsics; the caller is compiled with
    // AVX2 (the contract).
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
    // SAFETY: every block holds 16 bytes from `at` (asserted above), so each
    // unaligned 16-byte load is in bounds; the caller is compiled with AVX2
    // (the contract).
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
    /// A tile for rows of no blocks.
    const EMPTY: Tile = Tile {
        weights: Vec::new(),
        scales: Vec::new(),
        offsets: Vec::new(),
    };

    /// Sized for rows of `blocks` blocks.
    fn resize(&mut self, blocks: usize) {
        // SAFETY: AVX is available to every caller (the AVX2 kernels).
        let (zi, zf) = unsafe { (_mm256_setzero_si256(), _mm256_setzero_ps()) };
        self.weights.resize(8 * blocks, zi);
        self.scales.resize(blocks, zf);
        self.offsets.resize(blocks, zf);
    }

    /// Fills the tile from eight rows.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fill<L: Layout>(&mut self, rows: [&[u8]; TILE]) {
        for i in 0..self.scales.len() {
            let mut b: [&[u8]; TILE] = [&[]; TILE];
            for (block, row) in b.iter_mut().zip(rows) {
                *block = &row[i * L::BYTES..(i + 1) * L::BYTES];
            }
            // SAFETY: every block holds its layout's bytes.
            unsafe {
                if let Some(at) = L::NIBBLES {
                    self.weights[8 * i..8 * i + 8].copy_from_slice(&nibble_tile(b, at));
                } else {
                    let mut weights = [_mm256_setzero_si256(); TILE];
                    for r in 0..TILE {
                        let (unsigned, signed) = L::weights(b[r]);
                        weights[r] = if L::HAS_OFFSET { unsigned } else { signed };
                    }
                    self.weights[8 * i..8 * i + 8].copy_from_slice(&transpose8(weights));
                }
                let (d0, o0) = L::scales_and_offsets([b[0], b[1], b[2], b[3]]);
                let (d1, o1) = L::scales_and_offsets([b[4], b[5], b[6], b[7]]);
                self.scales[i] = _mm256_set_m128(d1, d0);
                self.offsets[i] = _mm256_set_m128(o1, o0);
            }
        }
    }

    /// Fills the tile from an interleaved group of eight rows: a mask and a
    /// shift per register of nibbles, a copy of signed bytes.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fill_group<L: Interleaved>(&mut self, group: &[u8]) {
        let bytes = TILE * L::BYTES;
        assert_eq!(group.len(), self.scales.len() * bytes);
        let mask = _mm256_set1_epi8(0x0F);
        for (i, block) in group.chunks_exact(bytes).enumerate() {
            // SAFETY: an interleaved block holds its registers after the
            // header (`Interleaved::REGISTERS`): four of nibbles, or eight
            // of signed bytes.
            unsafe {
                let p = block.as_ptr().add(L::REGISTERS);
                if L::NIBBLES.is_some() {
                    for k in 0..4 {
                        let d = _mm256_loadu_si256(p.add(32 * k).cast());
                        self.weights[8 * i + k] = _mm256_and_si256(d, mask);
                        self.weights[8 * i + k + 4] =
                            _mm256_and_si256(_mm256_srli_epi16::<4>(d), mask);
                    }
                } else {
                    for k in 0..8 {
                        self.weights[8 * i + k] = _mm256_loadu_si256(p.add(32 * k).cast());
                    }
                }
                (self.scales[i], self.offsets[i]) = L::group_scales(block.as_ptr());
            }
        }
    }
}

thread_local! {
    /// This thread's two tiles, kept from task to task.
    static THREAD_TILES: RefCell<[Tile; 2]> = const {
        RefCell::new([Tile::EMPTY, Tile::EMPTY])
    };
}

/// Vectors from which products go through tiles: with fewer, unpacking
/// a tile costs more than reading the rows once per vector.
pub(super) const TILED_FROM: usize = 4;

/// Exact integer sums of one block of `R` tiles against `T` vectors:
/// lane j of `[r][t]` is row j of tile r times vector t. `w[r]` points
/// at tile r's eight weight registers of the block, `x[t]` at vector
/// t's 32 bytes of it. Every activation dword
/// loaded is used against all `R` tiles and every weight register
/// against all `T` vectors, so the loads stay below the multiplies.
///
/// # Safety
/// The pointers must hold those registers and bytes; AVX2 code only.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // Index loops: see `Tile::fill`.
unsafe fn tile_sums<L: Layout, const R: usize, const T: usize>(
    w: [*const __m256i; R],
    x: [*const i8; T],
) -> [[__m256i; T]; R] {
    // SAFETY: `w[r]` points at eight registers of a `Vec<__m256i>`, so
    // `w[r] + k` for `k < 8` is in bounds and 32-byte aligned for the
    // aligned load; `x[t]` at 32 bytes, so each unaligned dword read at
    // `4k` is in bounds (the contract); the caller is compiled with AVX2.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut sums = [[_mm256_setzero_si256(); T]; R];
        let mut part = [[_mm256_setzero_si256(); T]; R];
        for k in 0..8 {
            let mut xk = [_mm256_setzero_si256(); T];
            for t in 0..T {
                xk[t] = _mm256_set1_epi32((x[t].add(4 * k) as *const i32).read_unaligned());
            }
            for r in 0..R {
                let wk = _mm256_load_si256(w[r].add(k));
                // Signed weights: magnitudes, with the signs moved onto the activations.
                let unsigned = if L::HAS_OFFSET {
                    wk
                } else {
                    _mm256_abs_epi8(wk)
                };
                for t in 0..T {
                    let xt = if L::HAS_OFFSET {
                        xk[t]
                    } else {
                        _mm256_sign_epi8(xk[t], wk)
                    };
                    let p = _mm256_maddubs_epi16(unsigned, xt);
                    part[r][t] = if k % L::I16_TERMS == 0 {
                        p
                    } else {
                        _mm256_add_epi16(part[r][t], p)
                    };
                    if k % L::I16_TERMS == L::I16_TERMS - 1 {
                        let terms = _mm256_madd_epi16(part[r][t], ones);
                        sums[r][t] = _mm256_add_epi32(sums[r][t], terms);
                    }
                }
            }
        }
        sums
    }
}

/// The loads of one 4-byte position `k` of the assembly kernels: weight
/// register `$wr` from tile pointer `$w` at byte `32k`, and each vector's
/// activation dword broadcast into `$xr` from `$x` at byte `4k`.
macro_rules! position_loads {
    ($k:literal; $($w:literal => $wr:literal),+; $($x:literal => $xr:literal),+) => {
        concat!(
            $("vmovdqa {", $wr, "}, ymmword ptr [{", $w, "} + 32 * ", $k, "]\n",)+
            $("vpbroadcastd {", $xr, "}, dword ptr [{", $x, "} + 4 * ", $k, "]\n",)+
        )
    };
}

/// One product of the nibble kernels' positions: `first` writes it as the
/// partial sum `$p`, `add` adds it there.
macro_rules! nibble_product {
    (first, $w:literal, $x:literal, $p:literal) => {
        concat!("vpmaddubsw {", $p, "}, {", $w, "}, {", $x, "}\n")
    };
    (add, $w:literal, $x:literal, $p:literal) => {
        concat!(
            "vpmaddubsw {t}, {",
            $w,
            "}, {",
            $x,
            "}\n",
            "vpaddw {",
            $p,
            "}, {",
            $p,
            "}, {t}\n",
        )
    };
}

/// One 4-byte position `k` of [`nibble_sums_2x2`]: the two tiles' weight
/// registers and the two vectors' broadcasts, four products added to their
/// partial sums (or, with `first`, written as them).
macro_rules! nibble_position {
    ($k:literal, $op:ident) => {
        concat!(
            position_loads!($k; "w0" => "wa", "w1" => "wb"; "x0" => "xa", "x1" => "xb"),
            nibble_product!($op, "wa", "xa", "p00"),
            nibble_product!($op, "wa", "xb", "p01"),
            nibble_product!($op, "wb", "xa", "p10"),
            nibble_product!($op, "wb", "xb", "p11"),
        )
    };
}

/// [`tile_sums`] for two tiles of nibble weights (at most 15, so a block's
/// eight `maddubs` results add up within i16) against two vectors, in
/// assembly: the compiler hoisted the sixteen broadcasts out of the loop's
/// order and spilled registers, which left this innermost loop at half the
/// speed of its loads. Here each position's two weight registers and two
/// broadcasts live just long enough for their four products; ten vector
/// registers in all.
///
/// # Safety
/// As for [`tile_sums`]; AVX2 code only.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibble_sums_2x2(w: [*const __m256i; 2], x: [*const i8; 2]) -> [[__m256i; 2]; 2] {
    let (p00, p01, p10, p11): (__m256i, __m256i, __m256i, __m256i);
    // SAFETY: the caller's pointers hold 8 registers and 32 bytes; the code
    // only reads them and writes its own registers.
    unsafe {
        std::arch::asm!(
            nibble_position!(0, first),
            nibble_position!(1, add),
            nibble_position!(2, add),
            nibble_position!(3, add),
            nibble_position!(4, add),
            nibble_position!(5, add),
            nibble_position!(6, add),
            nibble_position!(7, add),
            // Pairs of i16 lanes into i32 lanes.
            "vpmaddwd {p00}, {p00}, {ones}",
            "vpmaddwd {p01}, {p01}, {ones}",
            "vpmaddwd {p10}, {p10}, {ones}",
            "vpmaddwd {p11}, {p11}, {ones}",
            w0 = in(reg) w[0],
            w1 = in(reg) w[1],
            x0 = in(reg) x[0],
            x1 = in(reg) x[1],
            ones = in(ymm_reg) _mm256_set1_epi16(1),
            p00 = out(ymm_reg) p00,
            p01 = out(ymm_reg) p01,
            p10 = out(ymm_reg) p10,
            p11 = out(ymm_reg) p11,
            wa = out(ymm_reg) _,
            wb = out(ymm_reg) _,
            xa = out(ymm_reg) _,
            xb = out(ymm_reg) _,
            t = out(ymm_reg) _,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    [[p00, p01], [p10, p11]]
}

/// One 4-byte position `k` of [`nibble_sums_2x4`]: two weight registers
/// and four broadcasts, eight products added to their partial sums (or,
/// with `first`, written as them: no zeroing, no add).
macro_rules! nibble_position_2x4 {
    ($k:literal, $op:ident) => {
        concat!(
            position_loads!(
                $k;
                "w0" => "wa", "w1" => "wb";
                "x0" => "xa", "x1" => "xb", "x2" => "xc", "x3" => "xd"
            ),
            nibble_product!($op, "wa", "xa", "p00"),
            nibble_product!($op, "wa", "xb", "p01"),
            nibble_product!($op, "wa", "xc", "p02"),
            nibble_product!($op, "wa", "xd", "p03"),
            nibble_product!($op, "wb", "xa", "p10"),
            nibble_product!($op, "wb", "xb", "p11"),
            nibble_product!($op, "wb", "xc", "p12"),
            nibble_product!($op, "wb", "xd", "p13"),
        )
    };
}

/// [`nibble_sums_2x2`] against four vectors: each weight register and
/// broadcast serves four products and two, where in the 2 × 2 shape the
/// loads and adds left the multipliers idle a third of the time (measured
/// on Zen 3: 1.1 against 1.3 `maddubs` a cycle). Fifteen vector registers.
///
/// # Safety
/// As for [`tile_sums`]; AVX2 code only.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibble_sums_2x4(w: [*const __m256i; 2], x: [*const i8; 4]) -> [[__m256i; 4]; 2] {
    let (p00, p01, p02, p03): (__m256i, __m256i, __m256i, __m256i);
    let (p10, p11, p12, p13): (__m256i, __m256i, __m256i, __m256i);
    // SAFETY: as in `nibble_sums_2x2`.
    unsafe {
        std::arch::asm!(
            nibble_position_2x4!(0, first),
            nibble_position_2x4!(1, add),
            nibble_position_2x4!(2, add),
            nibble_position_2x4!(3, add),
            nibble_position_2x4!(4, add),
            nibble_position_2x4!(5, add),
            nibble_position_2x4!(6, add),
            nibble_position_2x4!(7, add),
            w0 = in(reg) w[0],
            w1 = in(reg) w[1],
            x0 = in(reg) x[0],
            x1 = in(reg) x[1],
            x2 = in(reg) x[2],
            x3 = in(reg) x[3],
            p00 = out(ymm_reg) p00,
            p01 = out(ymm_reg) p01,
            p02 = out(ymm_reg) p02,
            p03 = out(ymm_reg) p03,
            p10 = out(ymm_reg) p10,
            p11 = out(ymm_reg) p11,
            p12 = out(ymm_reg) p12,
            p13 = out(ymm_reg) p13,
            wa = out(ymm_reg) _,
            wb = out(ymm_reg) _,
            xa = out(ymm_reg) _,
            xb = out(ymm_reg) _,
            xc = out(ymm_reg) _,
            xd = out(ymm_reg) _,
            t = out(ymm_reg) _,
            options(pure, readonly, nostack, preserves_flags),
        );
        // Pairs of i16 lanes into i32 lanes.
        let ones = _mm256_set1_epi16(1);
        let pair = |p| _mm256_madd_epi16(p, ones);
        [
            [pair(p00), pair(p01), pair(p02), pair(p03)],
            [pair(p10), pair(p11), pair(p12), pair(p13)],
        ]
    }
}

/// One (tile `$r`, vector `$x`) product of [`signed_position`]: the
/// weights' signs onto the activation bytes, times the magnitudes `$u`,
/// pairs summed into i32 lanes and added to `$s`.
macro_rules! signed_product {
    ($r:literal, $u:literal, $x:literal, $s:literal) => {
        concat!(
            "vpsignb {t}, {",
            $x,
            "}, {",
            $r,
            "}\n",
            "vpmaddubsw {t}, {",
            $u,
            "}, {t}\n",
            "vpmaddwd {t}, {t}, {ones}\n",
            "vpaddd {",
            $s,
            "}, {",
            $s,
            "}, {t}\n",
        )
    };
}

/// One 4-byte position `k` of [`signed_sums_2x2`].
macro_rules! signed_position {
    ($k:literal) => {
        concat!(
            position_loads!($k; "w0" => "ra", "w1" => "rb"; "x0" => "xa", "x1" => "xb"),
            "vpabsb {ua}, {ra}\n",
            "vpabsb {ub}, {rb}\n",
            signed_product!("ra", "ua", "xa", "s00"),
            signed_product!("ra", "ua", "xb", "s01"),
            signed_product!("rb", "ub", "xa", "s10"),
            signed_product!("rb", "ub", "xb", "s11"),
        )
    };
}

/// [`tile_sums`] for two tiles of signed bytes (Q8_0) against two vectors,
/// in assembly for the reason [`nibble_sums_2x2`] gives: `maddubs` takes
/// each weight's magnitude, and its sign moves onto the activation byte.
/// Twelve vector registers.
///
/// # Safety
/// As for [`tile_sums`]; AVX2 code only.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn signed_sums_2x2(w: [*const __m256i; 2], x: [*const i8; 2]) -> [[__m256i; 2]; 2] {
    let (s00, s01, s10, s11): (__m256i, __m256i, __m256i, __m256i);
    // SAFETY: as in `nibble_sums_2x2`.
    unsafe {
        std::arch::asm!(
            "vpxor {s00}, {s00}, {s00}",
            "vpxor {s01}, {s01}, {s01}",
            "vpxor {s10}, {s10}, {s10}",
            "vpxor {s11}, {s11}, {s11}",
            signed_position!(0),
            signed_position!(1),
            signed_position!(2),
            signed_position!(3),
            signed_position!(4),
            signed_position!(5),
            signed_position!(6),
            signed_position!(7),
            w0 = in(reg) w[0],
            w1 = in(reg) w[1],
            x0 = in(reg) x[0],
            x1 = in(reg) x[1],
            ones = in(ymm_reg) _mm256_set1_epi16(1),
            s00 = out(ymm_reg) s00,
            s01 = out(ymm_reg) s01,
            s10 = out(ymm_reg) s10,
            s11 = out(ymm_reg) s11,
            ra = out(ymm_reg) _,
            rb = out(ymm_reg) _,
            ua = out(ymm_reg) _,
            ub = out(ymm_reg) _,
            xa = out(ymm_reg) _,
            xb = out(ymm_reg) _,
            t = out(ymm_reg) _,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    [[s00, s01], [s10, s11]]
}

/// Blocks whose integer sums [`tiles_against`] holds at once (8 KiB at
/// two tiles by four vectors).
const CHUNK: usize = 32;

/// `sums` as the `[R][T]` array it is (the caller checked `A == R` and
/// `B == T`; a mismatch would index out of bounds, never misread).
#[inline(always)]
fn reshaped<const A: usize, const B: usize, const R: usize, const T: usize>(
    sums: [[__m256i; B]; A],
) -> [[__m256i; T]; R] {
    std::array::from_fn(|r| std::array::from_fn(|t| sums[r][t]))
}

/// `R` filled tiles (of one matrix) against `T` vectors: `[r][t][j]` is
/// row j of tile r times vector t, with [`Slots`]' float operations.
///
/// # Safety
/// The vectors must cover the tiles' blocks; AVX2, FMA and F16C only.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // Index loops: see `Tile::fill`.
unsafe fn tiles_against<L: Layout, const R: usize, const T: usize>(
    tiles: [&Tile; R],
    vectors: [&Q8Activations; T],
) -> [[[f32; TILE]; T]; R] {
    let blocks = tiles[0].scales.len();
    for tile in tiles {
        assert!(tile.scales.len() == blocks && tile.weights.len() == 8 * blocks);
        assert!(tile.offsets.len() == blocks);
    }
    for a in vectors {
        assert!(a.q.len() >= 32 * blocks && a.scales.len() >= blocks && a.sums.len() >= blocks);
    }
    let mut dots = [[_mm256_setzero_ps(); T]; R];
    // SAFETY: every index below is within the sizes asserted above.
    unsafe {
        // Integer sums a chunk of blocks at a time, then their float part:
        // with both in one loop, the accumulators of either spilled around
        // the other's registers.
        // Left uninitialized: zeroing 8 KiB per call cost a tenth of a step.
        let mut sums = [const { MaybeUninit::<[[__m256i; T]; R]>::uninit() }; CHUNK];
        for start in (0..blocks).step_by(CHUNK) {
            let chunk = &mut sums[..CHUNK.min(blocks - start)];
            for (i, sums) in (start..).zip(chunk.iter_mut()) {
                let w: [_; R] = std::array::from_fn(|r| tiles[r].weights.as_ptr().add(8 * i));
                let x: [_; T] = std::array::from_fn(|t| vectors[t].q.as_ptr().add(32 * i));
                let computed = if R == 2 && T == 4 && L::HAS_OFFSET && L::I16_TERMS == 8 {
                    reshaped(nibble_sums_2x4([w[0], w[1]], [x[0], x[1], x[2], x[3]]))
                } else if R == 2 && T == 2 && (L::I16_TERMS == 8 || !L::HAS_OFFSET) {
                    reshaped(if L::HAS_OFFSET {
                        nibble_sums_2x2([w[0], w[1]], [x[0], x[1]])
                    } else {
                        signed_sums_2x2([w[0], w[1]], [x[0], x[1]])
                    })
                } else {
                    tile_sums::<L, R, T>(w, x)
                };
                sums.write(computed);
            }
            for (i, sums) in (start..).zip(chunk.iter()) {
                // SAFETY: the loop above wrote every sum of the chunk.
                let sums = sums.assume_init_ref();
                for r in 0..R {
                    let scales = *tiles[r].scales.as_ptr().add(i);
                    for t in 0..T {
                        let x_scale = _mm256_set1_ps(*vectors[t].scales.as_ptr().add(i));
                        let d = _mm256_mul_ps(scales, x_scale);
                        dots[r][t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums[r][t]), dots[r][t]);
                    }
                }
            }
        }
        if L::HAS_OFFSET {
            let mut offsets = [[_mm256_setzero_ps(); T]; R];
            for i in 0..blocks {
                for r in 0..R {
                    let m = *tiles[r].offsets.as_ptr().add(i);
                    for t in 0..T {
                        let sum = _mm256_set1_ps(*vectors[t].sums.as_ptr().add(i));
                        offsets[r][t] = _mm256_fmadd_ps(m, sum, offsets[r][t]);
                    }
                }
            }
            for r in 0..R {
                for t in 0..T {
                    dots[r][t] = _mm256_add_ps(dots[r][t], offsets[r][t]);
                }
            }
        }
    }
    let mut out = [[[0f32; TILE]; T]; R];
    for r in 0..R {
        for t in 0..T {
            // SAFETY: a tile's output holds eight floats.
            unsafe { _mm256_storeu_ps(out[r][t].as_mut_ptr(), dots[r][t]) };
        }
    }
    out
}

/// Every vector of `batch` against `R` tiles holding rows `first..`
/// of `out`'s (the last tile may be partly padding), `T`
/// vectors at a time, prefetching `upcoming` (where the bytes the next
/// tiles are filled from start, and how many) a slice per step: spread over
/// the products, the next rows stream in while these compute, where
/// prefetching them all while filling stalled on the memory system's queue.
fn tiles_into<L: Layout, const R: usize, const T: usize>(
    tiles: [&Tile; R],
    batch: &Q8Batch,
    out: &mut Outputs<'_>,
    first: usize,
    upcoming: (*const u8, usize),
) {
    let vectors = &batch.vectors;
    let steps = vectors.len().div_ceil(T);
    let lines = upcoming.1.div_ceil(64);
    let mut t = 0;
    while t < vectors.len() {
        let step = t / T;
        for line in lines * step / steps..lines * (step + 1) / steps {
            // A prefetch is a hint: it never faults, wherever it points.
            let at = upcoming.0.wrapping_add(64 * line);
            // SAFETY: see above; `_mm_prefetch` needs only SSE, which every
            // x86-64 CPU has.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(at.cast()) };
        }
        if t + T <= vectors.len() {
            let group: [&Q8Activations; T] = std::array::from_fn(|dt| &vectors[t + dt]);
            // SAFETY: these kernels are selected only for `Isa::Avx2`, which
            // the CPU reported: it has AVX2, FMA and F16C; `super::checked`
            // asserted that every vector covers the rows' blocks.
            let ys = unsafe { tiles_against::<L, R, T>(tiles, group) };
            store(&ys, out, t, first);
            t += T;
        } else if T > 2 && t + 2 <= vectors.len() {
            let pair = [&vectors[t], &vectors[t + 1]];
            // SAFETY: as above.
            let ys = unsafe { tiles_against::<L, R, 2>(tiles, pair) };
            store(&ys, out, t, first);
            t += 2;
        } else {
            // SAFETY: as above.
            let ys = unsafe { tiles_against::<L, R, 1>(tiles, [&vectors[t]]) };
            store(&ys, out, t, first);
            t += 1;
        }
    }
}

/// Stores `[r][dt]` (tile r, vector `t + dt`) at rows `first + 8r..`,
/// dropping the padding rows past `out`'s.
fn store<const R: usize, const T: usize>(
    ys: &[[[f32; TILE]; T]; R],
    out: &mut Outputs<'_>,
    t: usize,
    first: usize,
) {
    for (r, tile) in ys.iter().enumerate() {
        let start = first + r * TILE;
        let valid = out.count().saturating_sub(start).min(TILE);
        for (dt, y) in tile.iter().enumerate() {
            out.put(t + dt, start, &y[..valid]);
        }
    }
}

/// A matrix's rows (a task's share of them), in the file's encoding
/// ([`InFile`]) or interleaved eight at a time by the loader ([`Grouped`],
/// [`crate::quant::interleave`]).
pub(super) struct Weights<'a, L, K> {
    pub(super) data: &'a [u8],
    pub(super) row_bytes: usize,
    pub(super) kind: PhantomData<(L, K)>,
}

/// Rows as the file has them.
pub(super) struct InFile;

/// Rows interleaved eight at a time.
pub(super) struct Grouped;

impl<L, K> Weights<'_, L, K> {
    /// Rows of the matrix.
    fn rows(&self) -> usize {
        self.data.len() / self.row_bytes
    }

    /// Where the bytes rows `first..first + rows` are filled from start,
    /// and how many they are, for prefetching: past the last row, this
    /// points at the rows after these (the next task's, in the matrix they
    /// are part of), or at nothing.
    fn ahead(&self, first: usize, rows: usize) -> (*const u8, usize) {
        let at = self.data.as_ptr().wrapping_add(first * self.row_bytes);
        (at, rows * self.row_bytes)
    }
}

/// Filling tiles from weights of one kind.
pub(super) trait Fill {
    /// Fills `tile` with rows `first..first + 8` (the last row repeated past
    /// the end).
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be present.
    unsafe fn fill(&self, tile: &mut Tile, first: usize);
}

impl<L: Layout> Fill for Weights<'_, L, InFile> {
    unsafe fn fill(&self, tile: &mut Tile, first: usize) {
        let (rows, row_bytes, count) = (self.data, self.row_bytes, self.rows());
        let eight =
            std::array::from_fn(|j| &rows[(first + j).min(count - 1) * row_bytes..][..row_bytes]);
        // SAFETY: the caller's CPU has the features.
        unsafe { tile.fill::<L>(eight) }
    }
}

impl<L: Interleaved> Fill for Weights<'_, L, Grouped> {
    unsafe fn fill(&self, tile: &mut Tile, first: usize) {
        let group = &self.data[first * self.row_bytes..(first + TILE) * self.row_bytes];
        // SAFETY: the caller's CPU has the features.
        unsafe { tile.fill_group::<L>(group) }
    }
}

/// Every row of `source` against every vector of `batch` (as [`super::run`]
/// checked): sixteen rows at a time unpacked into two tiles, which every
/// pair of vectors then multiplies (a last group of eight or fewer rows in
/// one padded tile, four vectors at a time).
pub(super) fn run<L: Layout, K>(source: Weights<'_, L, K>, batch: &Q8Batch, out: &mut Outputs<'_>)
where
    for<'a> Weights<'a, L, K>: Fill,
{
    let (count, blocks) = (source.rows(), source.row_bytes / L::BYTES);
    THREAD_TILES.with(|tiles| {
        let [a, b] = &mut *tiles.borrow_mut();
        a.resize(blocks);
        b.resize(blocks);
        for first in (0..count).step_by(2 * TILE) {
            let upcoming = source.ahead(first + 2 * TILE, 2 * TILE);
            // SAFETY: AVX2, FMA and F16C are present: these kernels are
            // selected only for `Isa::Avx2` (see `tiles_into`).
            unsafe { source.fill(a, first) };
            if first + TILE < count {
                // SAFETY: as above.
                unsafe { source.fill(b, first + TILE) };
                if L::HAS_OFFSET && L::I16_TERMS == 8 {
                    tiles_into::<L, 2, 4>([a, b], batch, out, first, upcoming);
                } else {
                    tiles_into::<L, 2, 2>([a, b], batch, out, first, upcoming);
                }
            } else {
                tiles_into::<L, 1, 4>([a], batch, out, first, upcoming);
            }
        }
    });
}
