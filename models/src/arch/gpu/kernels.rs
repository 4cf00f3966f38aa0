//! The CubeCL kernels that multiply by quantized weights on the device.
//!
//! Every weight type is read through one function, [`decode_group`], that
//! decodes eight consecutive values of a row as `scale · q + offset` (eight
//! integers `q` sharing one scale and offset: a quarter of a 32-value block,
//! or an eighth or half of a K-quant's sub-block). The products then
//! accumulate `scale · Σ q·x + offset · Σ x`, two multiplies per eight values
//! beside the eight of the dot product itself.
//!
//! Blocks are read from `u32` words in [`super::layout`]'s repacking of the
//! file's blocks (same bits, each block padded to whole words). Halves are
//! decoded with integer operations, so no device needs `f16` shader support.
//! Reductions across a cube's lanes go through shared memory: plane
//! (subgroup) operations are not offered on every device (not on lavapipe,
//! which CI runs), and the shared-memory tree costs five barriers per cube.

use burn_cubecl::cubecl;
use cubecl::prelude::*;

/// Weight type codes, as the kernels take them (at compile time).
pub(super) mod ty {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const BF16: u32 = 2;
    pub const Q4_0: u32 = 3;
    pub const Q4_1: u32 = 4;
    pub const Q5_0: u32 = 5;
    pub const Q5_1: u32 = 6;
    pub const Q8_0: u32 = 7;
    pub const Q4K: u32 = 8;
    pub const Q5K: u32 = 9;
    pub const Q6K: u32 = 10;
}

/// Lanes that share one row's blocks in [`quantized_matmul`].
pub(super) const LANES: u32 = 32;
/// `log2(LANES)`: the steps of the shared-memory reduction.
const LANE_STEPS: u32 = 5;
/// Values decoded at once by [`decode_group`].
pub(super) const GROUP: u32 = 8;

/// An IEEE half (the low 16 bits of `h`) as f32, by its bits.
#[cube]
pub(super) fn half(h: u32) -> f32 {
    let sign = (h & 0x8000u32) << 16u32;
    let exp = (h >> 10u32) & 0x1Fu32;
    let man = h & 0x3FFu32;
    let normal = f32::reinterpret(sign | ((exp + 112u32) << 23u32) | (man << 13u32));
    let special = f32::reinterpret(sign | 0x7F80_0000u32 | (man << 13u32));
    // Subnormal halves are `man · 2⁻²⁴`.
    let tiny = f32::cast_from(man) * 5.960_464_5e-8f32;
    let subnormal = select(sign != 0u32, -tiny, tiny);
    select(
        exp == 0u32,
        subnormal,
        select(exp == 31u32, special, normal),
    )
}

/// Byte `i` of the words starting at `base`.
#[cube]
fn byte(w: &Tensor<u32>, base: usize, i: usize) -> u32 {
    (w[base + i / 4] >> (8 * (i % 4)) as u32) & 0xFFu32
}

/// Byte `i` of the words starting at `base`, as a signed integer.
#[cube]
fn signed_byte(w: &Tensor<u32>, base: usize, i: usize) -> f32 {
    let word = w[base + i / 4] << (24 - 8 * (i % 4)) as u32;
    f32::cast_from(i32::reinterpret(word) >> 24i32)
}

/// Sub-block `j`'s 6-bit scale and minimum of a Q4_K/Q5_K block whose twelve
/// scale bytes start at word `base`, as `[scale, min]` in `out[8..10]`.
#[cube]
fn k_scale_min(w: &Tensor<u32>, base: usize, j: usize, d: f32, dmin: f32, out: &mut Array<f32>) {
    let sc = if j < 4 {
        byte(w, base, j) & 63u32
    } else {
        (byte(w, base, j + 4) & 0xFu32) | ((byte(w, base, j - 4) >> 6u32) << 4u32)
    };
    let m = if j < 4 {
        byte(w, base, j + 4) & 63u32
    } else {
        (byte(w, base, j + 4) >> 4u32) | ((byte(w, base, j) >> 6u32) << 4u32)
    };
    out[8] = d * f32::cast_from(sc);
    out[9] = -dmin * f32::cast_from(m);
}

