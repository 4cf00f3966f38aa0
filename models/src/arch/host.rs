//! The forward pass on the CPU: the graph of `transformer`'s Burn pass as
//! fused loops over f32 buffers that are kept from pass to pass, with the
//! weight products on the quantized blocks and attention spread over the
//! spinning pool by token and head.
//!
//! At decode sizes (one token, vectors of a few hundred values) every Burn
//! operation costs more in dispatch and allocation than its arithmetic, and a
//! token ran about fifty of them per layer on one thread while the other core
//! waited. Here a layer is a handful of passes over preallocated buffers.

use std::cell::RefCell;

use crate::gguf::GgufFile;

use super::config::{Activation, ModelConfig, RopeStyle};
use super::ops::{Matrix, matmul_many};
use super::pool::SpinPool;

/// One layer's cached keys and values, token-major: position `p`'s keys are
/// `keys[p * width..(p + 1) * width]`, all key/value heads side by side.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostKv {
    pub(crate) keys: Vec<f32>,
    pub(crate) values: Vec<f32>,
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
}

/// One layer's weights as the CPU pass reads them.
pub(crate) struct HostLayer<'m> {
    pub(crate) attn_norm: &'m [f32],
    pub(crate) wq: &'m Matrix,
    pub(crate) wk: &'m Matrix,
    pub(crate) wv: &'m Matrix,
    pub(crate) wo: &'m Matrix,
    pub(crate) q_norm: Option<&'m [f32]>,
    pub(crate) k_norm: Option<&'m [f32]>,
    pub(crate) post_attn_norm: Option<&'m [f32]>,
    pub(crate) ffn_norm: &'m [f32],
    pub(crate) gate: &'m Matrix,
    pub(crate) up: &'m Matrix,
    pub(crate) down: &'m Matrix,
    pub(crate) post_ffn_norm: Option<&'m [f32]>,
}

/// Buffers a pass reuses; each is resized to the pass's token count.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Products as the kernels write them (weight-row-major), before transposing.
    wide: [Vec<f32>; 3],
    /// Per token: the index of its run and its position.
    tokens: Vec<(usize, usize)>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    cos_local: Vec<f32>,
    sin_local: Vec<f32>,
}

/// One run of a pass: a sequence's cache for every layer, where its tokens
/// start, and the tokens.
pub(crate) struct HostRun<'a> {
    pub(crate) cache: &'a mut [HostKv],
    pub(crate) first: usize,
    pub(crate) tokens: &'a [u32],
}

