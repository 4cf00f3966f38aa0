//! The decoder-only transformer forward pass, one token at a time, with a
//! per-sequence KV cache.

use std::sync::Arc;

use crate::gguf::{GgufError, GgufFile};

use super::config::{Activation, ModelConfig, RopeStyle};
use super::ops::{self, Matrix};

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file is unreadable or lacks what the architecture needs.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A tensor's shape or type does not fit the architecture.
    #[error("tensor `{tensor}`: {message}")]
    BadTensor { tensor: String, message: String },
    /// A token id outside the vocabulary.
    #[error("token id {0} is outside the vocabulary")]
    BadToken(u32),
    /// The sequence is as long as its context allows.
    #[error("the context is full ({0} tokens)")]
    ContextFull(usize),
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate: Matrix,
    up: Matrix,
    down: Matrix,
    post_ffn_norm: Option<Vec<f32>>,
}

/// A loaded model: its configuration and weights (quantized, in the mapped file).
pub struct Model {
    file: Arc<GgufFile>,
    config: ModelConfig,
    token_embd: Matrix,
    output: Matrix,
    output_norm: Vec<f32>,
    layers: Vec<Layer>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish()
    }
}

/// One sequence's state: its KV cache and position.
#[derive(Debug, Clone)]
pub struct Sequence {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    kv_dim: usize,
    len: usize,
    capacity: usize,
}

impl Sequence {
    /// Tokens processed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything after the first `len` tokens.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for cache in self.keys.iter_mut().chain(self.values.iter_mut()) {
            cache.truncate(self.len * self.kv_dim);
        }
    }
}

