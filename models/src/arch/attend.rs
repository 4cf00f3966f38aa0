//! Attention on the CPU: the key/value caches the fused pass keeps (as f16,
//! like llama.cpp's default cache) and grouped-query attention over them,
//! spread over the spinning pool by token and key/value head.
//!
//! In batched decode the caches are the largest thing a step reads (sixteen
//! sequences of a few hundred tokens hold more bytes than the weights), so
//! storing them at half width halves what attention waits for; the kernels
//! read them as f16 and widen them in registers.

use std::cell::RefCell;

use half::f16;

use super::config::ModelConfig;
use super::exp::exp;
use super::pool::SpinPool;

/// The largest finite f16; cached values saturate there instead of becoming infinite.
pub(crate) const HALF_MAX: f32 = 65504.0;

/// `2^13 + 1`: multiplying by it and subtracting twice keeps the 11
/// significant bits an f16 has (Veltkamp's split of a 24-bit significand).
pub(crate) const HALF_SPLIT: f32 = 8193.0;

/// The smallest normal f16; below it f16 values are multiples of 2^-24.
pub(crate) const HALF_MIN_NORMAL: f32 = 6.103_515_6e-5;

/// Added and subtracted, rounds a value below [`HALF_MIN_NORMAL`] to a
/// multiple of 2^-24 (the sum lies in `[0.5, 1)`, where f32's step is 2^-24).
pub(crate) const HALF_SUBNORMAL_SHIFT: f32 = 0.75;

/// `x` rounded to the nearest f16 value (kept as f32), saturating at
/// ±[`HALF_MAX`]: an exact f16, so storing it as one only repacks it.
/// Computed with f32 operations that the Burn graph performs as tensor
/// operations too, so on the CPU both passes cache identical keys and values.
pub(crate) fn round_to_half(x: f32) -> f32 {
    let x = x.clamp(-HALF_MAX, HALF_MAX);
    if x.abs() < HALF_MIN_NORMAL {
        return (x + HALF_SUBNORMAL_SHIFT) - HALF_SUBNORMAL_SHIFT;
    }
    let t = x * HALF_SPLIT;
    t - (t - x)
}

/// One layer's cached keys and values as f16, token-major: position `p`'s
/// keys are `keys[p * width..(p + 1) * width]`, all key/value heads side by side.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostKv {
    pub(crate) keys: Vec<f16>,
    pub(crate) values: Vec<f16>,
}

impl HostKv {
    /// Room for `tokens` positions of `width` values.
    pub(crate) fn with_capacity(tokens: usize, width: usize) -> Self {
        HostKv {
            keys: Vec::with_capacity(tokens * width),
            values: Vec::with_capacity(tokens * width),
        }
    }

    /// The first `len` values of each, in buffers of exactly that size.
    pub(crate) fn prefix(&self, len: usize) -> Self {
        HostKv {
            keys: self.keys[..len].to_vec(),
            values: self.values[..len].to_vec(),
        }
    }

    /// Keeps the first `len` values of each.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.keys.truncate(len);
        self.values.truncate(len);
    }

    /// Makes room for `total` values in each, growing geometrically up to `most`.
    pub(crate) fn reserve(&mut self, total: usize, most: usize) {
        for buffer in [&mut self.keys, &mut self.values] {
            if total > buffer.capacity() {
                let grown = total.max(buffer.capacity() * 2).min(most.max(total));
                buffer.reserve_exact(grown - buffer.len());
            }
        }
    }

    /// Appends positions' keys and values, each rounded by [`round_to_half`].
    pub(crate) fn append(&mut self, keys: &[f32], values: &[f32]) {
        narrow(keys, &mut self.keys);
        narrow(values, &mut self.values);
    }
}

