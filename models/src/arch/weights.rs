//! Reading a transformer's weights out of a GGUF file by their llama.cpp
//! names, shared by both backends: each says how it keeps a matrix and a
//! norm vector, this module finds, shape-checks and names them.

use crate::gguf::GgufFile;

use super::config::ModelConfig;
use super::ops::Matrix;
use super::transformer::ModelError;

/// One decoder layer's weights, with matrices kept as `L` and norm vectors as `N`.
pub(crate) struct LayerWeights<L, N> {
    pub(crate) attn_norm: N,
    pub(crate) wq: L,
    pub(crate) wk: L,
    pub(crate) wv: L,
    pub(crate) wo: L,
    /// Query, key and value biases (qwen2, and any file that has them).
    pub(crate) bq: Option<N>,
    pub(crate) bk: Option<N>,
    pub(crate) bv: Option<N>,
    pub(crate) q_norm: Option<N>,
    pub(crate) k_norm: Option<N>,
    pub(crate) post_attn_norm: Option<N>,
    pub(crate) ffn_norm: N,
    pub(crate) gate: L,
    pub(crate) up: L,
    pub(crate) down: L,
    pub(crate) post_ffn_norm: Option<N>,
}

impl<L, N> LayerWeights<L, N> {
    /// The layer's seven matrices.
    pub(crate) fn matrices(&self) -> [&L; 7] {
        [
            &self.wq, &self.wk, &self.wv, &self.wo, &self.gate, &self.up, &self.down,
        ]
    }
}

/// A whole model's weights, as [`LayerWeights`].
pub(crate) struct Weights<L, N> {
    /// Token embeddings, looked up by row in the mapped file (quantized).
    pub(crate) token_embd: Matrix,
    /// The output projection (the embeddings again when the file ties them).
    pub(crate) output: L,
    pub(crate) output_norm: N,
    pub(crate) layers: Vec<LayerWeights<L, N>>,
    /// Per rotated pair, a divisor of its rotation frequency (Llama 3's
    /// `rope_freqs`, Phi-3's LongRoPE factors).
    pub(crate) rope_factors: Option<Vec<f32>>,
}

/// The matrix `name`, checked to be `rows × cols` of a type the kernels read.
pub(crate) fn matrix(
    file: &GgufFile,
    name: &str,
    cols: usize,
    rows: usize,
) -> Result<Matrix, ModelError> {
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
}

/// The vector `name` of `len` values, dequantized (norm weights are small).
pub(crate) fn vector(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let m = matrix(file, name, len, 1)?;
    let mut v = vec![0f32; len];
    m.row(file, 0, &mut v);
    Ok(v)
}

/// The weights as read from the file: quantized matrices, f32 norms.
pub(crate) type FileWeights = Weights<Matrix, Vec<f32>>;