/// The forward pass of `runs` (each fits its cache); returns the final,
/// normalized hidden states of all their tokens, run after run.
pub(crate) fn run(
    c: &ModelConfig,
    file: &GgufFile,
    token_embd: &Matrix,
    layers: &[HostLayer<'_>],
    output_norm: &[f32],
    runs: &mut [HostRun<'_>],
    s: &mut Scratch,
) -> Vec<f32> {
    let d = c.n_embd;
    let (q_dim, kv_dim) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
    s.tokens.clear();
    for (r, run) in runs.iter().enumerate() {
        s.tokens
            .extend((run.first..run.first + run.tokens.len()).map(|p| (r, p)));
    }
    let n = s.tokens.len();
    s.x.resize(n * d, 0.0);
    let mut rows = s.x.chunks_exact_mut(d);
    for run in runs.iter() {
        for (&t, row) in run.tokens.iter().zip(&mut rows) {
            token_embd.row(file, t as usize, row);
            if c.embed_scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= c.embed_scale);
            }
        }
    }
    rope_tables(c, c.rope_base, &s.tokens, &mut s.cos, &mut s.sin);
    let local_tables = c.sliding_window.is_some() && c.rope_base_local != c.rope_base;
    if local_tables {
        rope_tables(
            c,
            c.rope_base_local,
            &s.tokens,
            &mut s.cos_local,
            &mut s.sin_local,
        );
    }

    for (il, layer) in layers.iter().enumerate() {
        let local = c.is_local(il);
        rms_norm_rows(&s.x, layer.attn_norm, c.rms_eps, &mut s.h);
        products(
            file,
            [layer.wq, layer.wk, layer.wv],
            &s.h,
            n,
            [&mut s.q, &mut s.k, &mut s.v],
            &mut s.wide,
        );
        if let (Some(qn), Some(kn)) = (layer.q_norm, layer.k_norm) {
            rms_norm_in_place(&mut s.q, qn, c.rms_eps);
            rms_norm_in_place(&mut s.k, kn, c.rms_eps);
        }
        let (cos, sin) = if local && local_tables {
            (&s.cos_local, &s.sin_local)
        } else {
            (&s.cos, &s.sin)
        };
        rope(c, &mut s.q, n, cos, sin);
        rope(c, &mut s.k, n, cos, sin);

        let mut row = 0;
        for run in runs.iter_mut() {
            let rows = row..row + run.tokens.len();
            let kv = &mut run.cache[il];
            kv.keys
                .extend_from_slice(&s.k[rows.start * kv_dim..rows.end * kv_dim]);
            kv.values
                .extend_from_slice(&s.v[rows.start * kv_dim..rows.end * kv_dim]);
            row = rows.end;
        }
        let caches: Vec<&HostKv> = runs.iter().map(|run| &run.cache[il]).collect();
        let window = c.sliding_window.filter(|_| local);
        s.attn.resize(n * q_dim, 0.0);
        attention(c, &s.q, &caches, &s.tokens, window, &mut s.attn);

        products(
            file,
            [layer.wo],
            &s.attn,
            n,
            [&mut s.h],
            array_ref(&mut s.wide),
        );
        add_residual(&mut s.x, &mut s.h, layer.post_attn_norm, c.rms_eps);

        rms_norm_rows(&s.x, layer.ffn_norm, c.rms_eps, &mut s.h);
        products(
            file,
            [layer.gate, layer.up],
            &s.h,
            n,
            [&mut s.gate, &mut s.up],
            array_ref(&mut s.wide),
        );
        gated(c.activation, &mut s.gate, &s.up);
        products(
            file,
            [layer.down],
            &s.gate,
            n,
            [&mut s.h],
            array_ref(&mut s.wide),
        );
        add_residual(&mut s.x, &mut s.h, layer.post_ffn_norm, c.rms_eps);
    }
    let mut hidden = Vec::with_capacity(n * d);
    rms_norm_rows(&s.x, output_norm, c.rms_eps, &mut hidden);
    hidden
}

/// The first `N` of the scratch's product buffers.
fn array_ref<const N: usize>(wide: &mut [Vec<f32>; 3]) -> &mut [Vec<f32>; N] {
    (&mut wide[..N]).try_into().expect("N <= 3")
}

/// `outs[i] = x · mᵢᵀ` token-major (`[n, rows_i]`) for matrices sharing the
/// input `x` (`[n, cols]`), in one parallel pass; `wide` holds the kernels'
/// weight-row-major results when `n > 1`.
pub(crate) fn products<const N: usize>(
    file: &GgufFile,
    matrices: [&Matrix; N],
    x: &[f32],
    n: usize,
    outs: [&mut Vec<f32>; N],
    wide: &mut [Vec<f32>; N],
) {
    if n == 1 {
        let mut work: Vec<(&Matrix, &mut [f32])> = matrices
            .iter()
            .zip(outs)
            .map(|(&m, out)| {
                out.resize(m.rows, 0.0);
                (m, out.as_mut_slice())
            })
            .collect();
        matmul_many(file, &mut work, x, n);
        return;
    }
    let mut work: Vec<(&Matrix, &mut [f32])> = matrices
        .iter()
        .zip(wide.iter_mut())
        .map(|(&m, out)| {
            out.resize(m.rows * n, 0.0);
            (m, out.as_mut_slice())
        })
        .collect();
    matmul_many(file, &mut work, x, n);
    for ((m, weight_major), out) in matrices.iter().zip(wide.iter()).zip(outs) {
        out.resize(m.rows * n, 0.0);
        for (r, ys) in weight_major.chunks_exact(n).enumerate() {
            for (t, &y) in ys.iter().enumerate() {
                out[t * m.rows + r] = y;
            }
        }
    }
}

/// Per token, the cosines and sines of its position's rotation angles.
fn rope_tables(
    c: &ModelConfig,
    base: f32,
    tokens: &[(usize, usize)],
    cos: &mut Vec<f32>,
    sin: &mut Vec<f32>,
) {
    let (dims, half) = (c.rope_dims, c.rope_dims / 2);
    cos.clear();
    sin.clear();
    for &(_, pos) in tokens {
        for i in 0..half {
            // Computed as llama.cpp does, in f32, so positions rotate identically.
            let theta = pos as f32 * base.powf(-2.0 * i as f32 / dims as f32);
            let (s, c) = theta.sin_cos();
            cos.push(c);
            sin.push(s);
        }
    }
}

