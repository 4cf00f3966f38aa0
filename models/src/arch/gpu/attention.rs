//! Decode attention on the device, flash-decoding style: one query token
//! per sequence against its cached keys and values, in two CubeCL kernels
//! run as one custom operation.
//!
//! [`attend_split`] gives each cube one key/value head and one split of up
//! to [`SPLIT`] cached positions. It reads each cached key and value once for
//! all the query heads that share it (grouped-query attention), and leaves
//! per split and query head the running maximum, the sum of exponentials and
//! the weighted sum of values. [`combine`] rescales the splits to a common
//! maximum and divides. A long context is spread over many cubes (the
//! "split-K" of flash-decoding) instead of one cube walking every position,
//! and the scores never leave shared memory.

use burn_cubecl::cubecl;
use cubecl::prelude::*;

use super::kernels::half;

/// Cached positions one cube of [`attend_split`] covers (one per unit).
pub(super) const SPLIT: u32 = 64;
/// The most query heads per key/value head [`attend_split`] takes: its
/// first `group` units finish the group's statistics, and its scores take
/// `group · SPLIT` floats of shared memory (8 KiB at 32).
pub(super) const MAX_GROUP: usize = 32;
/// Units of a [`combine`] cube, striding over a head's dimensions.
pub(super) const COMBINE_UNITS: u32 = 64;
/// A score no real one is below (WGSL has no literal infinity).
const LOWEST: f32 = -3.0e38;

/// Per key/value head `CUBE_POS_X` and split `CUBE_POS_Y`: the statistics
/// and weighted values of the group's queries over that split's positions.
/// `q` is `[heads · head_dim]`, the caches `[kv_heads, allocated,
/// head_dim / 2]` words of two f16 values each, `partial` `[kv_heads,
/// splits, group, head_dim + 2]` (maximum, sum, values).
#[cube(launch)]
pub(super) fn attend_split(
    q: &Tensor<f32>,
    keys: &Tensor<u32>,
    values: &Tensor<u32>,
    partial: &mut Tensor<f32>,
    first: u32,
    len: u32,
    scale: f32,
    softcap: f32,
    #[comptime] group: usize,
    #[comptime] head_dim: usize,
    #[comptime] capped: bool,
) {
    let split = SPLIT as usize;
    let h = CUBE_POS_X as usize;
    let s = CUBE_POS_Y as usize;
    let splits = CUBE_COUNT_Y as usize;
    let t = UNIT_POS_X as usize;
    let start = s * split;
    let left = len as usize - start;
    let count = if left < split { left } else { split };
    let (ks_h, ks_p) = (keys.stride(0), keys.stride(1));
    let (vs_h, vs_p) = (values.stride(0), values.stride(1));

    let mut scores = Shared::<[f32]>::new_slice(comptime![group * SPLIT as usize]);
    let mut stats = Shared::<[f32]>::new_slice(comptime![group]);

    // Scores: unit t takes position start + t, reading its key once for the
    // whole group.
    let mut acc = Array::<f32>::new(group);
    #[unroll]
    for g in 0..group {
        acc[g] = 0.0f32;
    }
    if t < count {
        let key = h * ks_h + (first as usize + start + t) * ks_p;
        for d in 0..head_dim {
            let k = value_at(keys, key, d);
            #[unroll]
            for g in 0..group {
                acc[g] += q[(h * group + g) * head_dim + d] * k;
            }
        }
    }
    #[unroll]
    for g in 0..group {
        let mut score = acc[g] * scale;
        if comptime![capped] {
            score = softcap * (score / softcap).tanh();
        }
        scores[g * split + t] = select(t < count, score, LOWEST);
    }
    sync_cube();
    // Each query's maximum over the split, then its probabilities.
    if t < group {
        let mut most = f32::new(LOWEST);
        for i in 0..split {
            let v = scores[t * split + i];
            if v > most {
                most = v;
            }
        }
        stats[t] = most;
    }
    sync_cube();
    #[unroll]
    for g in 0..group {
        let p = (scores[g * split + t] - stats[g]).exp();
        scores[g * split + t] = select(t < count, p, 0.0f32);
    }
    sync_cube();
    let base = (h * splits + s) * group * (head_dim + 2);
    if t < group {
        let mut sum = 0.0f32;
        for i in 0..split {
            sum += scores[t * split + i];
        }
        partial[base + t * (head_dim + 2)] = stats[t];
        partial[base + t * (head_dim + 2) + 1] = sum;
    }
    // Weighted values: unit t takes dimensions t, t + 64, ..., reading each
    // value once for the whole group.
    let mut d = t;
    while d < head_dim {
        #[unroll]
        for g in 0..group {
            acc[g] = 0.0f32;
        }
        for i in 0..count {
            let v = value_at(values, h * vs_h + (first as usize + start + i) * vs_p, d);
            #[unroll]
            for g in 0..group {
                acc[g] += scores[g * split + i] * v;
            }
        }
        #[unroll]
        for g in 0..group {
            partial[base + g * (head_dim + 2) + 2 + d] = acc[g];
        }
        d += split;
    }
}