/// Appends `xs` rounded by [`round_to_half`] to `out`.
fn narrow(xs: &[f32], out: &mut Vec<f16>) {
    out.reserve(xs.len());
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
        let start = out.len();
        // SAFETY: the CPU has AVX2 and F16C; `xs.len()` values were reserved
        // after `start`, and every one of them is written before `set_len`.
        unsafe {
            avx2::narrow(xs, out.as_mut_ptr().add(start));
            out.set_len(start + xs.len());
        }
        return;
    }
    out.extend(xs.iter().map(|&x| f16::from_f32(round_to_half(x))));
}

thread_local! {
    /// The scores of the head being computed on this thread.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Causal (optionally windowed) grouped-query attention of every token's
/// query heads (`q`, `[n, heads, head_dim]`) over its run's cached keys and
/// values, which already hold the tokens themselves; writes `out` like `q`.
pub(crate) fn attention(
    c: &ModelConfig,
    q: &[f32],
    caches: &[&HostKv],
    tokens: &[(usize, usize)],
    window: Option<usize>,
    out: &mut [f32],
) {
    let (heads, hd) = (c.n_head, c.head_dim);
    let (group, kv_dim) = (c.n_head / c.n_head_kv, c.n_head_kv * c.head_dim);
    // One task per (token, key/value head): piece `task` of `out` is the
    // outputs of the query heads sharing that key/value head, which read its
    // cached keys and values one after another, from this core's cache.
    SpinPool::global().run_chunks(out, group * hd, &|task, out| {
        let (row, kv_head) = (task / c.n_head_kv, task % c.n_head_kv);
        let (r, pos) = tokens[row];
        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let cache = caches[r];
        let span = first * kv_dim..(pos + 1) * kv_dim;
        SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            for (j, out) in out.chunks_exact_mut(hd).enumerate() {
                let h = kv_head * group + j;
                let head = Head {
                    query: &q[(row * heads + h) * hd..][..hd],
                    keys: &cache.keys[span.clone()],
                    values: &cache.values[span.clone()],
                    width: kv_dim,
                    offset: kv_head * hd,
                    scale: c.query_scale,
                };
                attend_head(head, &mut scores, out);
            }
        });
    });
}

/// One query head and the cached keys and values it attends over.
#[derive(Clone, Copy)]
struct Head<'a> {
    query: &'a [f32],
    /// Whole positions of `width` values; this head's are at `offset`.
    keys: &'a [f16],
    values: &'a [f16],
    width: usize,
    offset: usize,
    /// Multiplies the scores before the softmax.
    scale: f32,
}

/// The softmax-weighted sum of `head`'s values, into `out`.
fn attend_head(head: Head<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    let hd = head.query.len();
    assert!(
        head.offset + hd <= head.width
            && head.keys.len() == head.values.len()
            && head.keys.len().is_multiple_of(head.width)
            && out.len() == hd
    );
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(64)
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU has AVX2, FMA and F16C; the head is whole 64-value
        // chunks inside each position, and keys and values are whole
        // positions (asserted above).
        unsafe { avx2::attend_head(head, scores, out) };
        return;
    }
    attend_head_body(head, scores, out);
}

/// [`attend_head`] in portable code.
fn attend_head_body(head: Head<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    let Head {
        query,
        keys,
        values,
        width,
        offset,
        scale,
    } = head;
    let hd = query.len();
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for key in keys.chunks_exact(width) {
        let score = dot(query, &key[offset..offset + hd]) * scale;
        max = max.max(score);
        scores.push(score);
    }
    let total = exponentiate(scores, max);
    out.fill(0.0);
    for (value, &weight) in values.chunks_exact(width).zip(scores.iter()) {
        for (o, v) in out.iter_mut().zip(&value[offset..offset + hd]) {
            *o += weight * v.to_f32();
        }
    }
    let inv = total.recip();
    out.iter_mut().for_each(|o| *o *= inv);
}

