//! The Burn graph's linear layers: a weight matrix applied to a batch of
//! activation rows.
//!
//! On Burn's CPU backend the weights stay quantized in the mapped file and
//! the product runs on the blocks (Realm's kernels, 8-bit activations where a
//! kernel takes them); on the GPU the blocks are uploaded as they are and
//! multiplied by Realm's CubeCL kernels ([`super::gpu`]), matrices that
//! multiply one input (query, key, value; gate, up) stacked into one upload
//! and one product. A matrix those
//! kernels cannot read (float rows that are not whole groups of eight) is
//! dequantized once into a dense f32 tensor instead.

#[cfg(feature = "gpu")]
use std::ops::Range;
#[cfg(feature = "gpu")]
use std::sync::Arc;

use burn_tensor::{Device, Tensor, TensorData};

use crate::gguf::GgufFile;

#[cfg(feature = "gpu")]
use super::gpu::DeviceMatrix;
use super::graph::to_vec;
use super::ops::{Matrix, matmul_many};
use crate::quant::OutputRows;

/// One weight matrix, kept as the device runs it best.
pub(crate) enum Linear {
    /// Quantized blocks in the mapped file.
    Quantized(Matrix),
    /// Quantized blocks on the GPU.
    #[cfg(feature = "gpu")]
    Device(DeviceMatrix),
    /// These rows of blocks uploaded with other matrices that share an
    /// input ([`Linear::stacked_on_gpu`]): one product gives all of theirs.
    #[cfg(feature = "gpu")]
    Rows(Arc<DeviceMatrix>, Range<usize>),
    /// Dense `[rows, cols]` f32 weights on the device.
    Dense(Tensor<2>),
}

impl Linear {
    /// `matrix` on the GPU `device`: its blocks where the kernels read them,
    /// else dequantized into a dense tensor.
    pub(crate) fn on_gpu(matrix: &Matrix, file: &GgufFile, device: &Device) -> Self {
        #[cfg(feature = "gpu")]
        if let Some(m) = DeviceMatrix::upload(matrix, file, device) {
            return Linear::Device(m);
        }
        let data = TensorData::new(matrix.values(file), [matrix.rows, matrix.cols]);
        Linear::Dense(Tensor::from_data(data, device))
    }

    /// The blocks on the GPU, if this matrix is kept so.
    #[cfg(feature = "gpu")]
    pub(crate) fn on_device(&self) -> Option<&DeviceMatrix> {
        match self {
            Linear::Device(m) => Some(m),
            Linear::Rows(whole, _) => Some(whole),
            _ => None,
        }
    }

    /// `matrices`, which multiply one input, on the GPU `device`: uploaded
    /// as one matrix where the kernels read them all (one type and width),
    /// else each as [`Linear::on_gpu`].
    pub(crate) fn stacked_on_gpu<const N: usize>(
        matrices: [&Matrix; N],
        file: &GgufFile,
        device: &Device,
    ) -> [Self; N] {
        #[cfg(feature = "gpu")]
        if let Some(whole) = DeviceMatrix::upload_stacked(&matrices, file, device) {
            let whole = Arc::new(whole);
            let mut first = 0;
            return matrices.map(|m| {
                first += m.rows;
                Linear::Rows(whole.clone(), first - m.rows..first)
            });
        }
        matrices.map(|m| Linear::on_gpu(m, file, device))
    }

    /// Bytes the weights take on the device (none for blocks in the file).
    pub(crate) fn device_bytes(&self) -> usize {
        match self {
            Linear::Quantized(_) => 0,
            #[cfg(feature = "gpu")]
            Linear::Device(m) => m.bytes(),
            #[cfg(feature = "gpu")]
            Linear::Rows(whole, rows) => whole.row_bytes() * rows.len(),
            Linear::Dense(w) => w.shape().num_elements() * 4,
        }
    }
}

/// `x · Wᵢᵀ` for each of `layers`, all sharing the input `x` (`[n, cols]`);
/// each result is `[n, rows_i]`. Quantized layers run in one parallel pass
/// of Realm's kernels, device ones as products on the device.
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
            _ => None,
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
    // Products of one stacked upload, made once for all its parts.
    #[cfg(feature = "gpu")]
    let mut stacked: Vec<(&Arc<DeviceMatrix>, Tensor<2>)> = Vec::new();
    layers.map(|l| match l {
        Linear::Quantized(m) => {
            let out = outputs.next().expect("one output per quantized layer");
            Tensor::<2>::from_data(TensorData::new(out, [n, m.rows]), &device)
        }
        #[cfg(feature = "gpu")]
        Linear::Device(m) => m.apply(x.clone()),
        #[cfg(feature = "gpu")]
        Linear::Rows(whole, rows) => {
            let all = match stacked.iter().find(|(w, _)| Arc::ptr_eq(w, whole)) {
                Some((_, all)) => all.clone(),
                None => {
                    let all = whole.apply(x.clone());
                    stacked.push((whole, all.clone()));
                    all
                }
            };
            if rows.len() == whole.rows() {
                all
            } else {
                all.narrow(1, rows.start, rows.len())
            }
        }
        Linear::Dense(w) => x.clone().matmul(w.clone().transpose()),
    })
}
