//! Attention on the CPU: the key/value caches the fused pass keeps (as f16,
//! like llama.cpp's default cache) and grouped-query attention over them,
//! spread over the spinning pool by token and key/value head.
//!
//! In batched decode the caches are the largest thing a step reads (sixteen
//! sequences of a few hundred tokens hold more bytes than the weights), so
//! storing them at half width halves what attention waits for; the kernels
//! read them as f16 and widen them in registers.

use std::cell::RefCell;
use std::sync::Arc;

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

/// Most parts one cache's positions come in: its own, and up to three
/// frozen caches' shared before them.
pub(crate) const SEGMENTS: usize = 4;

/// One part of a cache's positions: keys and values, whole positions.
type Segment<'a> = (&'a [f16], &'a [f16]);

/// One layer's cached keys and values as f16, one buffer per key/value
/// head: head `h`'s keys for the cache's own position `p` (counted after
/// the shared ones, below) are `keys[h][p * head_dim..(p + 1) * head_dim]`.
/// Head-major, so attention
/// reads each head's cache as one contiguous stream (token-major rows
/// interleave the heads, a stride the hardware prefetcher follows late).
///
/// The first positions may be another cache's, shared read-only (a cached
/// prompt's, see [`HostKv::frozen`]): sequences that start with the same
/// prompt then keep one copy of its keys and values, which stays in the
/// caches while every one of them attends over it. A frozen cache may in
/// turn start with another's positions, so cached prompts that share a
/// beginning store it once: a chain of at most [`SEGMENTS`] parts, which
/// attention reads one after another.
#[derive(Debug, Clone)]
pub(crate) struct HostKv {
    head_dim: usize,
    /// A frozen cache whose first `.1` positions are this one's first (it
    /// may share its own first positions in turn).
    shared: Option<(Arc<HostKv>, usize)>,
    /// The positions after the shared ones.
    keys: Vec<Vec<f16>>,
    values: Vec<Vec<f16>>,
}

impl HostKv {
    /// Room for `tokens` positions of `heads` heads of `head_dim` values.
    pub(crate) fn with_capacity(tokens: usize, heads: usize, head_dim: usize) -> Self {
        let buffers = || {
            (0..heads)
                .map(|_| Vec::with_capacity(tokens * head_dim))
                .collect()
        };
        HostKv {
            head_dim,
            shared: None,
            keys: buffers(),
            values: buffers(),
        }
    }