/// Value `d` of the f16 pairs starting at word `base`.
#[cube]
fn value_at(words: &Tensor<u32>, base: usize, d: usize) -> f32 {
    half((words[base + d / 2] >> (16 * (d % 2)) as u32) & 0xFFFFu32)
}

/// Each of `x` rounded to the nearest f16 (ties to even, saturating at
/// ±65504 as the CPU cache does), as f16 bits, two to a word of `out`.
#[cube(launch)]
pub(super) fn pack_halves(x: &Tensor<f32>, out: &mut Tensor<u32>, words: u32) {
    let w = unit_index();
    if w < words as usize {
        out[w] = half_bits(x[2 * w]) | (half_bits(x[2 * w + 1]) << 16u32);
    }
}

/// This unit's index in a grid of 1-D cubes wrapped from x to y.
#[cube]
fn unit_index() -> usize {
    ((CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X) as usize
}

/// `x` rounded to the nearest f16, ties to even, in integer operations (so
/// no device's float shortcuts change it): saturating at the largest finite
/// half, NaN kept NaN.
#[cube]
fn half_bits(x: f32) -> u32 {
    let bits = u32::reinterpret(x);
    let sign = (bits >> 16u32) & 0x8000u32;
    let a = bits & 0x7FFF_FFFFu32;
    let exp = a >> 23u32;
    // Normal halves (f32 exponents 113..=142): drop 13 mantissa bits,
    // rounding to even; a carry rolls into the exponent, as it should.
    let normal = (a - 0x3800_0000u32 + 0x0FFFu32 + ((a >> 13u32) & 1u32)) >> 13u32;
    // Subnormal halves count 2⁻²⁴ units: shift the full mantissa down by
    // 126 - exp (14..=24 for exponents 102..=112), rounding to even.
    let mant = (a & 0x007F_FFFFu32) | 0x0080_0000u32;
    let shift = select(exp < 126u32, 126u32 - exp, 31u32);
    let shift = select(shift > 31u32, 31u32, shift);
    let down = mant >> shift;
    let rest = mant & ((1u32 << shift) - 1u32);
    let halfway = 1u32 << (shift - 1u32);
    let up = select(
        rest > halfway || (rest == halfway && (down & 1u32) == 1u32),
        1u32,
        0u32,
    );
    let subnormal = select(exp >= 102u32, down + up, 0u32);
    let magnitude = select(exp >= 113u32, normal, subnormal);
    // At or past the largest finite half (65504): saturate; NaN stays NaN.
    let saturated = select(a > 0x7F80_0000u32, 0x7E00u32, 0x7BFFu32);
    sign | select(a >= 0x477F_E000u32, saturated, magnitude)
}

/// `words` (f16 pairs) back to f32 values, two per word, into `out`.
#[cube(launch)]
pub(super) fn unpack_halves(words: &Tensor<u32>, out: &mut Tensor<f32>, count: u32) {
    let w = unit_index();
    if w < count as usize {
        let word = words[w];
        out[2 * w] = half(word & 0xFFFFu32);
        out[2 * w + 1] = half(word >> 16u32);
    }
}

/// Query head `CUBE_POS_X`, its dimensions strided over the cube's units:
/// the splits of [`attend_split`] rescaled to one maximum and normalized
/// into `out` (`[heads · head_dim]`).
#[cube(launch)]
pub(super) fn combine(
    partial: &Tensor<f32>,
    out: &mut Tensor<f32>,
    splits: u32,
    #[comptime] group: usize,
    #[comptime] head_dim: usize,
) {
    let head = CUBE_POS_X as usize;
    let (h, g) = (head / group, head % group);
    let row = head_dim + 2;
    let first = (h * splits as usize * group + g) * row;
    let step = group * row;
    let mut most = f32::new(LOWEST);
    for s in 0..splits as usize {
        let m = partial[first + s * step];
        if m > most {
            most = m;
        }
    }
    let mut den = 0.0f32;
    for s in 0..splits as usize {
        let at = first + s * step;
        den += (partial[at] - most).exp() * partial[at + 1];
    }
    let mut d = UNIT_POS_X as usize;
    while d < head_dim {
        let mut num = 0.0f32;
        for s in 0..splits as usize {
            let at = first + s * step;
            num += (partial[at] - most).exp() * partial[at + 2 + d];
        }
        out[head * head_dim + d] = num / den;
        d += CUBE_DIM_X as usize;
    }
}