/// Reads every weight of the model `c` describes. With `interleave`, matrices
/// the CPU kernels read interleaved are copied so ([`Matrix::interleave`]).
pub(crate) fn load(
    file: &GgufFile,
    c: &ModelConfig,
    interleave: bool,
) -> Result<FileWeights, ModelError> {
    let prepare = |mut m: Matrix| {
        if interleave {
            m.interleave(file);
        }
        m
    };
    let linear = |name: &str, cols, rows| -> Result<Matrix, ModelError> {
        Ok(prepare(matrix(file, name, cols, rows)?))
    };
    let norm = |name: &str, len| vector(file, name, len);
    let present = |name: &str| file.tensor(name).is_ok();
    let (q_dim, kv_dim) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
    let mut layers = Vec::with_capacity(c.n_layer);
    for i in 0..c.n_layer {
        let n = |s: &str| format!("blk.{i}.{s}");
        let optional = |name: String, len| -> Result<Option<Vec<f32>>, ModelError> {
            present(&name).then(|| norm(&name, len)).transpose()
        };
        let attn_norm = norm(&n("attn_norm.weight"), c.n_embd)?;
        let q_norm = optional(n("attn_q_norm.weight"), c.head_dim)?;
        let k_norm = optional(n("attn_k_norm.weight"), c.head_dim)?;
        if c.qk_norm && (q_norm.is_none() || k_norm.is_none()) {
            return Err(ModelError::BadTensor {
                tensor: n("attn_q_norm.weight"),
                message: "query/key norms are required by this architecture".into(),
            });
        }
        for unused in [
            "attn_output.bias",
            "ffn_up.bias",
            "ffn_down.bias",
            "ffn_gate.bias",
        ] {
            if present(&n(unused)) {
                return Err(ModelError::BadTensor {
                    tensor: n(unused),
                    message: "this bias is not supported".into(),
                });
            }
        }
        // Query, key and value projections: separate, or fused in one
        // tensor of their rows one after another (phi3).
        let (wq, wk, wv) = if present(&n("attn_qkv.weight")) {
            let fused = matrix(file, &n("attn_qkv.weight"), c.n_embd, q_dim + 2 * kv_dim)?;
            let part = |start, rows| split(&fused, start, rows, &n("attn_qkv.weight"));
            (
                part(0, q_dim)?,
                part(q_dim, kv_dim)?,
                part(q_dim + kv_dim, kv_dim)?,
            )
        } else {
            (
                matrix(file, &n("attn_q.weight"), c.n_embd, q_dim)?,
                matrix(file, &n("attn_k.weight"), c.n_embd, kv_dim)?,
                matrix(file, &n("attn_v.weight"), c.n_embd, kv_dim)?,
            )
        };
        let (bq, bk, bv) = match optional(n("attn_qkv.bias"), q_dim + 2 * kv_dim)? {
            Some(b) => (
                Some(b[..q_dim].to_vec()),
                Some(b[q_dim..q_dim + kv_dim].to_vec()),
                Some(b[q_dim + kv_dim..].to_vec()),
            ),
            None => (
                optional(n("attn_q.bias"), q_dim)?,
                optional(n("attn_k.bias"), kv_dim)?,
                optional(n("attn_v.bias"), kv_dim)?,
            ),
        };
        // The feed-forward gate and up projections: separate, or fused as
        // the gate's rows then the up's (phi3).
        let (gate, up) = if present(&n("ffn_gate.weight")) {
            (
                matrix(file, &n("ffn_gate.weight"), c.n_embd, c.n_ff)?,
                matrix(file, &n("ffn_up.weight"), c.n_embd, c.n_ff)?,
            )
        } else {
            let fused = matrix(file, &n("ffn_up.weight"), c.n_embd, 2 * c.n_ff)?;
            (
                split(&fused, 0, c.n_ff, &n("ffn_up.weight"))?,
                split(&fused, c.n_ff, c.n_ff, &n("ffn_up.weight"))?,
            )
        };
        layers.push(LayerWeights {
            attn_norm,
            wq: prepare(wq),
            wk: prepare(wk),
            wv: prepare(wv),
            wo: linear(&n("attn_output.weight"), q_dim, c.n_embd)?,
            bq,
            bk,
            bv,
            q_norm,
            k_norm,
            post_attn_norm: optional(n("post_attention_norm.weight"), c.n_embd)?,
            ffn_norm: norm(&n("ffn_norm.weight"), c.n_embd)?,
            gate: prepare(gate),
            up: prepare(up),
            down: linear(&n("ffn_down.weight"), c.n_ff, c.n_embd)?,
            post_ffn_norm: optional(n("post_ffw_norm.weight"), c.n_embd)?,
        });
    }
    let rope_factors = rope_factors(file, c)?;
    let token_embd = linear("token_embd.weight", c.n_embd, c.vocab_size)?;
    // A file without an output projection ties it to the embeddings: one copy.
    let output = if present("output.weight") {
        linear("output.weight", c.n_embd, c.vocab_size)?
    } else {
        token_embd.clone()
    };
    let output_norm = norm("output_norm.weight", c.n_embd)?;
    // Reading each tensor mapped the first pages of its neighbours back in
    // (the kernel maps pages around a fault); let them go again.
    for layer in &layers {
        layer.matrices().iter().for_each(|m| m.release_copied(file));
    }
    output.release_copied(file);
    token_embd.release_copied(file);
    Ok(Weights {
        token_embd,
        output,
        output_norm,
        layers,
        rope_factors,
    })
}