/// `a · b` with eight partial sums (so it vectorizes).
fn dot(a: &[f32], b: &[f16]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y.to_f32())
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `exp(score - max)` for each score, in place; returns their sum.
fn exponentiate(scores: &mut [f32], max: f32) -> f32 {
    let mut total = 0.0;
    for score in scores.iter_mut() {
        *score = exp(*score - max);
        total += *score;
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::super::exp::avx2::exp;
    use super::{HALF_MAX, HALF_MIN_NORMAL, HALF_SPLIT, HALF_SUBNORMAL_SHIFT};
    use crate::quant::x86::hsum;

    /// Positions ahead that [`attend_head`] prefetches: a head is a few cache
    /// lines out of each position's wider row, a stride the hardware
    /// prefetcher follows too late.
    const AHEAD: usize = 8;

    /// [`super::narrow`] with F16C: the same f32 operations eight at a time
    /// (the rounded values are exact f16s, so the conversion only repacks).
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C; `out` must have room for `xs.len()` values.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn narrow(xs: &[f32], out: *mut f16) {
        let (lo, hi) = (_mm256_set1_ps(-HALF_MAX), _mm256_set1_ps(HALF_MAX));
        let split = _mm256_set1_ps(HALF_SPLIT);
        let (shift, min_normal) = (
            _mm256_set1_ps(HALF_SUBNORMAL_SHIFT),
            _mm256_set1_ps(HALF_MIN_NORMAL),
        );
        let mut chunks = xs.chunks_exact(8);
        let mut written = 0;
        for chunk in &mut chunks {
            // SAFETY: `chunk` holds 8 values; `out` has room (the contract).
            unsafe {
                // NaN passes through: max/min return their second operand for it.
                let x = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_loadu_ps(chunk.as_ptr())));
                let t = _mm256_mul_ps(x, split);
                let normal = _mm256_sub_ps(t, _mm256_sub_ps(t, x));
                let subnormal = _mm256_sub_ps(_mm256_add_ps(x, shift), shift);
                let magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
                let small = _mm256_cmp_ps::<_CMP_LT_OQ>(magnitude, min_normal);
                let rounded = _mm256_blendv_ps(normal, subnormal, small);
                let packed = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(rounded);
                _mm_storeu_si128(out.add(written).cast(), packed);
            }
            written += 8;
        }
        for &x in chunks.remainder() {
            // SAFETY: as above.
            unsafe {
                out.add(written)
                    .write(f16::from_f32(super::round_to_half(x)))
            };
            written += 1;
        }
    }

    /// Eight cached values at `p`, as f32.
    ///
    /// # Safety
    /// `p..p + 8` must be readable; only call from code with F16C enabled.
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }

    /// Prefetches the `len` values at `at` of `data`, if they lie within it.
    #[inline(always)]
    fn prefetch(data: &[f16], at: usize, len: usize) {
        if at + len <= data.len() {
            for line in (0..len).step_by(32) {
                // SAFETY: inside `data` (checked); prefetches never fault anyway.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().add(at + line).cast()) };
            }
        }
    }

    /// [`super::attend_head`] for heads of whole 64-value chunks, reading the
    /// f16 cache directly: scores eight positions at a time (one FMA chain
    /// each, reduced together), exponentials eight at a time, values
    /// accumulated in eight registers per chunk; [`AHEAD`] positions are
    /// prefetched.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `query.len()` is a multiple of
    /// 64, `offset + query.len() <= width`, `keys` and `values` are equally
    /// long, whole positions of `width` values; `out` is as long as `query`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend_head(
        head: super::Head<'_>,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let super::Head {
            query,
            keys,
            values,
            width,
            offset,
            scale,
        } = head;
        let hd = query.len();
        let positions = keys.len() / width;
        scores.clear();
        scores.resize(positions, 0.0);
        let q = query.as_ptr();
        // Position p's key starts at `k.add(p * width)`.
        let k = keys[offset..].as_ptr();
        let eights = positions / 8 * 8;
        let mut max8 = _mm256_set1_ps(f32::NEG_INFINITY);
        for p in (0..eights).step_by(8) {
            for j in 0..8 {
                prefetch(keys, (p + AHEAD + j) * width + offset, hd);
            }
            // SAFETY: positions p..p + 8 lie within `keys`; `scores` holds
            // `positions` values.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 8];
                for i in (0..hd).step_by(8) {
                    let qv = _mm256_loadu_ps(q.add(i));
                    for (j, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(qv, load8(k.add((p + j) * width + i)), *acc);
                    }
                }
                let s = _mm256_mul_ps(sums8(acc), _mm256_set1_ps(scale));
                _mm256_storeu_ps(scores.as_mut_ptr().add(p), s);
                max8 = _mm256_max_ps(max8, s);
            }
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds eight floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), max8) };
        let mut max = lanes.into_iter().fold(f32::NEG_INFINITY, f32::max);
        for (p, score) in scores.iter_mut().enumerate().skip(eights) {
            // SAFETY: position p's key lies within `keys` (see the contract).
            unsafe {
                let key = k.add(p * width);
                let mut a = _mm256_setzero_ps();
                for i in (0..hd).step_by(8) {
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i)), load8(key.add(i)), a);
                }
                *score = hsum(a) * scale;
            }
            max = max.max(*score);
        }
        // SAFETY: AVX2 and FMA are enabled here.
        let inv = unsafe { exponentiate(scores, max) }.recip();
        for chunk in (0..hd).step_by(64) {
            // SAFETY: as above, for the values; `out` holds `hd` values.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (p, &weight) in scores.iter().enumerate() {
                    prefetch(values, (p + AHEAD) * width + offset + chunk, 64);
                    let w = _mm256_set1_ps(weight);
                    let v = values.as_ptr().add(p * width + offset + chunk);
                    for (j, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(w, load8(v.add(8 * j)), *acc);
                    }
                }
                let scale = _mm256_set1_ps(inv);
                let o = out.as_mut_ptr().add(chunk);
                for (j, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(o.add(8 * j), _mm256_mul_ps(*a, scale));
                }
            }
        }
    }

    /// The lane sums of eight vectors, as one vector (`[Σa₀, …, Σa₇]`).
    ///
    /// # Safety
    /// Only call from code compiled with AVX enabled.
    #[inline(always)]
    unsafe fn sums8(a: [__m256; 8]) -> __m256 {
        // SAFETY: only called from AVX2 code (the contract).
        unsafe {
            let pairs = [
                _mm256_hadd_ps(a[0], a[1]),
                _mm256_hadd_ps(a[2], a[3]),
                _mm256_hadd_ps(a[4], a[5]),
                _mm256_hadd_ps(a[6], a[7]),
            ];
            // Lanes 0-3: a₀..a₃'s (then a₄..a₇'s) low-half sums; 4-7: high halves.
            let low = _mm256_hadd_ps(pairs[0], pairs[1]);
            let high = _mm256_hadd_ps(pairs[2], pairs[3]);
            _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(low, high),
                _mm256_permute2f128_ps::<0x31>(low, high),
            )
        }
    }

    /// [`super::exponentiate`] eight scores at a time (the same exponential).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exponentiate(scores: &mut [f32], max: f32) -> f32 {
        let eights = scores.len() / 8 * 8;
        let (m, mut total) = (_mm256_set1_ps(max), _mm256_setzero_ps());
        for p in (0..eights).step_by(8) {
            // SAFETY: p + 8 <= scores.len().
            unsafe {
                let at = scores.as_mut_ptr().add(p);
                let e = exp(_mm256_sub_ps(_mm256_loadu_ps(at), m));
                _mm256_storeu_ps(at, e);
                total = _mm256_add_ps(total, e);
            }
        }
        // SAFETY: AVX is enabled here.
        let sum = unsafe { hsum(total) };
        sum + super::exponentiate(&mut scores[eights..], max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        crate::quant::test_noise(n, seed)
            .iter()
            .map(|&b| b as f32 / 128.0 - 1.0)
            .collect()
    }

    #[test]
    fn a_cache_grows_geometrically_within_its_bound() {
        let mut kv = HostKv::with_capacity(4, 8);
        kv.append(&[1.0; 32], &[2.0; 32]);
        kv.reserve(40, 1000);
        assert!(kv.keys.capacity() >= 64 && kv.values.capacity() >= 64);
        kv.reserve(900, 950);
        assert!(kv.keys.capacity() >= 900 && kv.keys.capacity() <= 1000);
        let prefix = kv.prefix(16);
        assert_eq!((prefix.keys.len(), prefix.keys.capacity()), (16, 16));
        assert_eq!(prefix.values, vec![f16::from_f32(2.0); 16]);
    }

    /// Rounding agrees with f16's own round-to-nearest (ties aside), saturates,
    /// and is the same through the F16C path as through the portable one.
    #[test]
    fn cached_values_round_to_the_nearest_half() {
        let mut xs: Vec<f32> = noise(4099, 7)
            .iter()
            .zip(noise(4099, 8))
            .map(|(a, b)| a * 10f32.powf(b * 4.0))
            .collect();
        xs.extend([
            0.0, -0.0, 1.0, 65504.0, 70000.0, -1e9, 1e-3, -3.3e-5, 1e-7, -6.1e-5,
        ]);
        let mut kv = HostKv::default();
        kv.append(&xs, &xs);
        for (&x, &got) in xs.iter().zip(&kv.keys) {
            let want = f16::from_f32(x.clamp(-HALF_MAX, HALF_MAX));
            let (got, want) = (got.to_f32(), want.to_f32());
            // One f16 step apart at most (a tie rounded the other way).
            assert!(
                got == want || (got - want).abs() <= want.abs() / 1024.0 + 6e-8,
                "{x}: {got} vs {want}"
            );
            assert_eq!(got, f16::from_f32(round_to_half(x)).to_f32());
            assert_eq!(got, round_to_half(x), "{x} rounds to an exact f16");
        }
        assert_eq!(kv.keys[4099 + 4].to_f32(), HALF_MAX, "saturates");
        assert!(kv.keys.iter().all(|v| v.is_finite()));
        let mut nan = HostKv::default();
        nan.append(&[f32::NAN; 9], &[f32::NAN; 9]);
        assert!(nan.keys.iter().all(|v| v.is_nan()));
    }

    /// The dispatched head attention (AVX2 where present) against the
    /// portable code, for the head sizes of the supported models.
    #[test]
    fn head_attention_matches_the_portable_code() {
        let half = |xs: Vec<f32>| -> Vec<f16> { xs.iter().map(|&v| f16::from_f32(v)).collect() };
        for (hd, kv_heads, positions) in [(64, 3, 37), (256, 1, 5), (64, 1, 1), (64, 2, 16)] {
            let width = hd * kv_heads;
            let keys = half(noise(positions * width, 1));
            let values = half(noise(positions * width, 2));
            let query = noise(hd, 3);
            let (mut got, mut want) = (vec![0f32; hd], vec![0f32; hd]);
            let mut scores = Vec::new();
            let head = Head {
                query: &query,
                keys: &keys,
                values: &values,
                width,
                offset: (kv_heads - 1) * hd,
                scale: 0.125,
            };
            attend_head(head, &mut scores, &mut got);
            attend_head_body(head, &mut scores, &mut want);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "head_dim {hd}: {worst}");
        }
    }

    #[test]
    fn dot_handles_tails() {
        let a: Vec<f32> = (0..13).map(|i| i as f32).collect();
        let b: Vec<f16> = (0..13).map(|i| f16::from_f32((i % 3) as f32)).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y.to_f32()).sum();
        assert_eq!(dot(&a, &b), want);
    }
}