/// Rotates the first `rope_dims` dimensions of every head of every token of
/// `x` (`[n, heads, head_dim]`) by its position's angles.
fn rope(c: &ModelConfig, x: &mut [f32], n: usize, cos: &[f32], sin: &[f32]) {
    let (hd, half) = (c.head_dim, c.rope_dims / 2);
    for (t, token) in x.chunks_exact_mut(x.len() / n).enumerate() {
        let (cos, sin) = (&cos[t * half..][..half], &sin[t * half..][..half]);
        for head in token.chunks_exact_mut(hd) {
            for i in 0..half {
                let (a, b) = match c.rope_style {
                    RopeStyle::Halves => (i, i + half),
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

/// `out` = each `weight.len()`-wide row of `x`, RMS-normalized and scaled by `weight`.
fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut Vec<f32>) {
    out.resize(x.len(), 0.0);
    for (row, y) in x
        .chunks_exact(weight.len())
        .zip(out.chunks_exact_mut(weight.len()))
    {
        let inv = inv_rms(row, eps);
        for ((y, &v), &w) in y.iter_mut().zip(row).zip(weight) {
            *y = v * inv * w;
        }
    }
}

/// Each `weight.len()`-wide row of `x` RMS-normalized and scaled by `weight`, in place.
fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(weight.len()) {
        let inv = inv_rms(row, eps);
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = *v * inv * w;
        }
    }
}

/// `1 / sqrt(mean(row²) + eps)`.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v * v;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    let sum = acc.iter().sum::<f32>() + tail;
    (sum / row.len() as f32 + eps).sqrt().recip()
}

/// `x += y`, `y` first RMS-normalized by `post_norm` where the architecture
/// has one (gemma).
fn add_residual(x: &mut [f32], y: &mut [f32], post_norm: Option<&[f32]>, eps: f32) {
    if let Some(norm) = post_norm {
        rms_norm_in_place(y, norm, eps);
    }
    for (a, &b) in x.iter_mut().zip(y.iter()) {
        *a += b;
    }
}

/// Values per task of the gated activation (it is mostly `exp`/`tanh`).
const GATED_CHUNK: usize = 512;

/// `gate = act(gate) * up`, elementwise, across the pool.
fn gated(activation: Activation, gate: &mut [f32], up: &[f32]) {
    SpinPool::global().run_chunks(gate, GATED_CHUNK, &|i, gate| {
        gated_chunk(activation, gate, &up[i * GATED_CHUNK..][..gate.len()]);
    });
}

/// [`gated`] on one piece.
fn gated_chunk(activation: Activation, gate: &mut [f32], up: &[f32]) {
    match activation {
        Activation::Silu => {
            for (g, &u) in gate.iter_mut().zip(up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
        }
        Activation::GeluTanh => {
            const SQRT_2_OVER_PI: f32 = 0.797_884_6;
            for (g, &u) in gate.iter_mut().zip(up) {
                let x = *g;
                let inner = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
                *g = 0.5 * x * (1.0 + inner.tanh()) * u;
            }
        }
    }
}

thread_local! {
    /// Attention scores of the head being computed on this thread.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Causal (optionally windowed) grouped-query attention of every token's
/// query heads (`q`, `[n, heads, head_dim]`) over its run's cached keys and
/// values, which already hold the tokens themselves; writes `out` like `q`.
fn attention(
    c: &ModelConfig,
    q: &[f32],
    caches: &[&HostKv],
    tokens: &[(usize, usize)],
    window: Option<usize>,
    out: &mut [f32],
) {
    let (heads, hd) = (c.n_head, c.head_dim);
    let (group, kv_dim) = (c.n_head / c.n_head_kv, c.n_head_kv * c.head_dim);
    // One task per (token, head): piece `task` of `out` is that head's output.
    SpinPool::global().run_chunks(out, hd, &|task, out| {
        let (row, h) = (task / heads, task % heads);
        let (r, pos) = tokens[row];
        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let offset = (h / group) * hd;
        let query = &q[(row * heads + h) * hd..][..hd];
        let cache = caches[r];
        let keys = &cache.keys[first * kv_dim..(pos + 1) * kv_dim];
        let values = &cache.values[first * kv_dim..(pos + 1) * kv_dim];
        SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            let head = Head {
                query,
                keys,
                values,
                width: kv_dim,
                offset,
                scale: c.query_scale,
            };
            attend_head(head, &mut scores, out);
        });
    });
}

/// One query head and the cached keys and values it attends over.
#[derive(Clone, Copy)]
struct Head<'a> {
    query: &'a [f32],
    /// Whole positions of `width` values; this head's are at `offset`.
    keys: &'a [f32],
    values: &'a [f32],
    width: usize,
    offset: usize,
    /// Multiplies the scores before the softmax.
    scale: f32,
}

