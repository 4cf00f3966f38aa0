//! Linear layers: a weight matrix applied to a batch of activation rows.
//!
//! On the CPU the weights stay quantized in the mapped file and the product
//! runs on the blocks (Realm's kernels, 8-bit activations where a kernel takes
//! them); on other devices they are dequantized once, at load, into a dense
//! f32 Burn tensor and multiplied by Burn.

use burn_tensor::{Device, Tensor, TensorData};

use crate::gguf::GgufFile;

use super::ops::{Matrix, matmul_many};
use super::transformer::to_vec;
use crate::quant::OutputRows;

/// One weight matrix, kept as the device runs it best.
pub(crate) enum Linear {
    /// Quantized blocks in the mapped file.
    Quantized(Matrix),
    /// Dense `[rows, cols]` f32 weights on the device.
    Dense(Tensor<2>),
}

impl Linear {
    /// Wraps `matrix`, dequantizing it onto `device` unless it is the CPU.
    pub(crate) fn new(matrix: Matrix, file: &GgufFile, device: &Device, quantized: bool) -> Self {
        if quantized {
            return Linear::Quantized(matrix);
        }
        let mut weights = vec![0f32; matrix.rows * matrix.cols];
        for (r, row) in weights.chunks_exact_mut(matrix.cols).enumerate() {
            matrix.row(file, r, row);
        }
        let data = TensorData::new(weights, [matrix.rows, matrix.cols]);
        Linear::Dense(Tensor::from_data(data, device))
    }
}

/// `x · Wᵢᵀ` for each of `layers`, all sharing the input `x` (`[n, cols]`);
/// each result is `[n, rows_i]`. Quantized layers run in one parallel pass.
pub(crate) fn apply<const N: usize>(
    file: &GgufFile,
    layers: [&Linear; N],
    x: Tensor<2>,
) -> [Tensor<2>; N] {
    let [n, _] = x.dims();
    let device = x.device();
    if layers.iter().all(|l| matches!(l, Linear::Dense(_))) {
        return layers.map(|l| match l {
            Linear::Dense(w) => x.clone().matmul(w.clone().transpose()),
            Linear::Quantized(_) => unreachable!("checked above"),
        });
    }
    let input = to_vec(x.clone());
    let matrices: Vec<Option<&Matrix>> = layers
        .iter()
        .map(|l| match l {
            Linear::Quantized(m) => Some(m),
            Linear::Dense(_) => None,
        })
        .collect();
    let mut outputs: Vec<Vec<f32>> = matrices
        .iter()
        .map(|m| m.map_or_else(Vec::new, |m| vec![0f32; m.rows * n]))
        .collect();
    let work: Vec<(&Matrix, OutputRows<'_>)> = matrices
        .iter()
        .zip(outputs.iter_mut())
        .filter_map(|(m, out)| m.map(|m| (m, OutputRows::token_major(out, n))))
        .collect();
    matmul_many(file, &work, &input, n);
    drop(work);
    let mut outputs = outputs.into_iter();
    layers.map(|l| {
        let out = outputs.next().expect("one output per layer");
        match l {
            Linear::Quantized(m) => {
                Tensor::<2>::from_data(TensorData::new(out, [n, m.rows]), &device)
            }
            Linear::Dense(w) => x.clone().matmul(w.clone().transpose()),
        }
    })
}
