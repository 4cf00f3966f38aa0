//! The forward pass on the CPU: the graph of `transformer`'s Burn pass as
//! fused loops over f32 buffers that are kept from pass to pass, with the
//! weight products on the quantized blocks and attention spread over the
//! spinning pool (see `attend`).
//!
//! At decode sizes (one token, vectors of a few hundred values) every Burn
//! operation costs more in dispatch and allocation than its arithmetic, and a
//! token ran about fifty of them per layer on one thread while the other core
//! waited. Here a layer is a handful of passes over preallocated buffers.

use crate::gguf::GgufFile;

use super::attend::{HostKv, attention};
use super::config::{ModelConfig, RopeStyle};
use super::gated::gated;
use super::lora::{self as lora_deltas, LoraAdapter};
use super::ops::{Beside, Matrix, matmul_many_beside};
use super::rope::Rope;
use super::weights::FileWeights;
use crate::quant::OutputRows;

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
    /// The sequence's adapter: its deltas are added to the shared products.
    pub(crate) adapter: Option<&'a LoraAdapter>,
}

/// The forward pass of `runs` (each fits its cache); returns the final,
/// normalized hidden states of all their tokens, run after run.
pub(crate) fn run(
    c: &ModelConfig,
    file: &GgufFile,
    weights: &FileWeights,
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
    // Each token row's adapter, if any run has one.
    let adapters: Vec<Option<&LoraAdapter>> = if runs.iter().any(|r| r.adapter.is_some()) {
        (runs.iter())
            .flat_map(|r| std::iter::repeat_n(r.adapter, r.tokens.len()))
            .collect()
    } else {
        Vec::new()
    };
    s.x.resize(n * d, 0.0);
    let mut rows = s.x.chunks_exact_mut(d);
    for run in runs.iter() {
        for (&t, row) in run.tokens.iter().zip(&mut rows) {
            weights.token_embd.row(file, t as usize, row);
            if c.embed_scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= c.embed_scale);
            }
        }
    }
    let factors = weights.rope_factors.as_deref();
    let positions = s.tokens.iter().map(|&(_, pos)| pos);
    Rope::new(c, c.rope_base, factors).angles(positions.clone(), &mut s.cos, &mut s.sin);
    let local_tables = c.sliding_window.is_some() && c.rope_base_local != c.rope_base;
    if local_tables {
        let local = Rope::new(c, c.rope_base_local, factors);
        local.angles(positions, &mut s.cos_local, &mut s.sin_local);
    }

    for (il, layer) in weights.layers.iter().enumerate() {
        let local = c.is_local(il);
        rms_norm_rows(&s.x, &layer.attn_norm, c.rms_eps, &mut s.h);
        adapted_products(
            file,
            ([&layer.wq, &layer.wk, &layer.wv], [0, 1, 2]),
            (&adapters, il),
            &s.h,
            n,
            [&mut s.q, &mut s.k, &mut s.v],
        );
        for (out, bias) in [
            (&mut s.q, &layer.bq),
            (&mut s.k, &layer.bk),
            (&mut s.v, &layer.bv),
        ] {
            if let Some(bias) = bias {
                add_bias(out, bias);
            }
        }
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
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
            let span = rows.start * kv_dim..rows.end * kv_dim;
            run.cache[il].append(&s.k[span.clone()], &s.v[span]);
            row = rows.end;
        }
        let caches: Vec<&HostKv> = runs.iter().map(|run| &run.cache[il]).collect();
        let window = c.sliding_window.filter(|_| local);
        s.attn.resize(n * q_dim, 0.0);
        attention(c, &s.q, &caches, &s.tokens, window, &mut s.attn);

        let wo = ([&layer.wo], [3]);
        adapted_products(file, wo, (&adapters, il), &s.attn, n, [&mut s.h]);
        add_residual(
            &mut s.x,
            &mut s.h,
            layer.post_attn_norm.as_deref(),
            c.rms_eps,
        );

        rms_norm_rows(&s.x, &layer.ffn_norm, c.rms_eps, &mut s.h);
        adapted_products(
            file,
            ([&layer.gate, &layer.up], [4, 5]),
            (&adapters, il),
            &s.h,
            n,
            [&mut s.gate, &mut s.up],
        );
        gated(c.activation, &mut s.gate, &s.up);
        let down = ([&layer.down], [6]);
        adapted_products(file, down, (&adapters, il), &s.gate, n, [&mut s.h]);
        add_residual(
            &mut s.x,
            &mut s.h,
            layer.post_ffn_norm.as_deref(),
            c.rms_eps,
        );
    }
    let mut hidden = Vec::with_capacity(n * d);
    rms_norm_rows(&s.x, &weights.output_norm, c.rms_eps, &mut hidden);
    hidden
}

/// [`products`] of `matrices` (targets `slots` of an adapter, of layer
/// `layer`), plus each token's adapter delta (`adapters`, one per token,
/// empty when no token has one), computed in the same pool dispatch.
fn adapted_products<const N: usize>(
    file: &GgufFile,
    (matrices, slots): ([&Matrix; N], [usize; N]),
    (adapters, layer): (&[Option<&LoraAdapter>], usize),
    x: &[f32],
    n: usize,
    outs: [&mut Vec<f32>; N],
) {
    let cols = x.len() / n.max(1);
    let lens = matrices.map(|m| m.rows);
    let Some(pass) = lora_deltas::DeltaPass::new(adapters, layer, slots, x, cols, lens) else {
        return products(file, matrices, x, n, outs);
    };
    let run = |i: usize| {
        // SAFETY: the dispatch runs each task once and returns after all.
        unsafe { pass.run(i) }
    };
    let beside = Beside {
        tasks: pass.tasks(),
        run: &run,
    };
    let outs = products_beside(file, matrices, x, n, outs, Some(beside));
    pass.add_to(outs);
}

/// `outs[i] = x · mᵢᵀ` token-major (`[n, rows_i]`) for matrices sharing the
/// input `x` (`[n, cols]`), in one parallel pass.
pub(crate) fn products<const N: usize>(
    file: &GgufFile,
    matrices: [&Matrix; N],
    x: &[f32],
    n: usize,
    outs: [&mut Vec<f32>; N],
) {
    products_beside(file, matrices, x, n, outs, None);
}

/// [`products`] with `beside`'s tasks in the same dispatch; gives the
/// outputs back as slices.
fn products_beside<'o, const N: usize>(
    file: &GgufFile,
    matrices: [&Matrix; N],
    x: &[f32],
    n: usize,
    mut outs: [&'o mut Vec<f32>; N],
    beside: Option<Beside<'_>>,
) -> [&'o mut [f32]; N] {
    let work: Vec<(&Matrix, OutputRows<'_>)> = matrices
        .iter()
        .zip(outs.iter_mut())
        .map(|(&m, out)| {
            out.resize(m.rows * n, 0.0);
            (m, OutputRows::token_major(out, n))
        })
        .collect();
    matmul_many_beside(file, &work, x, n, beside);
    drop(work);
    outs.map(|out| out.as_mut_slice())
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

/// Adds `bias` to each of its width's rows of `x`.
fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
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