/// The softmax-weighted sum of `head`'s values, into `out`.
fn attend_head(head: Head<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    let Head {
        query,
        keys,
        values,
        width,
        offset,
        ..
    } = head;
    assert!(
        offset + query.len() <= width && keys.len() == values.len() && out.len() == query.len()
    );
    #[cfg(target_arch = "x86_64")]
    if query.len().is_multiple_of(64)
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has AVX2 and FMA; the head is whole 64-value chunks
        // inside each position (asserted above).
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
        for (o, &v) in out.iter_mut().zip(&value[offset..offset + hd]) {
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
        *score = (*score - max).exp();
        total += *score;
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::quant::x86::hsum;

    /// [`super::attend_head`] for heads of whole 64-value chunks: scores with
    /// two FMA chains per position, values accumulated in eight registers
    /// per chunk.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `query.len()` is a multiple of 64,
    /// `offset + query.len() <= width`, and `keys` and `values` are equally
    /// long, whole positions of `width` values; `out` is as long as `query`.
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
            width,
            offset,
            scale,
        } = head;
        let hd = query.len();
        let positions = keys.len() / width;
        scores.clear();
        scores.resize(positions, 0.0);
        let q = query.as_ptr();
        let mut max = f32::NEG_INFINITY;
        for (p, score) in scores.iter_mut().enumerate() {
            // SAFETY: position p's head lies within `keys` (see the contract).
            unsafe {
                let k = keys.as_ptr().add(p * width + offset);
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for i in (0..hd).step_by(16) {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i)), _mm256_loadu_ps(k.add(i)), a0);
                    a1 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(q.add(i + 8)),
                        _mm256_loadu_ps(k.add(i + 8)),
                        a1,
                    );
                }
                *score = hsum(_mm256_add_ps(a0, a1)) * scale;
            }
            max = max.max(*score);
        }
        let inv = super::exponentiate(scores, max).recip();
        for chunk in (0..hd).step_by(64) {
            // SAFETY: as above, for the values; `out` holds `hd` values.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (p, &weight) in scores.iter().enumerate() {
                    let w = _mm256_set1_ps(weight);
                    let v = values.as_ptr().add(p * width + offset + chunk);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_grows_geometrically_within_its_bound() {
        let mut kv = HostKv::with_capacity(4, 8);
        kv.keys.extend([1.0; 32]);
        kv.values.extend([2.0; 32]);
        kv.reserve(40, 1000);
        assert!(kv.keys.capacity() >= 64 && kv.values.capacity() >= 64);
        kv.reserve(900, 950);
        assert!(kv.keys.capacity() >= 900 && kv.keys.capacity() <= 1000);
        let prefix = kv.prefix(16);
        assert_eq!((prefix.keys.len(), prefix.keys.capacity()), (16, 16));
        assert_eq!(prefix.values, vec![2.0; 16]);
    }

    /// The dispatched head attention (AVX2 where present) against the
    /// portable code, for the head sizes of the supported models.
    #[test]
    fn head_attention_matches_the_portable_code() {
        let noise = |n: usize, seed: u64| -> Vec<f32> {
            crate::quant::test_noise(n, seed)
                .iter()
                .map(|&b| b as f32 / 128.0 - 1.0)
                .collect()
        };
        for (hd, kv_heads, positions) in [(64, 3, 37), (256, 1, 5), (64, 1, 1)] {
            let width = hd * kv_heads;
            let (keys, values) = (noise(positions * width, 1), noise(positions * width, 2));
            let query = noise(hd, 3);
            let offset = (kv_heads - 1) * hd;
            let (mut got, mut want) = (vec![0f32; hd], vec![0f32; hd]);
            let mut scores = Vec::new();
            let head = Head {
                query: &query,
                keys: &keys,
                values: &values,
                width,
                offset,
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
