//! LoRA adapters as llama.cpp writes them (`convert_lora_to_gguf.py`), and
//! their low-rank deltas added per sequence in the fused CPU pass.
//!
//! An adapter file has `general.type = adapter`, `adapter.type = lora`,
//! `adapter.lora.alpha`, and for each adapted weight `W` (`rows × cols`) of
//! its base model two tensors, `<W>.lora_a` (`rank × cols`) and `<W>.lora_b`
//! (`rows × rank`). A sequence with the adapter computes `W x + s · B (A x)`
//! with `s = scale · alpha / rank` (`scale` when alpha is 0), as llama.cpp
//! does. The base product `W x` is shared by every sequence of a batch;
//! only the small delta is per sequence, so sequences with different
//! adapters (or none) run in one step.
//!
//! The factors are small (rank × (rows + cols) values a weight) and kept as
//! f32: the delta is two short matrix–vector products per token.

use crate::gguf::{GgmlType, GgufFile};

use super::config::ModelConfig;
use super::ops::Matrix;
use super::pool::SpinPool;

/// Why an adapter cannot be used with a model.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// The file is not a LoRA adapter.
    #[error("not a LoRA adapter: {0}")]
    NotAnAdapter(String),
    /// The adapter was made for another model.
    #[error("the adapter does not fit this model: {0}")]
    Mismatch(String),
    /// A tensor is missing, misnamed, of the wrong shape or an unreadable type.
    #[error("adapter tensor `{tensor}`: {message}")]
    BadTensor {
        /// The tensor's name.
        tensor: String,
        /// What is wrong.
        message: String,
    },
}

/// The seven weights of a layer a delta may adapt, in the order of
/// `LayerWeights::matrices` (query, key, value, output, gate, up, down).
pub(crate) const TARGETS: usize = 7;

/// One adapted weight's factors.
#[derive(Debug, Clone)]
pub(crate) struct Delta {
    rank: usize,
    /// `rank × cols`, row-major.
    a: Vec<f32>,
    /// `rows × rank`, row-major.
    b: Vec<f32>,
    /// `scale · alpha / rank`.
    scale: f32,
}

/// A LoRA adapter, checked against the model it was loaded for.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    alpha: f32,
    scale: f32,
    /// Per layer, per target, the delta if the adapter adapts it.
    layers: Vec<[Option<Delta>; TARGETS]>,
    /// The base model's shape, to refuse running on another.
    n_embd: usize,
    /// What the factors take in memory.
    bytes: usize,
    /// Names of the adapted base tensors, sorted.
    targets: Vec<String>,
    rank: usize,
}