    /// Key/value heads and values per head.
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.keys.len(), self.head_dim)
    }

    /// Positions shared with a frozen cache.
    fn shared_len(&self) -> usize {
        self.shared.as_ref().map_or(0, |(_, len)| *len)
    }

    /// Frozen caches this one's first positions come from, one inside another.
    fn depth(&self) -> usize {
        self.shared
            .as_ref()
            .map_or(0, |(frozen, _)| 1 + frozen.depth())
    }

    /// Head `h`'s keys and values for positions `span` (whole positions),
    /// in order: the shared parts, outermost first, then this cache's own
    /// part; unused parts are empty.
    fn segments(&self, h: usize, span: std::ops::Range<usize>) -> [Segment<'_>; SEGMENTS] {
        let mut parts: [Segment<'_>; SEGMENTS] = [(&[], &[]); SEGMENTS];
        self.collect(h, span, &mut parts);
        parts
    }

    /// Writes the parts of `span` into `parts` from the start; how many.
    fn collect<'a>(
        &'a self,
        h: usize,
        span: std::ops::Range<usize>,
        parts: &mut [Segment<'a>; SEGMENTS],
    ) -> usize {
        let split = self.shared_len();
        let n = match &self.shared {
            Some((frozen, _)) => {
                frozen.collect(h, span.start.min(split)..span.end.min(split), parts)
            }
            None => 0,
        };
        let own = (span.start.max(split) - split) * self.head_dim
            ..(span.end.max(split) - split) * self.head_dim;
        // Chains are built at most SEGMENTS deep (see `frozen`).
        parts[n] = (&self.keys[h][own.clone()], &self.values[h][own]);
        n + 1
    }

    /// Each frozen cache this one shares, outermost last, with how many
    /// positions it holds itself: what a cache of these caches costs, once
    /// per buffer however many caches share it.
    pub(crate) fn shared_buffers(&self) -> Vec<(*const HostKv, usize)> {
        let mut buffers = Vec::new();
        let mut next = self.shared.as_ref();
        while let Some((frozen, _)) = next {
            let own = frozen
                .keys
                .first()
                .map_or(0, |k| k.len() / self.head_dim.max(1));
            buffers.push((Arc::as_ptr(frozen), own));
            next = frozen.shared.as_ref();
        }
        buffers
    }

    /// The first `positions` positions, frozen: caches made from it with
    /// [`HostKv::continued`] share them. Positions this cache shares stay
    /// shared (no copy) while the chain stays within [`SEGMENTS`]; its own
    /// are copied into buffers of exactly their size.
    pub(crate) fn frozen(&self, positions: usize) -> Self {
        let heads = self.keys.len();
        let split = self.shared_len();
        let mut own = HostKv::with_capacity(0, heads, self.head_dim);
        if let Some((frozen, _)) = &self.shared
            && positions <= split
        {
            own.shared = Some((Arc::clone(frozen), positions));
            return own;
        }
        // Caches continued from the result read depth + 2 parts.
        let keep = self.shared.is_some() && self.depth() + 2 <= SEGMENTS;
        let from = if keep { split } else { 0 };
        let mut flat = HostKv::with_capacity(positions - from, heads, self.head_dim);
        if keep {
            flat.shared = self.shared.clone();
        }
        for h in 0..heads {
            for (k, v) in self.segments(h, from..positions) {
                flat.keys[h].extend_from_slice(k);
                flat.values[h].extend_from_slice(v);
            }
        }
        own.shared = Some((Arc::new(flat), positions));
        own
    }

    /// A cache whose first `positions` positions are this one's: shared
    /// where this one shares them (a frozen cache's), copied otherwise;
    /// with room for `tokens` more.
    pub(crate) fn continued(&self, positions: usize, tokens: usize) -> Self {
        let heads = self.keys.len();
        match &self.shared {
            Some((frozen, len)) if positions <= *len => {
                let mut next = HostKv::with_capacity(tokens, heads, self.head_dim);
                next.shared = Some((Arc::clone(frozen), positions));
                next
            }
            _ => {
                let mut next = HostKv::with_capacity(positions + tokens, heads, self.head_dim);
                for h in 0..heads {
                    for (k, v) in self.segments(h, 0..positions) {
                        next.keys[h].extend_from_slice(k);
                        next.values[h].extend_from_slice(v);
                    }
                }
                next
            }
        }
    }

    /// Keeps the first `positions` positions.
    pub(crate) fn truncate(&mut self, positions: usize) {
        if let Some((_, len)) = &mut self.shared {
            *len = (*len).min(positions);
        }
        let own = positions.saturating_sub(self.shared_len()) * self.head_dim;
        for buffer in self.keys.iter_mut().chain(&mut self.values) {
            buffer.truncate(own);
        }
    }

    /// Makes room for `positions` positions, growing geometrically up to `most`.
    pub(crate) fn reserve(&mut self, positions: usize, most: usize) {
        let shared = self.shared_len();
        let (total, most) = (
            positions.saturating_sub(shared) * self.head_dim,
            most.saturating_sub(shared) * self.head_dim,
        );
        for buffer in self.keys.iter_mut().chain(&mut self.values) {
            if total > buffer.capacity() {
                let grown = total.max(buffer.capacity() * 2).min(most.max(total));
                buffer.reserve_exact(grown - buffer.len());
            }
        }
    }

    /// Appends positions' keys and values (token-major rows of all heads
    /// side by side), each rounded by [`round_to_half`].
    pub(crate) fn append(&mut self, keys: &[f32], values: &[f32]) {
        let hd = self.head_dim;
        let width = hd * self.keys.len();
        assert!(keys.len() == values.len() && keys.len().is_multiple_of(width.max(1)));
        for (h, (k, v)) in self.keys.iter_mut().zip(&mut self.values).enumerate() {
            for (key, value) in keys.chunks_exact(width).zip(values.chunks_exact(width)) {
                narrow(&key[h * hd..][..hd], k);
                narrow(&value[h * hd..][..hd], v);
            }
        }
    }
}

