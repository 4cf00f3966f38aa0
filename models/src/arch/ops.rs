//! The small numeric kernels of the forward pass.

use rayon::prelude::*;

use crate::gguf::{GgmlType, GgufFile, TensorInfo};
use crate::quant::{
    DotFn, Q8Activations, Q8DotFn, dequantize_row, dot_dequantized, kernel, q8_kernel,
};

/// A weight matrix in its file encoding: `rows` outputs of `cols` inputs each,
/// row-major (ggml's `ne0 = cols`).
#[derive(Debug, Clone)]
pub struct Matrix {
    pub(crate) ty: GgmlType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) offset: usize,
    pub(crate) size: usize,
    /// The fused kernel for this type against f32 activations, if there is one.
    dot: Option<DotFn>,
    /// The integer kernel against 8-bit activations, if there is one (preferred).
    q8: Option<Q8DotFn>,
}

impl Matrix {
    pub(crate) fn from_tensor(t: &TensorInfo) -> Option<Self> {
        let (&cols, rest) = t.dims.split_first()?;
        let rows: u64 = rest.iter().product();
        let (block, _) = t.ggml_type.block_layout()?;
        if !(cols as usize).is_multiple_of(block) {
            return None;
        }
        Some(Matrix {
            ty: t.ggml_type,
            rows: rows as usize,
            cols: cols as usize,
            offset: t.offset,
            size: t.size,
            dot: kernel(t.ggml_type),
            q8: q8_kernel(t.ggml_type),
        })
    }

    fn row_bytes(&self) -> usize {
        let (block, size) = self.ty.block_layout().expect("checked in from_tensor");
        self.cols / block * size
    }

    /// Row `row` as f32.
    pub(crate) fn row(&self, file: &GgufFile, row: usize, out: &mut [f32]) {
        let bytes = self.bytes(file);
        let stride = self.row_bytes();
        dequantize_row(self.ty, &bytes[row * stride..(row + 1) * stride], 0, out)
            .expect("whole blocks");
    }

    fn bytes<'f>(&self, file: &'f GgufFile) -> &'f [u8] {
        file.bytes_at(self.offset, self.size)
    }

    /// `out = self · x`, rows split across threads.
    pub(crate) fn matvec(&self, file: &GgufFile, x: &[f32], out: &mut [f32]) {
        matvec_many(file, &mut [(self, out)], x);
    }

    /// Rows `first..first + out.len()` of `self · x`.
    fn rows_into(
        &self,
        bytes: &[u8],
        first: usize,
        out: &mut [f32],
        x: &[f32],
        acts: Option<&Q8Activations>,
        scratch: &mut Vec<f32>,
    ) {
        let stride = self.row_bytes();
        let row = |r: usize| &bytes[r * stride..(r + 1) * stride];
        match (self.q8, acts, self.dot) {
            (Some(q8), Some(acts), _) => {
                for (i, y) in out.iter_mut().enumerate() {
                    *y = q8(row(first + i), acts);
                }
            }
            (_, _, Some(dot)) => {
                for (i, y) in out.iter_mut().enumerate() {
                    *y = dot(row(first + i), x);
                }
            }
            _ => {
                for (i, y) in out.iter_mut().enumerate() {
                    *y = dot_dequantized(self.ty, row(first + i), x, scratch);
                }
            }
        }
    }
}

/// `out_i = m_i · x` for several matrices sharing one input, in a single
/// parallel pass: one fork/join instead of one per matrix, and the input is
/// quantized (for integer kernels) only once.
pub(crate) fn matvec_many(file: &GgufFile, work: &mut [(&Matrix, &mut [f32])], x: &[f32]) {
    let acts = work.iter().any(|(m, _)| m.q8.is_some()).then(|| {
        let mut acts = Q8Activations::default();
        acts.quantize(x);
        acts
    });
    let threads = rayon::current_num_threads();
    let mut tasks: Vec<(&Matrix, usize, &mut [f32])> = Vec::new();
    for (m, out) in work.iter_mut() {
        debug_assert_eq!(x.len(), m.cols);
        debug_assert_eq!(out.len(), m.rows);
        // Enough rows per task that fork/join overhead stays small, enough tasks to balance.
        let per_task = (m.rows / (4 * threads)).max(64);
        for (c, chunk) in out.chunks_mut(per_task).enumerate() {
            tasks.push((*m, c * per_task, chunk));
        }
    }
    tasks
        .into_par_iter()
        .for_each_init(Vec::new, |scratch, (m, first, out)| {
            m.rows_into(m.bytes(file), first, out, x, acts.as_ref(), scratch);
        });
}

/// Dot product.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight accumulators let the compiler vectorize without reassociation flags.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += ca[k] * cb[k];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for k in chunks..a.len() {
        sum += a[k] * b[k];
    }
    sum
}

/// RMS norm of `x` scaled by `weight`, into `out`.
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean_sq + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// RMS norm in place.
pub(crate) fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean_sq + eps).sqrt();
    for (v, w) in x.iter_mut().zip(weight) {
        *v *= scale * w;
    }
}

/// Rotates one head's first `dims` dimensions for position `pos`.
pub(crate) fn rope(head: &mut [f32], pos: usize, dims: usize, base: f32, halves: bool) {
    let half = dims / 2;
    for i in 0..half {
        let theta = pos as f32 * base.powf(-2.0 * i as f32 / dims as f32);
        let (sin, cos) = theta.sin_cos();
        let (a, b) = if halves {
            (i, i + half)
        } else {
            (2 * i, 2 * i + 1)
        };
        let (x0, x1) = (head[a], head[b]);
        head[a] = x0 * cos - x1 * sin;
        head[b] = x0 * sin + x1 * cos;
    }
}

/// Softmax in place.
pub(crate) fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// SiLU.
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation.
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}