impl LoraAdapter {
    /// Reads the adapter in `adapter` for the model in `base` (described by
    /// `config`), applied at `scale` (1.0 as trained); every tensor is
    /// checked against the base weight it adapts.
    pub fn load(
        adapter: &GgufFile,
        base: &GgufFile,
        config: &ModelConfig,
        scale: f32,
    ) -> Result<Self, LoraError> {
        let kind = adapter.get_str("general.type").unwrap_or("model");
        if kind != "adapter" {
            return Err(LoraError::NotAnAdapter(format!(
                "its general.type is `{kind}`, not `adapter`"
            )));
        }
        let kind = adapter.get_str("adapter.type").unwrap_or("none");
        if kind != "lora" {
            return Err(LoraError::NotAnAdapter(format!(
                "its adapter.type is `{kind}`; only `lora` is supported"
            )));
        }
        let arch = adapter.get_str("general.architecture").unwrap_or("unknown");
        if arch != config.architecture {
            return Err(LoraError::Mismatch(format!(
                "it adapts a `{arch}` model; this one is `{}`",
                config.architecture
            )));
        }
        if !scale.is_finite() {
            return Err(LoraError::Mismatch(format!("scale {scale} is not finite")));
        }
        let alpha = adapter.get_f64("adapter.lora.alpha").unwrap_or(0.0) as f32;
        let mut layers: Vec<[Option<Delta>; TARGETS]> =
            (0..config.n_layer).map(|_| Default::default()).collect();
        let mut targets = Vec::new();
        let mut bytes = 0;
        let mut rank = 0;
        for t in adapter.tensors() {
            let Some(weight) = t.name.strip_suffix(".lora_a") else {
                if !t.name.ends_with(".lora_b") {
                    return Err(bad(
                        &t.name,
                        "is neither a `.lora_a` nor a `.lora_b` factor",
                    ));
                }
                if adapter
                    .tensor(&format!("{}.lora_a", &t.name[..t.name.len() - 7]))
                    .is_err()
                {
                    return Err(bad(&t.name, "has no `.lora_a` factor beside it"));
                }
                continue;
            };
            let b_name = format!("{weight}.lora_b");
            let (layer, mut slots) = target(weight, config)
                .ok_or_else(|| bad(&t.name, &format!("adapting `{weight}` is not supported")))?;
            // Without a gate, `ffn_up` holds the gate's rows then the up's (phi3).
            if weight.ends_with(".ffn_up.weight")
                && base
                    .tensor(&format!("blk.{layer}.ffn_gate.weight"))
                    .is_err()
            {
                slots = vec![(4, config.n_ff), (5, config.n_ff)];
            }
            let w = base
                .tensor(weight)
                .ok()
                .and_then(Matrix::from_tensor)
                .ok_or_else(|| bad(&t.name, &format!("the base model has no matrix `{weight}`")))?;
            let a = factor(adapter, &t.name)?;
            let b = factor(adapter, &b_name)?;
            let r = a.rows;
            if r == 0 || a.cols != w.cols {
                return Err(bad(
                    &t.name,
                    &format!(
                        "shape {}x{}, expected rank x {} for `{weight}`",
                        a.rows, a.cols, w.cols
                    ),
                ));
            }
            let fed: usize = slots.iter().map(|&(_, rows)| rows).sum();
            if b.cols != r || b.rows != w.rows || fed != w.rows {
                return Err(bad(
                    &b_name,
                    &format!(
                        "shape {}x{}, expected {}x{r} for `{weight}`",
                        b.rows, b.cols, w.rows
                    ),
                ));
            }
            let a_values = a.values(adapter);
            let b_values = b.values(adapter);
            bytes += (a_values.len() + b_values.len()) * 4;
            rank = rank.max(r);
            let s = if alpha != 0.0 {
                scale * alpha / r as f32
            } else {
                scale
            };
            // A fused weight (phi3's `attn_qkv`, `ffn_up`) feeds several
            // targets: each takes its rows of `B`.
            let mut first = 0;
            for (slot, rows) in slots {
                layers[layer][slot] = Some(Delta {
                    rank: r,
                    a: a_values.clone(),
                    b: b_values[first * r..(first + rows) * r].to_vec(),
                    scale: s,
                });
                first += rows;
            }
            targets.push(weight.to_string());
        }
        if targets.is_empty() {
            return Err(LoraError::NotAnAdapter(
                "it has no `.lora_a`/`.lora_b` tensors".into(),
            ));
        }
        targets.sort();
        Ok(LoraAdapter {
            alpha,
            scale,
            layers,
            n_embd: config.n_embd,
            bytes,
            targets,
            rank,
        })
    }

    /// `adapter.lora.alpha`.
    pub fn alpha(&self) -> f32 {
        self.alpha
    }

    /// The scale it is applied at.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// The largest rank among its weights.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The base tensors it adapts, sorted.
    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    /// Bytes its factors take in memory.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether it was loaded for a model shaped as `config`.
    pub(crate) fn fits(&self, config: &ModelConfig) -> bool {
        self.layers.len() == config.n_layer && self.n_embd == config.n_embd
    }

    fn delta(&self, layer: usize, slot: usize) -> Option<&Delta> {
        self.layers.get(layer)?[slot].as_ref()
    }
}

