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
    let linear = |name: &str, cols, rows| -> Result<Matrix, ModelError> {
        let mut m = matrix(file, name, cols, rows)?;
        if interleave {
            m.interleave(file);
        }
        Ok(m)
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
        let q_norm = optional(n("attn_q_norm.weight"), c.head_dim)?;
        let k_norm = optional(n("attn_k_norm.weight"), c.head_dim)?;
        if c.qk_norm && (q_norm.is_none() || k_norm.is_none()) {
            return Err(ModelError::BadTensor {
                tensor: n("attn_q_norm.weight"),
                message: "query/key norms are required by this architecture".into(),
            });
        }
        layers.push(LayerWeights {
            attn_norm: norm(&n("attn_norm.weight"), c.n_embd)?,
            wq: linear(&n("attn_q.weight"), c.n_embd, q_dim)?,
            wk: linear(&n("attn_k.weight"), c.n_embd, kv_dim)?,
            wv: linear(&n("attn_v.weight"), c.n_embd, kv_dim)?,
            wo: linear(&n("attn_output.weight"), q_dim, c.n_embd)?,
            q_norm,
            k_norm,
            post_attn_norm: optional(n("post_attention_norm.weight"), c.n_embd)?,
            ffn_norm: norm(&n("ffn_norm.weight"), c.n_embd)?,
            gate: linear(&n("ffn_gate.weight"), c.n_embd, c.n_ff)?,
            up: linear(&n("ffn_up.weight"), c.n_embd, c.n_ff)?,
            down: linear(&n("ffn_down.weight"), c.n_ff, c.n_embd)?,
            post_ffn_norm: optional(n("post_ffw_norm.weight"), c.n_embd)?,
        });
    }
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
    })
}

impl<L, N> LayerWeights<L, N> {
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
