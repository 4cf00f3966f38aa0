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

    let mut scores = Shared::<[f32]>::new_slice(comptime![group * 64usize]);
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

/// Each of `x` (f32 values that are exactly f16 values: rounded, finite) as
/// f16 bits, two to a word of `out`.
#[cube(launch)]
pub(super) fn pack_halves(x: &Tensor<f32>, out: &mut Tensor<u32>, words: u32) {
    let w = ABSOLUTE_POS;
    if w < words as usize {
        out[w] = half_bits(x[2 * w]) | (half_bits(x[2 * w + 1]) << 16u32);
    }
}

/// An f32 that is exactly an f16 value, as that value's bits.
#[cube]
fn half_bits(x: f32) -> u32 {
    let bits = u32::reinterpret(x);
    let sign = (bits >> 16u32) & 0x8000u32;
    let exp = (bits >> 23u32) & 0xFFu32;
    // Normal halves have exponents 113..=142 as f32; smaller magnitudes are
    // subnormal halves, `m · 2⁻²⁴` with `m` below 1024 (or zero).
    let normal = sign | ((exp - 112u32) << 10u32) | ((bits >> 13u32) & 0x3FFu32);
    let tiny = sign | u32::cast_from(x.abs() * 16_777_216.0f32);
    select(exp >= 113u32, normal, tiny)
}

/// `words` (f16 pairs) back to f32 values, two per word, into `out`.
#[cube(launch)]
pub(super) fn unpack_halves(words: &Tensor<u32>, out: &mut Tensor<f32>, count: u32) {
    let w = ABSOLUTE_POS;
    if w < count as usize {
        let word = words[w];
        out[2 * w] = half(word & 0xFFFFu32);
        out[2 * w + 1] = half(word >> 16u32);
    }
}

/// Query head `CUBE_POS_X`, dimension `UNIT_POS_X`: the splits of
/// [`attend_split`] rescaled to one maximum and normalized into `out`
/// (`[heads · head_dim]`).
#[cube(launch)]
pub(super) fn combine(
    partial: &Tensor<f32>,
    out: &mut Tensor<f32>,
    splits: u32,
    #[comptime] group: usize,
    #[comptime] head_dim: usize,
) {
    let head = CUBE_POS_X as usize;
    let d = UNIT_POS_X as usize;
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
    let mut num = 0.0f32;
    let mut den = 0.0f32;
    for s in 0..splits as usize {
        let at = first + s * step;
        let w = (partial[at] - most).exp();
        num += w * partial[at + 2 + d];
        den += w * partial[at + 1];
    }
    out[head * head_dim + d] = num / den;
}
