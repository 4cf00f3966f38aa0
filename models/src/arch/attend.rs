//! Attention on the CPU: the key/value caches the fused pass keeps (as f16,
//! like llama.cpp's default cache) and grouped-query attention over them,
//! spread over the spinning pool by token and key/value head.
//!
//! In batched decode the caches are the largest thing a step reads (sixteen
//! sequences of a few hundred tokens hold more bytes than the weights), so
//! storing them at half width halves what attention waits for.

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

/// `x` rounded to the nearest f16 value (kept as f32), saturating at
/// ±[`HALF_MAX`]. Computed with f32 operations that the Burn graph performs
/// as tensor operations too, so both passes cache identical keys and values.
pub(crate) fn round_to_half(x: f32) -> f32 {
    let x = x.clamp(-HALF_MAX, HALF_MAX);
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

/// `len` values of every `width`-wide position of `cache` from `offset` on,
/// as f32 into `out` (positions packed together).
fn widen(cache: &[f16], width: usize, offset: usize, len: usize, out: &mut Vec<f32>) {
    let positions = cache.len() / width;
    out.clear();
    out.reserve(positions * len);
    #[cfg(target_arch = "x86_64")]
    if len.is_multiple_of(8)
        && offset + len <= width
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU has AVX2 and F16C; every read lies inside `cache`
        // (`offset + len <= width`), and the `positions * len` values
        // reserved are all written before `set_len`.
        unsafe {
            avx2::widen(cache, width, offset, len, out.as_mut_ptr());
            out.set_len(positions * len);
        }
        return;
    }
    for position in cache.chunks_exact(width) {
        out.extend(position[offset..offset + len].iter().map(|v| v.to_f32()));
    }
}

/// A thread's buffers for one key/value head: its keys and values as f32,
/// and the scores of the query head being computed.
#[derive(Default)]
struct HeadScratch {
    keys: Vec<f32>,
    values: Vec<f32>,
    scores: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<HeadScratch> = RefCell::new(HeadScratch::default());
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
    // outputs of the query heads sharing that key/value head, which is
    // widened to f32 once for all of them.
    SpinPool::global().run_chunks(out, group * hd, &|task, out| {
        let (row, kv_head) = (task / c.n_head_kv, task % c.n_head_kv);
        let (r, pos) = tokens[row];
        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let cache = caches[r];
        let span = first * kv_dim..(pos + 1) * kv_dim;
        SCRATCH.with(|scratch| {
            let scratch = &mut *scratch.borrow_mut();
            let offset = kv_head * hd;
            widen(
                &cache.keys[span.clone()],
                kv_dim,
                offset,
                hd,
                &mut scratch.keys,
            );
            widen(&cache.values[span], kv_dim, offset, hd, &mut scratch.values);
            for (j, out) in out.chunks_exact_mut(hd).enumerate() {
                let h = kv_head * group + j;
                let head = Head {
                    query: &q[(row * heads + h) * hd..][..hd],
                    keys: &scratch.keys,
                    values: &scratch.values,
                    scale: c.query_scale,
                };
                attend_head(head, &mut scratch.scores, out);
            }
        });
    });
}

/// One query head and the keys and values it attends over.
#[derive(Clone, Copy)]
struct Head<'a> {
    query: &'a [f32],
    /// One `query.len()`-long key per position.
    keys: &'a [f32],
    /// One value per position, like `keys`.
    values: &'a [f32],
    /// Multiplies the scores before the softmax.
    scale: f32,
}

/// The softmax-weighted sum of `head`'s values, into `out`.
fn attend_head(head: Head<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    let hd = head.query.len();
    assert!(
        head.keys.len() == head.values.len()
            && head.keys.len().is_multiple_of(hd)
            && out.len() == hd
    );
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(64)
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has AVX2 and FMA; the head is whole 64-value
        // chunks, and keys and values whole positions (asserted above).
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
        scale,
    } = head;
    let hd = query.len();
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for key in keys.chunks_exact(hd) {
        let score = dot(query, key) * scale;
        max = max.max(score);
        scores.push(score);
    }
    let total = exponentiate(scores, max);
    out.fill(0.0);
    for (value, &weight) in values.chunks_exact(hd).zip(scores.iter()) {
        for (o, &v) in out.iter_mut().zip(value) {
            *o += weight * v;
        }
    }
    let inv = total.recip();
    out.iter_mut().for_each(|o| *o *= inv);
}

