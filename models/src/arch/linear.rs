//! The Burn graph's linear layers: a weight matrix applied to a batch of
//! activation rows.
//!
//! On Burn's CPU backend the weights stay quantized in the mapped file and
//! the product runs on the blocks (Realm's kernels, 8-bit activations where a
//! kernel takes them); on the GPU they are dequantized once, at load, into a
//! dense f32 Burn tensor and multiplied by Burn.

use burn_tensor::{Device, Tensor, TensorData};

use crate::gguf::GgufFile;

use super::graph::to_vec;
use super::ops::{Matrix, matmul_many};
use crate::quant::OutputRows;

/// One weight matrix, kept as the device runs it best.
pub(crate) enum Linear {
    /// Quantized blocks in the mapped file.
    Quantized(Matrix),
    /// Dense `[rows, cols]` f32 weights on the device.
    Dense(Tensor<2>),
}

impl Linear {
    /// `matrix` dequantized into a dense tensor on `device`.
    pub(crate) fn dense(matrix: &Matrix, file: &GgufFile, device: &Device) -> Self {
        let data = TensorData::new(matrix.values(file), [matrix.rows, matrix.cols]);
        Linear::Dense(Tensor::from_data(data, device))
    }
}

/// `x · Wᵢᵀ` for each of `layers`, all sharing the input `x` (`[n, cols]`);
/// each result is `[n, rows_i]`. Quantized layers run in one parallel pass
/// of Realm's kernels, dense ones as Burn products on the device.
pub(crate) fn apply<const N: usize>(
    file: &GgufFile,
    layers: [&Linear; N],
    x: Tensor<2>,
) -> [Tensor<2>; N] {
    let [n, _] = x.dims();
    let device = x.device();
    let matrices: Vec<&Matrix> = layers
        .iter()
        .filter_map(|l| match l {
            Linear::Quantized(m) => Some(m),
            Linear::Dense(_) => None,
        })
        .collect();
    let mut outputs: Vec<Vec<f32>> = matrices.iter().map(|m| vec![0f32; m.rows * n]).collect();
    if !matrices.is_empty() {
        let input = to_vec(x.clone());
        let work: Vec<(&Matrix, OutputRows<'_>)> = matrices
            .iter()
            .zip(outputs.iter_mut())
            .map(|(&m, out)| (m, OutputRows::token_major(out, n)))
            .collect();
        matmul_many(file, &work, &input, n);
    }
    let mut outputs = outputs.into_iter();
    layers.map(|l| match l {
        Linear::Quantized(m) => {
            let out = outputs.next().expect("one output per quantized layer");
            Tensor::<2>::from_data(TensorData::new(out, [n, m.rows]), &device)
        }
        Linear::Dense(w) => x.clone().matmul(w.clone().transpose()),
    })
}