/// Appends `xs` rounded by [`round_to_half`] to `out`.
fn narrow(xs: &[f32], out: &mut Vec<f16>) {
    out.reserve(xs.len());
    #[cfg(target_arch = "x86_64")]
    if crate::isa::isa() == crate::isa::Isa::Avx2 {
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
    let group = c.n_head / c.n_head_kv;
    // One task per (token, key/value head): piece `task` of `out` is the
    // outputs of the query heads sharing that key/value head, computed
    // together so that each cached key and value is read once per up to
    // three heads.
    SpinPool::global().run_chunks(out, group * hd, &|task, out| {
        let (row, kv_head) = (task / c.n_head_kv, task % c.n_head_kv);
        let (r, pos) = tokens[row];
        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let parts = caches[r].segments(kv_head, first..pos + 1);
        let first_head = kv_head * group;
        let heads = Heads {
            queries: &q[(row * heads + first_head) * hd..][..group * hd],
            keys: parts.map(|p| p.0),
            values: parts.map(|p| p.1),
            head_dim: hd,
            scale: c.query_scale,
            softcap: c.attn_softcap,
        };
        SCORES.with(|scores| attend_heads(heads, &mut scores.borrow_mut(), out));
    });
}

/// Query heads that share a key/value head, and the cached keys and values
/// they attend over.
#[derive(Clone, Copy)]
struct Heads<'a> {
    /// The heads' queries, one after another.
    queries: &'a [f32],
    /// Whole positions of `head_dim` values, in segments (shared prefixes'
    /// and the sequence's own) attended over as one.
    keys: [&'a [f16]; SEGMENTS],
    values: [&'a [f16]; SEGMENTS],
    head_dim: usize,
    /// Multiplies the scores before the softmax.
    scale: f32,
    /// Then squashes them to `(-cap, cap)` (gemma2).
    softcap: Option<f32>,
}

thread_local! {
    /// This thread's attention scores, kept from task to task.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The softmax-weighted sums of `heads`' values, one head after another, into `out`.
fn attend_heads(heads: Heads<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    let hd = heads.head_dim;
    assert!(
        hd > 0
            && (0..SEGMENTS).all(|i| heads.keys[i].len() == heads.values[i].len())
            && heads.keys.iter().all(|k| k.len().is_multiple_of(hd))
            && heads.queries.len().is_multiple_of(hd)
            && out.len() == heads.queries.len()
    );
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(64) && crate::isa::isa() == crate::isa::Isa::Avx2 {
        // SAFETY: the CPU has AVX2, FMA and F16C; heads are whole 64-value
        // chunks, and keys and values whole positions (asserted above).
        unsafe { avx2::attend_heads(heads, scores, out) };
        return;
    }
    for (query, out) in heads.queries.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
        attend_head_body(query, heads, scores, out);
    }
}

/// One query head of `heads` in portable code.
fn attend_head_body(query: &[f32], heads: Heads<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    let hd = heads.head_dim;
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for key in heads.keys.iter().flat_map(|k| k.chunks_exact(hd)) {
        let mut score = dot(query, key) * heads.scale;
        if let Some(cap) = heads.softcap {
            score = (score / cap).tanh() * cap;
        }
        max = max.max(score);
        scores.push(score);
    }
    let total = exponentiate(scores, max);
    out.fill(0.0);
    let values = heads.values.iter().flat_map(|v| v.chunks_exact(hd));
    for (value, &weight) in values.zip(scores.iter()) {
        for (o, v) in out.iter_mut().zip(value) {
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
    use super::{HALF_MAX, HALF_MIN_NORMAL, HALF_SPLIT, HALF_SUBNORMAL_SHIFT, SEGMENTS};
    use crate::quant::x86::hsum;

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
        // SAFETY: `p..p + 8` (16 bytes) is readable and the load unaligned;
        // the caller is compiled with F16C (both the contract).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }

    /// Query heads that one sweep over the keys or values serves: each
    /// key or value loaded meets all of them.
    const HEADS: usize = 3;

    /// Positions scored together: with [`HEADS`] heads, nine accumulators,
    /// three queries and a key stay within the sixteen registers.
    const POSITIONS: usize = 3;

    /// Dimensions of the values accumulated together, in two registers per
    /// head: with [`HEADS`] heads, six accumulators, three weights and two
    /// values.
    const DIMS: usize = 16;

    /// [`super::attend_heads`] for heads of whole 64-value chunks. Cached
    /// keys and values are converted from f16 as they are loaded, and
    /// each serves up to [`HEADS`] query heads: scores [`POSITIONS`]
    /// positions at a time (one FMA chain each, reduced in the same tree
    /// for every position), exponentials eight at a time, values
    /// accumulated [`DIMS`] dimensions at a time over all positions. Each head's results are
    /// the same as it alone would get.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `head_dim` is a multiple of 64;
    /// keys and values are equally long, whole positions; `out` is as long
    /// as the queries, whole heads.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend_heads(
        heads: super::Heads<'_>,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let super::Heads {
            queries,
            keys,
            values,
            head_dim: hd,
            scale,
            softcap,
        } = heads;
        let group = queries.len() / hd;
        let positions = keys.iter().map(|k| k.len()).sum::<usize>() / hd;
        scores.clear();
        scores.resize(group * positions, 0.0);
        for first in (0..group).step_by(HEADS) {
            let g = HEADS.min(group - first);
            let part = Part {
                queries: &queries[first * hd..(first + g) * hd],
                scores: &mut scores[first * positions..(first + g) * positions],
                out: &mut out[first * hd..(first + g) * hd],
            };
            // SAFETY: AVX2, FMA and F16C are enabled here; the part holds
            // `g` heads' queries, scores and outputs.
            unsafe {
                match g {
                    1 => part.attend::<1>(keys, values, scale, softcap),
                    2 => part.attend::<2>(keys, values, scale, softcap),
                    _ => part.attend::<3>(keys, values, scale, softcap),
                }
            }
        }
    }

    /// Up to [`HEADS`] query heads of a group, attended together.
    struct Part<'a> {
        queries: &'a [f32],
        /// Per head, a score for every position.
        scores: &'a mut [f32],
        /// Per head, the attention output.
        out: &'a mut [f32],
    }

    impl Part<'_> {
        /// The `G` heads' sums of `values` weighted by the softmax of their
        /// scores against `keys`, into `out`.
        ///
        /// # Safety
        /// AVX2, FMA and F16C; the part holds `G` heads of a multiple of
        /// 64 values; keys and values whole positions of that size.
        #[target_feature(enable = "avx2,fma,f16c")]
        #[allow(clippy::needless_range_loop)] // Register arrays indexed [head][piece].
        unsafe fn attend<const G: usize>(
            self,
            keys: [&[f16]; SEGMENTS],
            values: [&[f16]; SEGMENTS],
            scale: f32,
            softcap: Option<f32>,
        ) {
            let hd = self.queries.len() / G;
            let lengths = keys.map(|k| k.len() / hd);
            let positions = lengths.iter().sum::<usize>();
            assert!(
                self.scores.len() == G * positions
                    && self.out.len() == G * hd
                    && (0..SEGMENTS).all(|i| values[i].len() == keys[i].len())
                    && hd.is_multiple_of(DIMS)
            );
            // Every head's pointer from one pointer per buffer, so that none
            // invalidates another.
            let (queries, scores, out) = (
                self.queries.as_ptr(),
                self.scores.as_mut_ptr(),
                self.out.as_mut_ptr(),
            );
            let q: [*const f32; G] = std::array::from_fn(|h| queries.wrapping_add(h * hd));
            let s: [*mut f32; G] = std::array::from_fn(|h| scores.wrapping_add(h * positions));
            let o: [*mut f32; G] = std::array::from_fn(|h| out.wrapping_add(h * hd));
            // Each segment's positions, and where its scores start.
            let segments: [_; SEGMENTS] = std::array::from_fn(|i| {
                let at = lengths[..i].iter().sum::<usize>();
                (keys[i].as_ptr(), values[i].as_ptr(), lengths[i], at)
            });
            // SAFETY: AVX2, FMA and F16C are enabled here. Segment `i` holds
            // `n = keys[i].len() / hd` whole positions, so `keys + p * hd`
            // has the `POSITIONS` keys `scores_at` reads while
            // `p + POSITIONS <= whole <= n`, and the one it reads while
            // `p < n`; `q[h]` has head h's `hd` values (a multiple of 8,
            // asserted above); and head h's scores `at + p..` up to
            // `at + n <= positions` lie within `self.scores` (`G * positions`
            // long, asserted above).
            unsafe {
                for (keys, _, n, at) in segments {
                    let whole = n / POSITIONS * POSITIONS;
                    for p in (0..whole).step_by(POSITIONS) {
                        let sums = scores_at::<G, POSITIONS>(q, keys.add(p * hd), hd);
                        for h in 0..G {
                            let [a, b, c] = sums[h];
                            let mut four = [0f32; 4];
                            _mm_storeu_ps(
                                four.as_mut_ptr(),
                                _mm_mul_ps(reduce4([a, b, c, c]), _mm_set1_ps(scale)),
                            );
                            std::ptr::copy_nonoverlapping(
                                four.as_ptr(),
                                s[h].add(at + p),
                                POSITIONS,
                            );
                        }
                    }
                    for p in whole..n {
                        let sums = scores_at::<G, 1>(q, keys.add(p * hd), hd);
                        for h in 0..G {
                            let a = sums[h][0];
                            let one = _mm_mul_ss(reduce4([a; 4]), _mm_set_ss(scale));
                            s[h].add(at + p).write(_mm_cvtss_f32(one));
                        }
                    }
                }
            }
            let mut inverse = [0f32; G];
            for (h, inv) in inverse.iter_mut().enumerate() {
                // SAFETY: head h's scores, within `self.scores` (asserted above).
                let head = unsafe { std::slice::from_raw_parts_mut(s[h], positions) };
                // Soft-capped scores (gemma2), as the portable code caps them.
                if let Some(cap) = softcap {
                    head.iter_mut().for_each(|v| *v = (*v / cap).tanh() * cap);
                }
                let max = head.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                // SAFETY: AVX2 and FMA are enabled here.
                *inv = unsafe { exponentiate(head, max) }.recip();
            }
            // SAFETY: as above.
            unsafe {
                for chunk in (0..hd).step_by(DIMS) {
                    let mut acc = [[_mm256_setzero_ps(); DIMS / 8]; G];
                    for (_, values, n, at) in segments {
                        for p in 0..n {
                            let w: [__m256; G] =
                                std::array::from_fn(|h| _mm256_set1_ps(*s[h].add(at + p)));
                            let v = values.add(p * hd + chunk);
                            for j in 0..DIMS / 8 {
                                let vj = load8(v.add(8 * j));
                                for h in 0..G {
                                    acc[h][j] = _mm256_fmadd_ps(w[h], vj, acc[h][j]);
                                }
                            }
                        }
                    }
                    for h in 0..G {
                        let inv = _mm256_set1_ps(inverse[h]);
                        for (j, a) in acc[h].iter().enumerate() {
                            _mm256_storeu_ps(o[h].add(chunk + 8 * j), _mm256_mul_ps(*a, inv));
                        }
                    }
                }
            }
        }
    }

    /// The dot products of `G` queries (`q`, `hd` values each) with `P`
    /// consecutive cached keys from `keys`, as eight-lane partial sums:
    /// `[h][j]` is query h against key j.
    ///
    /// # Safety
    /// AVX, FMA and F16C; `q` and `keys` hold what is described.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // Register arrays indexed [head][position].
    unsafe fn scores_at<const G: usize, const P: usize>(
        q: [*const f32; G],
        keys: *const f16,
        hd: usize,
    ) -> [[__m256; P]; G] {
        // SAFETY: the contract.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); P]; G];
            for i in (0..hd).step_by(8) {
                let qi: [__m256; G] = std::array::from_fn(|h| _mm256_loadu_ps(q[h].add(i)));
                for j in 0..P {
                    let k = load8(keys.add(j * hd + i));
                    for h in 0..G {
                        acc[h][j] = _mm256_fmadd_ps(qi[h], k, acc[h][j]);
                    }
                }
            }
            acc
        }
    }

    /// The lane sums of four vectors (`[Σa₀, Σa₁, Σa₂, Σa₃]`), each summed
    /// in the same tree: pairs, then pairs of pairs, then the two halves.
    ///
    /// # Safety
    /// Only call from code compiled with AVX enabled.
    #[inline(always)]
    unsafe fn reduce4(a: [__m256; 4]) -> __m128 {
        // SAFETY: only called from AVX code (the contract).
        unsafe {
            let pairs = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
            _mm_add_ps(
                _mm256_castps256_ps128(pairs),
                _mm256_extractf128_ps::<1>(pairs),
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
        // Two heads of four values: 16 values a position.
        let mut kv = HostKv::with_capacity(1, 2, 4);
        kv.append(&[1.0; 32], &[2.0; 32]);
        assert_eq!(kv.keys[1].len(), 16);
        kv.reserve(10, 250);
        assert!(kv.keys.iter().chain(&kv.values).all(|b| b.capacity() >= 40));
        kv.reserve(225, 238);
        for buffer in kv.keys.iter().chain(&kv.values) {
            assert!(buffer.capacity() >= 900 && buffer.capacity() <= 952);
        }
        let frozen = kv.frozen(2);
        let (shared, len) = frozen.shared.as_ref().unwrap();
        assert_eq!(*len, 2);
        assert!(
            shared
                .keys
                .iter()
                .all(|b| b.len() == 8 && b.capacity() == 8)
        );
        assert_eq!(shared.values[1], vec![f16::from_f32(2.0); 8]);
        assert!(frozen.keys.iter().chain(&frozen.values).all(Vec::is_empty));
        kv.truncate(1);
        assert!(kv.keys.iter().chain(&kv.values).all(|b| b.len() == 4));
    }

    /// Caches continued from a frozen one share its positions (one copy),
    /// append their own after them, and read back what a copy would hold;
    /// continuing past the shared positions copies instead.
    #[test]
    fn continued_caches_share_a_frozen_prefix() {
        let rows = |from: usize, n: usize| -> Vec<f32> {
            (from * 4..(from + n) * 4).map(|i| i as f32).collect()
        };
        let mut whole = HostKv::with_capacity(4, 2, 2);
        whole.append(&rows(0, 4), &rows(0, 4));
        let frozen = whole.frozen(3);
        let mut a = frozen.continued(3, 2);
        let mut b = frozen.continued(2, 2);
        let shared = |kv: &HostKv| kv.shared.as_ref().map(|(f, len)| (Arc::as_ptr(f), *len));
        let (first, _) = shared(&frozen).unwrap();
        assert_eq!(shared(&a), Some((first, 3)));
        assert_eq!(shared(&b), Some((first, 2)));
        a.append(&rows(3, 1), &rows(3, 1));
        b.append(&rows(2, 2), &rows(2, 2));
        for kv in [&a, &b] {
            for h in 0..2 {
                let [(sk, sv), (k, v), rest @ ..] = kv.segments(h, 0..4);
                assert!(rest.iter().all(|(k, v)| k.is_empty() && v.is_empty()));
                let keys: Vec<f16> = sk.iter().chain(k).copied().collect();
                assert_eq!(keys, whole.keys[h]);
                assert_eq!([sv, v].concat(), whole.values[h]);
            }
        }
        // A window starting inside the shared part, and one past it.
        let [(sk, _), (k, _), ..] = a.segments(1, 2..4);
        assert_eq!((sk.len(), k.len()), (2, 2));
        let [(sk, _), (k, _), ..] = a.segments(0, 3..4);
        assert_eq!((sk.len(), k.len()), (0, 2));
        // Truncating into the shared part shares less.
        b.truncate(1);
        assert_eq!(shared(&b), Some((first, 1)));
        assert!(b.keys.iter().all(Vec::is_empty));
        // Past the shared positions, a continuation is a flat copy.
        let copy = a.continued(4, 0);
        assert!(copy.shared.is_none());
        assert_eq!(copy.keys, whole.keys);
    }

    /// Caching, continuing and caching again builds a chain: each cached
    /// prompt shares its beginning with the one it continued instead of
    /// copying it, up to the parts attention reads; deeper, it is copied.
    /// Every cache reads back exactly its positions.
    #[test]
    fn frozen_caches_chain_within_the_segments() {
        let rows = |from: usize, n: usize| -> Vec<f32> {
            (from * 2..(from + n) * 2).map(|i| i as f32).collect()
        };
        let mut whole = HostKv::with_capacity(40, 1, 2);
        whole.append(&rows(0, 40), &rows(0, 40));
        let mut first = HostKv::with_capacity(4, 1, 2);
        first.append(&rows(0, 4), &rows(0, 4));
        let mut entry = first.frozen(4);
        let mut chains = Vec::new();
        for level in 1..8 {
            let len = 4 * level;
            let mut next = entry.continued(len, 4);
            next.append(&rows(len, 4), &rows(len, 4));
            assert!(
                next.depth() < SEGMENTS,
                "level {level}: depth {}",
                next.depth()
            );
            let keys: Vec<f16> = next
                .segments(0, 0..len + 4)
                .iter()
                .flat_map(|(k, _)| k.iter().copied())
                .collect();
            assert_eq!(keys, whole.keys[0][..(len + 4) * 2], "level {level}");
            entry = next.frozen(len + 4);
            chains.push(entry.shared_buffers());
        }
        // Levels 1 and 2 kept sharing the first buffers (4, then 4 + 4
        // positions stored once); level 3 reached the depth and copied.
        let held = |c: &Vec<(*const HostKv, usize)>| c.iter().map(|b| b.1).collect::<Vec<_>>();
        assert_eq!(held(&chains[0]), [4, 4]);
        assert_eq!(held(&chains[1]), [4, 4, 4]);
        assert_eq!(chains[1][1..], chains[0][..]);
        assert_eq!(held(&chains[2]), [16]);
    }

    /// Token-major rows land in their heads' buffers, position by position.
    #[test]
    fn appended_rows_are_split_by_head() {
        let mut kv = HostKv::with_capacity(2, 3, 2);
        let rows: Vec<f32> = (0..12).map(|i| i as f32).collect();
        kv.append(&rows, &rows);
        let half = |xs: &[f32]| -> Vec<f16> { xs.iter().map(|&v| f16::from_f32(v)).collect() };
        assert_eq!(kv.keys[0], half(&[0.0, 1.0, 6.0, 7.0]));
        assert_eq!(kv.keys[2], half(&[4.0, 5.0, 10.0, 11.0]));
        assert_eq!(kv.values[1], half(&[2.0, 3.0, 8.0, 9.0]));
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
        let mut kv = HostKv::with_capacity(0, 1, xs.len());
        kv.append(&xs, &xs);
        for (&x, &got) in xs.iter().zip(&kv.keys[0]) {
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
        assert_eq!(kv.keys[0][4099 + 4].to_f32(), HALF_MAX, "saturates");
        assert!(kv.keys[0].iter().all(|v| v.is_finite()));
        let mut nan = HostKv::with_capacity(0, 1, 9);
        nan.append(&[f32::NAN; 9], &[f32::NAN; 9]);
        assert!(nan.keys[0].iter().all(|v| v.is_nan()));
    }

    /// The dispatched attention of a group of heads (AVX2 where present)
    /// against the portable code head by head, for the head sizes and
    /// groups of the supported models, with positions in partial blocks.
    #[test]
    fn grouped_attention_matches_the_portable_code() {
        let half = |xs: Vec<f32>| -> Vec<f16> { xs.iter().map(|&v| f16::from_f32(v)).collect() };
        let shapes = [
            (64, 3, 37, None),
            (64, 3, 6, None),
            (64, 3, 2, None),
            (256, 4, 5, None),
            (64, 1, 1, None),
            (64, 2, 70, None),
            // Gemma 2's soft cap, low enough to bite.
            (64, 2, 37, Some(0.5)),
            (256, 3, 9, Some(0.5)),
        ];
        for (hd, group, positions, softcap) in shapes {
            let keys = half(noise(positions * hd, 1));
            let values = half(noise(positions * hd, 2));
            let queries = noise(group * hd, 3);
            // The positions in segments (shared prefixes and the rest),
            // split anywhere, attend exactly as in one.
            let split = |at: usize| {
                let mid = at / 2;
                Heads {
                    queries: &queries,
                    keys: [
                        &keys[..mid * hd],
                        &keys[mid * hd..at * hd],
                        &[],
                        &keys[at * hd..],
                    ],
                    values: [
                        &values[..mid * hd],
                        &values[mid * hd..at * hd],
                        &[],
                        &values[at * hd..],
                    ],
                    head_dim: hd,
                    scale: 0.125,
                    softcap,
                }
            };
            let heads = split(0);
            let mut got = vec![0f32; group * hd];
            attend_heads(heads, &mut Vec::new(), &mut got);
            for at in [1, positions / 2, positions] {
                let mut parts = vec![0f32; group * hd];
                attend_heads(split(at), &mut Vec::new(), &mut parts);
                assert_eq!(parts, got, "split at {at} of {positions}");
            }
            let mut scores = Vec::new();
            for (h, query) in queries.chunks_exact(hd).enumerate() {
                let mut want = vec![0f32; hd];
                attend_head_body(query, heads, &mut scores, &mut want);
                let worst = got[h * hd..(h + 1) * hd]
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-5, "head_dim {hd}, head {h}: {worst}");
            }
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