/// `a · b` with eight partial sums (so it vectorizes).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
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
    use super::{HALF_MAX, HALF_SPLIT};
    use crate::quant::x86::hsum;

    /// Positions ahead that [`widen`] prefetches: a head is a few cache
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
        let mut chunks = xs.chunks_exact(8);
        let mut written = 0;
        for chunk in &mut chunks {
            // SAFETY: `chunk` holds 8 values; `out` has room (the contract).
            unsafe {
                // NaN passes through: max/min return their second operand for it.
                let x = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_loadu_ps(chunk.as_ptr())));
                let t = _mm256_mul_ps(x, split);
                let rounded = _mm256_sub_ps(t, _mm256_sub_ps(t, x));
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

    /// [`super::widen`] with F16C, prefetching [`AHEAD`] positions ahead.
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C; `len` is a multiple of 8 and
    /// `offset + len <= width`; `out` has room for `len` values per whole
    /// position of `cache`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn widen(
        cache: &[f16],
        width: usize,
        offset: usize,
        len: usize,
        out: *mut f32,
    ) {
        let positions = cache.len() / width;
        for p in 0..positions {
            let ahead = (p + AHEAD) * width + offset;
            if ahead + len <= cache.len() {
                for line in (0..len).step_by(32) {
                    // SAFETY: inside `cache` (checked); prefetches never fault anyway.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(cache.as_ptr().add(ahead + line).cast()) };
                }
            }
            for i in (0..len).step_by(8) {
                // SAFETY: `p * width + offset + i + 8 <= cache.len()` and the
                // output holds `len` values per position (the contract).
                unsafe {
                    let half = _mm_loadu_si128(cache.as_ptr().add(p * width + offset + i).cast());
                    _mm256_storeu_ps(out.add(p * len + i), _mm256_cvtph_ps(half));
                }
            }
        }
    }

    /// [`super::attend_head`] for heads of whole 64-value chunks: scores
    /// eight positions at a time (one FMA chain each, reduced together),
    /// exponentials eight at a time, values accumulated in eight registers
    /// per chunk.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `query.len()` is a multiple of 64, and
    /// `keys` and `values` are equally long, whole positions of that many
    /// values; `out` is as long as `query`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_head(
        head: super::Head<'_>,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let super::Head {
            query,
            keys,
            values,
            scale,
        } = head;
        let hd = query.len();
        let positions = keys.len() / hd;
        scores.clear();
        scores.resize(positions, 0.0);
        let (q, k) = (query.as_ptr(), keys.as_ptr());
        let eights = positions / 8 * 8;
        let mut max8 = _mm256_set1_ps(f32::NEG_INFINITY);
        for p in (0..eights).step_by(8) {
            // SAFETY: positions p..p + 8 lie within `keys`; `scores` holds
            // `positions` values.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 8];
                for i in (0..hd).step_by(8) {
                    let qv = _mm256_loadu_ps(q.add(i));
                    for (j, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k.add((p + j) * hd + i)), *acc);
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
                let key = k.add(p * hd);
                let mut a = _mm256_setzero_ps();
                for i in (0..hd).step_by(8) {
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i)), _mm256_loadu_ps(key.add(i)), a);
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
                    let w = _mm256_set1_ps(weight);
                    let v = values.as_ptr().add(p * hd + chunk);
                    acc[0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), acc[0]);
                    acc[1] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v.add(8)), acc[1]);
                    acc[2] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v.add(16)), acc[2]);
                    acc[3] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v.add(24)), acc[3]);
                    acc[4] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v.add(32)), acc[4]);
                    acc[5] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v.add(40)), acc[5]);
                    acc[6] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v.add(48)), acc[6]);
                    acc[7] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v.add(56)), acc[7]);
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
        xs.extend([0.0, -0.0, 1.0, 65504.0, 70000.0, -1e9, 1e-3, -3.3e-5]);
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
        }
        assert_eq!(kv.keys[4099 + 4].to_f32(), HALF_MAX, "saturates");
        assert!(kv.keys.iter().all(|v| v.is_finite()));
        let mut nan = HostKv::default();
        nan.append(&[f32::NAN; 9], &[f32::NAN; 9]);
        assert!(nan.keys.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn a_head_is_widened_from_every_position() {
        for (width, offset, len, positions) in [(192, 64, 64, 37), (256, 0, 256, 5), (24, 4, 12, 3)]
        {
            let values: Vec<f16> = noise(width * positions, 9)
                .iter()
                .map(|&v| f16::from_f32(v))
                .collect();
            let mut got = Vec::new();
            widen(&values, width, offset, len, &mut got);
            let want: Vec<f32> = values
                .chunks_exact(width)
                .flat_map(|p| p[offset..offset + len].iter().map(|v| v.to_f32()))
                .collect();
            assert_eq!(got, want);
        }
    }

    /// The dispatched head attention (AVX2 where present) against the
    /// portable code, for the head sizes of the supported models.
    #[test]
    fn head_attention_matches_the_portable_code() {
        for (hd, positions) in [(64, 37), (256, 5), (64, 1)] {
            let (keys, values) = (noise(positions * hd, 1), noise(positions * hd, 2));
            let query = noise(hd, 3);
            let (mut got, mut want) = (vec![0f32; hd], vec![0f32; hd]);
            let mut scores = Vec::new();
            let head = Head {
                query: &query,
                keys: &keys,
                values: &values,
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
        let b: Vec<f32> = (0..13).map(|i| (i % 3) as f32).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert_eq!(dot(&a, &b), want);
    }
}