impl Model {
    /// Loads the model in `file`.
    pub fn load(file: Arc<GgufFile>) -> Result<Self, ModelError> {
        let config = ModelConfig::from_gguf(&file)?;
        let c = &config;
        let matrix = |name: &str, cols: usize, rows: usize| -> Result<Matrix, ModelError> {
            let t = file.tensor(name)?;
            let m = Matrix::from_tensor(t).ok_or_else(|| ModelError::BadTensor {
                tensor: name.into(),
                message: format!("type {} cannot be used as a matrix", t.ggml_type),
            })?;
            if m.cols != cols || m.rows != rows {
                return Err(ModelError::BadTensor {
                    tensor: name.into(),
                    message: format!("shape {}x{}, expected {rows}x{cols}", m.rows, m.cols),
                });
            }
            Ok(m)
        };
        let vector = |name: &str, len: usize| -> Result<Vec<f32>, ModelError> {
            let m = matrix(name, len, 1)?;
            let mut v = vec![0f32; len];
            m.row(&file, 0, &mut v);
            Ok(v)
        };
        let optional = |name: &str, len: usize| -> Result<Option<Vec<f32>>, ModelError> {
            match file.tensor(name) {
                Ok(_) => vector(name, len).map(Some),
                Err(_) => Ok(None),
            }
        };
        let (q_dim, kv_dim) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            let layer = Layer {
                attn_norm: vector(&n("attn_norm.weight"), c.n_embd)?,
                wq: matrix(&n("attn_q.weight"), c.n_embd, q_dim)?,
                wk: matrix(&n("attn_k.weight"), c.n_embd, kv_dim)?,
                wv: matrix(&n("attn_v.weight"), c.n_embd, kv_dim)?,
                wo: matrix(&n("attn_output.weight"), q_dim, c.n_embd)?,
                q_norm: optional(&n("attn_q_norm.weight"), c.head_dim)?,
                k_norm: optional(&n("attn_k_norm.weight"), c.head_dim)?,
                post_attn_norm: optional(&n("post_attention_norm.weight"), c.n_embd)?,
                ffn_norm: vector(&n("ffn_norm.weight"), c.n_embd)?,
                gate: matrix(&n("ffn_gate.weight"), c.n_embd, c.n_ff)?,
                up: matrix(&n("ffn_up.weight"), c.n_embd, c.n_ff)?,
                down: matrix(&n("ffn_down.weight"), c.n_ff, c.n_embd)?,
                post_ffn_norm: optional(&n("post_ffw_norm.weight"), c.n_embd)?,
            };
            if c.qk_norm && (layer.q_norm.is_none() || layer.k_norm.is_none()) {
                return Err(ModelError::BadTensor {
                    tensor: n("attn_q_norm.weight"),
                    message: "query/key norms are required by this architecture".into(),
                });
            }
            layers.push(layer);
        }
        let token_embd = matrix("token_embd.weight", c.n_embd, c.vocab_size)?;
        let output = match file.tensor("output.weight") {
            Ok(_) => matrix("output.weight", c.n_embd, c.vocab_size)?,
            Err(_) => token_embd.clone(),
        };
        let output_norm = vector("output_norm.weight", c.n_embd)?;
        Ok(Model {
            config,
            token_embd,
            output,
            output_norm,
            layers,
            file,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The file the model was loaded from.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// An empty sequence holding up to `capacity` tokens (at most the context length).
    pub fn new_sequence(&self, capacity: usize) -> Sequence {
        let capacity = capacity.min(self.config.context_length).max(1);
        let kv_dim = self.config.n_head_kv * self.config.head_dim;
        // Reserve for short sequences up front; long ones grow as they go.
        let reserve = capacity.min(1024) * kv_dim;
        Sequence {
            keys: vec![Vec::with_capacity(reserve); self.config.n_layer],
            values: vec![Vec::with_capacity(reserve); self.config.n_layer],
            kv_dim,
            len: 0,
            capacity,
        }
    }

    /// Runs `token` through the model at the sequence's next position and
    /// returns the logits of the token after it.
    pub fn forward(&self, seq: &mut Sequence, token: u32) -> Result<Vec<f32>, ModelError> {
        let hidden = self.forward_hidden(seq, token)?;
        Ok(self.logits(&hidden))
    }

    /// The logits for a final hidden state.
    pub fn logits(&self, hidden: &[f32]) -> Vec<f32> {
        let mut logits = vec![0f32; self.config.vocab_size];
        self.output.matvec(&self.file, hidden, &mut logits);
        logits
    }

    /// Runs `token` through the model at the sequence's next position and
    /// returns the final (normalized) hidden state.
    pub fn forward_hidden(&self, seq: &mut Sequence, token: u32) -> Result<Vec<f32>, ModelError> {
        let c = &self.config;
        let file = &*self.file;
        if token as usize >= c.vocab_size {
            return Err(ModelError::BadToken(token));
        }
        if seq.len >= seq.capacity {
            return Err(ModelError::ContextFull(seq.capacity));
        }
        let pos = seq.len;
        let (hd, q_dim, kv_dim) = (c.head_dim, c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
        let group = c.n_head / c.n_head_kv;

        let mut x = vec![0f32; c.n_embd];
        self.token_embd.row(file, token as usize, &mut x);
        if c.embed_scale != 1.0 {
            x.iter_mut().for_each(|v| *v *= c.embed_scale);
        }
        let mut h = vec![0f32; c.n_embd];
        let mut q = vec![0f32; q_dim];
        let mut k = vec![0f32; kv_dim];
        let mut v = vec![0f32; kv_dim];
        let mut attn = vec![0f32; q_dim];
        let mut proj = vec![0f32; c.n_embd];
        let mut gate = vec![0f32; c.n_ff];
        let mut up = vec![0f32; c.n_ff];
        let mut scores = Vec::with_capacity(pos + 1);

        for (il, layer) in self.layers.iter().enumerate() {
            ops::rms_norm(&x, &layer.attn_norm, c.rms_eps, &mut h);
            ops::matvec_many(
                file,
                &mut [
                    (&layer.wq, &mut q),
                    (&layer.wk, &mut k),
                    (&layer.wv, &mut v),
                ],
                &h,
            );
            let local = c.is_local(il);
            let base = if local {
                c.rope_base_local
            } else {
                c.rope_base
            };
            let halves = c.rope_style == RopeStyle::Halves;
            for head in q.chunks_exact_mut(hd) {
                if let Some(norm) = &layer.q_norm {
                    ops::rms_norm_in_place(head, norm, c.rms_eps);
                }
                ops::rope(head, pos, c.rope_dims, base, halves);
            }
            for head in k.chunks_exact_mut(hd) {
                if let Some(norm) = &layer.k_norm {
                    ops::rms_norm_in_place(head, norm, c.rms_eps);
                }
                ops::rope(head, pos, c.rope_dims, base, halves);
            }
            seq.keys[il].extend_from_slice(&k);
            seq.values[il].extend_from_slice(&v);
            let first = match (local, c.sliding_window) {
                (true, Some(window)) => (pos + 1).saturating_sub(window),
                _ => 0,
            };
            let (keys, values) = (&seq.keys[il], &seq.values[il]);
            for (h_idx, (qh, out)) in q
                .chunks_exact(hd)
                .zip(attn.chunks_exact_mut(hd))
                .enumerate()
            {
                let kv = h_idx / group;
                scores.clear();
                for t in first..=pos {
                    let kt = &keys[t * kv_dim + kv * hd..t * kv_dim + (kv + 1) * hd];
                    scores.push(ops::dot(qh, kt) * c.query_scale);
                }
                ops::softmax(&mut scores);
                out.fill(0.0);
                for (t, &p) in (first..=pos).zip(&scores) {
                    let vt = &values[t * kv_dim + kv * hd..t * kv_dim + (kv + 1) * hd];
                    for (o, val) in out.iter_mut().zip(vt) {
                        *o += p * val;
                    }
                }
            }
            layer.wo.matvec(file, &attn, &mut proj);
            if let Some(norm) = &layer.post_attn_norm {
                ops::rms_norm_in_place(&mut proj, norm, c.rms_eps);
            }
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);

            ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps, &mut h);
            ops::matvec_many(
                file,
                &mut [(&layer.gate, &mut gate), (&layer.up, &mut up)],
                &h,
            );
            let act = match c.activation {
                Activation::Silu => ops::silu,
                Activation::GeluTanh => ops::gelu_tanh,
            };
            gate.iter_mut().zip(&up).for_each(|(g, u)| *g = act(*g) * u);
            layer.down.matvec(file, &gate, &mut proj);
            if let Some(norm) = &layer.post_ffn_norm {
                ops::rms_norm_in_place(&mut proj, norm, c.rms_eps);
            }
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        }
        seq.len += 1;
        ops::rms_norm_in_place(&mut x, &self.output_norm, c.rms_eps);
        Ok(x)
    }
}