/// Decodes values `8g..8g + 8` of the row whose words start at `row`: their
/// integers into `out[0..8]`, their shared scale into `out[8]` and offset
/// into `out[9]` (value = `out[8] · out[j] + out[9]`).
#[cube]
pub(super) fn decode_group(
    w: &Tensor<u32>,
    row: usize,
    g: usize,
    out: &mut Array<f32>,
    #[comptime] kind: u32,
) {
    if comptime![kind == ty::F32] {
        #[unroll]
        for j in 0..8usize {
            out[j] = f32::reinterpret(w[row + 8 * g + j]);
        }
        out[8] = 1.0f32;
        out[9] = 0.0f32;
    } else if comptime![kind == ty::F16 || kind == ty::BF16] {
        #[unroll]
        for j in 0..8usize {
            let bits = (w[row + 4 * g + j / 2] >> (16 * (j % 2)) as u32) & 0xFFFFu32;
            if comptime![kind == ty::F16] {
                out[j] = half(bits);
            } else {
                out[j] = f32::reinterpret(bits << 16u32);
            }
        }
        out[8] = 1.0f32;
        out[9] = 0.0f32;
    } else if comptime![kind == ty::Q4_0 || kind == ty::Q4_1] {
        // Words: the half scale (and Q4_1's half minimum above it), then 16
        // bytes of nibbles: value i in the low nibble of byte i (i < 16), the
        // high nibble of byte i - 16 after.
        let base = row + 5 * (g / 4);
        let e = 8 * (g % 4);
        let shift = (4 * (e / 16)) as u32;
        #[unroll]
        for j in 0..8usize {
            out[j] = f32::cast_from((byte(w, base + 1, e % 16 + j) >> shift) & 0xFu32);
        }
        let d = half(w[base] & 0xFFFFu32);
        out[8] = d;
        if comptime![kind == ty::Q4_0] {
            out[9] = -8.0f32 * d;
        } else {
            out[9] = half(w[base] >> 16u32);
        }
    } else if comptime![kind == ty::Q5_0 || kind == ty::Q5_1] {
        // As Q4_0/Q4_1 with a word of fifth bits after the header.
        let base = row + 6 * (g / 4);
        let e = 8 * (g % 4);
        let shift = (4 * (e / 16)) as u32;
        let high = w[base + 1];
        #[unroll]
        for j in 0..8usize {
            let low = (byte(w, base + 2, e % 16 + j) >> shift) & 0xFu32;
            let fifth = ((high >> (e + j) as u32) & 1u32) << 4u32;
            out[j] = f32::cast_from(low | fifth);
        }
        let d = half(w[base] & 0xFFFFu32);
        out[8] = d;
        if comptime![kind == ty::Q5_0] {
            out[9] = -16.0f32 * d;
        } else {
            out[9] = half(w[base] >> 16u32);
        }
    } else if comptime![kind == ty::Q8_0] {
        let base = row + 9 * (g / 4);
        let e = 8 * (g % 4);
        #[unroll]
        for j in 0..8usize {
            out[j] = signed_byte(w, base + 1, e + j);
        }
        out[8] = half(w[base] & 0xFFFFu32);
        out[9] = 0.0f32;
    } else if comptime![kind == ty::Q4K || kind == ty::Q5K] {
        // Words: halves d and dmin, 12 bytes of 6-bit scales and minimums
        // for the eight 32-value sub-blocks, (Q5_K: 32 bytes of fifth bits,)
        // then 128 bytes of nibbles: each 64 values are 32 bytes' low
        // nibbles then their high nibbles.
        let words = comptime![if kind == ty::Q4K { 36usize } else { 44usize }];
        let base = row + words * (g / 32);
        let e = 8 * (g % 32);
        let (c, within) = (e / 64, e % 64);
        let shift = (4 * (within / 32)) as u32;
        let nibbles = comptime![if kind == ty::Q4K { 4usize } else { 12usize }];
        #[unroll]
        for j in 0..8usize {
            let l = within % 32 + j;
            let low = (byte(w, base + nibbles, 32 * c + l) >> shift) & 0xFu32;
            if comptime![kind == ty::Q4K] {
                out[j] = f32::cast_from(low);
            } else {
                let bit = (byte(w, base + 4, l) >> (2 * c + within / 32) as u32) & 1u32;
                out[j] = f32::cast_from(low | (bit << 4u32));
            }
        }
        let d = half(w[base] & 0xFFFFu32);
        let dmin = half(w[base] >> 16u32);
        k_scale_min(w, base + 1, e / 32, d, dmin, out);
    } else {
        // Q6_K, 53 words: 128 bytes of low nibbles, 64 of 2-bit highs, 16
        // signed 8-bit scales (one per 16 values), the half d, 2 bytes of
        // padding. Each 128 values are four runs of 32: nibbles of bytes
        // l and l + 32 (low, then high), highs at bit pairs of byte l.
        let base = row + 53 * (g / 32);
        let e = 8 * (g % 32);
        let (n, r) = (e / 128, e % 128);
        let (quarter, l0) = (r / 32, r % 32);
        let shift = (4 * (quarter / 2)) as u32;
        let high_shift = (2 * quarter) as u32;
        #[unroll]
        for j in 0..8usize {
            let l = l0 + j;
            let low = (byte(w, base, 64 * n + l + 32 * (quarter % 2)) >> shift) & 0xFu32;
            let high = (byte(w, base + 32, 32 * n + l) >> high_shift) & 3u32;
            out[j] = f32::cast_from(low | (high << 4u32));
        }
        let d = half(w[base + 52] & 0xFFFFu32);
        let scale = d * signed_byte(w, base + 48, 8 * n + l0 / 16 + 2 * quarter);
        out[8] = scale;
        out[9] = -32.0f32 * scale;
    }
}