/// Adds to `out` (`n` token rows, token-major) the delta of target `slot`
/// of layer `layer` for each token whose adapter (`adapters[t]`) adapts
/// it, given the layer's input `x` (`cols` values a row). Spread over the
/// pool: first `A x` of every adapted token, then `B` times that, in
/// pieces of output rows.
pub(crate) fn add_deltas(
    adapters: &[Option<&LoraAdapter>],
    layer: usize,
    slot: usize,
    x: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    let deltas: Vec<Option<&Delta>> = adapters
        .iter()
        .map(|a| a.and_then(|a| a.delta(layer, slot)))
        .collect();
    let Some(widest) = deltas.iter().flatten().map(|d| d.rank).max() else {
        return;
    };
    let n = adapters.len();
    let out_cols = out.len() / n.max(1);
    let pool = SpinPool::global();
    let mut inner = vec![0f32; n * widest];
    pool.run_chunks(&mut inner, widest, &|t, piece| {
        if let Some(d) = deltas[t] {
            let xt = &x[t * cols..(t + 1) * cols];
            for (v, a) in piece.iter_mut().zip(d.a.chunks_exact(cols)) {
                *v = dot(a, xt) * d.scale;
            }
        }
    });
    // Pieces within one token's row: a quarter of it, so that even one
    // token is spread over the pool.
    let piece = if out_cols.is_multiple_of(4) && n < 4 {
        out_cols / 4
    } else {
        out_cols
    };
    pool.run_chunks(out, piece, &|i, rows| {
        let start = i * piece;
        let t = start / out_cols;
        let Some(d) = deltas[t] else {
            return;
        };
        let first = start % out_cols;
        let v = &inner[t * widest..t * widest + d.rank];
        let b = &d.b[first * d.rank..(first + rows.len()) * d.rank];
        for (y, b) in rows.iter_mut().zip(b.chunks_exact(d.rank)) {
            *y += dot(b, v);
        }
    });
}

fn bad(tensor: &str, message: &str) -> LoraError {
    LoraError::BadTensor {
        tensor: tensor.into(),
        message: message.into(),
    }
}

/// A factor tensor, of a type whose values can be read.
fn factor(file: &GgufFile, name: &str) -> Result<Matrix, LoraError> {
    let t = file
        .tensor(name)
        .map_err(|_| bad(name, "is missing (every `.lora_a` needs its `.lora_b`)"))?;
    if !matches!(t.ggml_type, GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0) {
        return Err(bad(
            name,
            &format!("type {} is not supported (F32, F16 or Q8_0)", t.ggml_type),
        ));
    }
    Matrix::from_tensor(t).ok_or_else(|| bad(name, "its shape does not fit its type's blocks"))
}

impl Matrix {
    /// Every value, row-major.
    fn values(&self, file: &GgufFile) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.row(file, r, row);
        }
        out
    }
}

/// The layer of the base weight `name` and the targets it feeds, each with
/// its rows (one target, or the parts of a fused weight in order).
fn target(name: &str, c: &ModelConfig) -> Option<(usize, Vec<(usize, usize)>)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, weight) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer >= c.n_layer {
        return None;
    }
    let (q, kv) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
    let slots = match weight {
        "attn_q.weight" => vec![(0, q)],
        "attn_k.weight" => vec![(1, kv)],
        "attn_v.weight" => vec![(2, kv)],
        "attn_qkv.weight" => vec![(0, q), (1, kv), (2, kv)],
        "attn_output.weight" => vec![(3, c.n_embd)],
        "ffn_gate.weight" => vec![(4, c.n_ff)],
        "ffn_up.weight" => vec![(5, c.n_ff)],
        "ffn_down.weight" => vec![(6, c.n_embd)],
        _ => return None,
    };
    Some((layer, slots))
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Four accumulators: the compiler vectorizes this.
    let mut acc = [0f32; 4];
    let (a4, a_rest) = a.split_at(a.len() / 4 * 4);
    let (b4, b_rest) = b.split_at(a4.len());
    for (x, y) in a4.chunks_exact(4).zip(b4.chunks_exact(4)) {
        for k in 0..4 {
            acc[k] += x[k] * y[k];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}