/// Rows `start..start + rows` of the fused tensor `fused` (named `name`).
fn split(fused: &Matrix, start: usize, rows: usize, name: &str) -> Result<Matrix, ModelError> {
    fused
        .rows_slice(start, rows)
        .ok_or_else(|| ModelError::BadTensor {
            tensor: name.into(),
            message: format!("has no rows {start}..{}", start + rows),
        })
}

/// The rope frequency factors of the model, if its file has them: Llama 3's
/// `rope_freqs.weight`, or Phi-3's LongRoPE factors (the long ones when the
/// context is longer than the one the model was trained on, as llama.cpp
/// chooses for a sequence of the whole context).
fn rope_factors(file: &GgufFile, c: &ModelConfig) -> Result<Option<Vec<f32>>, ModelError> {
    let pairs = c.rope_dims / 2;
    let trained = file
        .get_u64(&format!(
            "{}.rope.scaling.original_context_length",
            c.architecture
        ))
        .map_or(c.context_length, |v| v as usize);
    let name = if file.tensor("rope_freqs.weight").is_ok() {
        "rope_freqs.weight"
    } else if c.context_length > trained && file.tensor("rope_factors_long.weight").is_ok() {
        "rope_factors_long.weight"
    } else if file.tensor("rope_factors_short.weight").is_ok() {
        "rope_factors_short.weight"
    } else {
        return Ok(None);
    };
    let factors = vector(file, name, pairs)?;
    if let Some(bad) = factors.iter().find(|f| !(**f > 0.0 && f.is_finite())) {
        return Err(ModelError::BadTensor {
            tensor: name.into(),
            message: format!("holds {bad}; rope factors must be positive"),
        });
    }
    Ok(Some(factors))
}

impl<L, N> LayerWeights<L, N> {
    /// The same layer with `matrices` (in [`LayerWeights::matrices`]'s
    /// order) in place of its own.
    pub(crate) fn with_matrices<L2>(self, matrices: [L2; 7]) -> LayerWeights<L2, N> {
        let [wq, wk, wv, wo, gate, up, down] = matrices;
        LayerWeights {
            attn_norm: self.attn_norm,
            wq,
            wk,
            wv,
            wo,
            bq: self.bq,
            bk: self.bk,
            bv: self.bv,
            q_norm: self.q_norm,
            k_norm: self.k_norm,
            post_attn_norm: self.post_attn_norm,
            ffn_norm: self.ffn_norm,
            gate,
            up,
            down,
            post_ffn_norm: self.post_ffn_norm,
        }
    }

    /// The same layer with its matrices made by `linear` and norms by `norm`.
    pub(crate) fn map<L2, N2>(
        self,
        mut linear: impl FnMut(L) -> L2,
        mut norm: impl FnMut(N) -> N2,
    ) -> LayerWeights<L2, N2> {
        LayerWeights {
            attn_norm: norm(self.attn_norm),
            wq: linear(self.wq),
            wk: linear(self.wk),
            wv: linear(self.wv),
            wo: linear(self.wo),
            bq: self.bq.map(&mut norm),
            bk: self.bk.map(&mut norm),
            bv: self.bv.map(&mut norm),
            q_norm: self.q_norm.map(&mut norm),
            k_norm: self.k_norm.map(&mut norm),
            post_attn_norm: self.post_attn_norm.map(&mut norm),
            ffn_norm: norm(self.ffn_norm),
            gate: linear(self.gate),
            up: linear(self.up),
            down: linear(self.down),
            post_ffn_norm: self.post_ffn_norm.map(&mut norm),
        }
    }
}