/// `out[t, r] = Σ_k x[t, k] · W[r, k]` for up to `tokens` rows of `x` per
/// cube (cubes over rows along x and y, over tokens along z): a cube's `LANES × rows_per_cube` units each take one row and every
/// `LANES`-th group of eight of its values, decode the group once and use it
/// for all the cube's tokens, so weights are read once per `tokens` rows of
/// activations. Partial sums meet in shared memory.
#[cube(launch)]
pub(super) fn quantized_matmul(
    w: &Tensor<u32>,
    x: &Tensor<f32>,
    out: &mut Tensor<f32>,
    rows: u32,
    cols: u32,
    n: u32,
    row_words: u32,
    #[comptime] kind: u32,
    #[comptime] tokens: usize,
    #[comptime] rows_per_cube: usize,
) {
    let lane = UNIT_POS_X as usize;
    let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let row = cube * (rows_per_cube as u32) + UNIT_POS_Y;
    let first = CUBE_POS_Z as usize * tokens;
    let mut acc = Array::<f32>::new(tokens);
    #[unroll]
    for t in 0..tokens {
        acc[t] = 0.0f32;
    }
    let mut q = Array::<f32>::new(10usize);
    if row < rows {
        let start = row as usize * row_words as usize;
        let groups = (cols / GROUP) as usize;
        let mut g = lane;
        while g < groups {
            decode_group(w, start, g, &mut q, kind);
            #[unroll]
            for t in 0..tokens {
                let tok = first + t;
                if tok < n as usize {
                    let xo = tok * x.stride(0) + g * 8;
                    let mut dot = 0.0f32;
                    let mut sum = 0.0f32;
                    #[unroll]
                    for j in 0..8usize {
                        let v = x[xo + j];
                        dot += q[j] * v;
                        sum += v;
                    }
                    acc[t] += q[8] * dot + q[9] * sum;
                }
            }
            g += LANES as usize;
        }
    }
    let lanes = LANES as usize;
    let mut shared = Shared::<[f32]>::new_slice(comptime![tokens * rows_per_cube * LANES as usize]);
    let slot = UNIT_POS_Y as usize * tokens * lanes;
    #[unroll]
    for t in 0..tokens {
        shared[slot + t * lanes + lane] = acc[t];
    }
    sync_cube();
    #[unroll]
    for step in 0..LANE_STEPS {
        let stride = (LANES >> (step + 1)) as usize;
        if lane < stride {
            #[unroll]
            for t in 0..tokens {
                let i = slot + t * lanes + lane;
                shared[i] += shared[i + stride];
            }
        }
        sync_cube();
    }
    let out_stride = out.stride(0);
    if lane == 0 && row < rows {
        #[unroll]
        for t in 0..tokens {
            let tok = first + t;
            if tok < n as usize {
                out[tok * out_stride + row as usize] = shared[slot + t * lanes];
            }
        }
    }
}

/// Rows `first..first + rows` of `W` as dense f32 (`out` is `[rows, cols]`):
/// one unit per group of eight values.
#[cube(launch)]
pub(super) fn dequantize(
    w: &Tensor<u32>,
    out: &mut Tensor<f32>,
    first: u32,
    rows: u32,
    cols: u32,
    row_words: u32,
    #[comptime] kind: u32,
) {
    let unit = ((CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X) as usize;
    let groups = (cols / GROUP) as usize;
    let (r, g) = (unit / groups, unit % groups);
    if r < rows as usize {
        let mut q = Array::<f32>::new(10usize);
        let start = (first as usize + r) * row_words as usize;
        decode_group(w, start, g, &mut q, kind);
        let out_stride = out.stride(0);
        let o = r * out_stride + g * 8;
        #[unroll]
        for j in 0..8usize {
            out[o + j] = q[8] * q[j] + q[9];
        }
    }
}
