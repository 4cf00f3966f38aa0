//! Quantized weights on a GPU: each matrix uploaded as its blocks
//! ([`layout`]) and multiplied by CubeCL kernels ([`kernels`]) that run as
//! custom operations inside Burn's fused wgpu stream, so the rest of the graph
//! stays Burn tensor operations on the same device and queue.
//!
//! Few activation rows (decode, batched decode) go through
//! [`kernels::quantized_matmul`], which reads each weight once per eight
//! rows. Many rows (prompt chunks) are dense enough that a tiled f32 product
//! wins: the weights are decoded a slab of rows at a time into a transient
//! f32 tensor ([`kernels::dequantize`]) and multiplied by Burn's own tiled
//! matmul, with the slab bounded ([`SLAB_BYTES`]) so a prompt never needs the
//! dense matrix whole.

mod attention;
mod kernels;
mod layout;

use burn_cubecl::cubecl;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{Cube, CubeBackend};
use burn_fusion::custom::{
    CustomOpIr, HandleContainer, OperationFn, OperationIr, StreamId, TensorIr,
};
use burn_fusion::{FusionRuntime, FusionTensor};
use burn_tensor::{DType, Device, Int, Shape, Tensor, TensorData};
use cubecl::prelude::{CubeCount, CubeDim};

use crate::gguf::{GgmlType, GgufFile};

use super::blocks::Scoring;
use super::ops::Matrix;
use layout::Layout;

/// Rows of activations above which a product decodes the weights to f32 and
/// uses Burn's tiled matmul instead of [`kernels::quantized_matmul`].
const DENSE_ABOVE: usize = 64;
/// Activation rows one [`kernels::quantized_matmul`] cube multiplies.
const TOKENS_PER_CUBE: usize = 8;
/// Weight rows one [`kernels::quantized_matmul`] cube multiplies.
const ROWS_PER_CUBE: usize = 2;
/// The most f32 bytes of weights decoded at once for a prompt chunk.
const SLAB_BYTES: usize = 64 << 20;
/// Cubes along x before a grid wraps to y (WebGPU allows 65535 per axis).
const GRID_X: usize = 32768;
/// The most bytes of one matrix in one device buffer: larger ones (the
/// output projection of a large vocabulary) are split by rows, as devices
/// cap a buffer's size (WebGPU guarantees 128 MiB per storage binding).
const PART_BYTES: usize = 64 << 20;

type Handles = HandleContainer<<FusionCubeRuntime as FusionRuntime>::FusionHandle>;

/// A weight matrix's blocks on the device, as `u32` words, in parts of
/// whole rows.
pub(crate) struct DeviceMatrix {
    parts: Vec<Part>,
    layout: Layout,
    rows: usize,
    cols: usize,
    row_words: usize,
}

/// Consecutive whole rows of a [`DeviceMatrix`].
struct Part {
    words: Tensor<1, Int>,
    rows: usize,
}

impl DeviceMatrix {
    /// Uploads `matrix`'s blocks to `device`, or `None` when the kernels
    /// cannot read its type or shape (then the caller keeps it another way).
    pub(crate) fn upload(matrix: &Matrix, file: &GgufFile, device: &Device) -> Option<Self> {
        Self::upload_stacked(&[matrix], file, device)
    }

    /// `matrices` (one type, one width) uploaded as one matrix, the rows of
    /// each after the previous one's: products sharing an input (query, key
    /// and value; gate and up) then run as one. `None` as [`Self::upload`],
    /// or when the matrices differ in type or width.
    pub(crate) fn upload_stacked(
        matrices: &[&Matrix],
        file: &GgufFile,
        device: &Device,
    ) -> Option<Self> {
        let first = matrices.first()?;
        if (matrices.iter()).any(|m| (m.ty, m.cols) != (first.ty, first.cols)) {
            return None;
        }
        let rows = matrices.iter().map(|m| m.rows).sum();
        let bytes = match matrices {
            [one] => std::borrow::Cow::Borrowed(one.bytes(file)),
            _ => std::borrow::Cow::Owned(
                matrices
                    .iter()
                    .flat_map(|m| m.bytes(file))
                    .copied()
                    .collect(),
            ),
        };
        Self::from_bytes(first.ty, rows, first.cols, &bytes, device, PART_BYTES)
    }

    /// `rows × cols` values of type `ty` in `bytes` (the file's encoding),
    /// uploaded in buffers of at most `part_bytes` (or one row); `None` for
    /// what the kernels cannot read, or no rows at all.
    fn from_bytes(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        device: &Device,
        part_bytes: usize,
    ) -> Option<Self> {
        let layout = Layout::of(ty, cols)?;
        if rows == 0 {
            return None;
        }
        let row_words = layout.row_words(cols);
        let row_bytes = bytes.len() / rows;
        let part_rows = (part_bytes / (row_words * 4)).max(1);
        let parts = (0..rows)
            .step_by(part_rows)
            .map(|first| {
                let rows = part_rows.min(rows - first);
                let words = layout.repack(&bytes[first * row_bytes..(first + rows) * row_bytes]);
                debug_assert_eq!(words.len(), row_words * rows);
                let data = TensorData::new(words, [row_words * rows]);
                Part {
                    words: Tensor::from_data(data, (device, DType::U32)),
                    rows,
                }
            })
            .collect();
        Some(DeviceMatrix {
            parts,
            layout,
            rows,
            cols,
            row_words,
        })
    }

    /// Rows of weights.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes one row takes on the device.
    pub(crate) fn row_bytes(&self) -> usize {
        self.row_words * 4
    }

    /// Bytes the blocks take on the device.
    pub(crate) fn bytes(&self) -> usize {
        self.rows * self.row_words * 4
    }

    /// The first word of each part, read where they lie (a read of every
    /// buffer, which fails if one could not be allocated).
    fn first_words(&self) -> impl Iterator<Item = Tensor<1, Int>> + '_ {
        self.parts.iter().map(|p| p.words.clone().narrow(0, 0, 1))
    }

    /// `x · Wᵀ`: `x` is `[n, cols]`, the result `[n, rows]`.
    pub(crate) fn apply(&self, x: Tensor<2>) -> Tensor<2> {
        let [n, cols] = x.dims();
        debug_assert_eq!(cols, self.cols);
        let slab = (SLAB_BYTES / (4 * self.cols)).max(1);
        let mut outputs = Vec::new();
        for part in &self.parts {
            if n <= DENSE_ABOVE {
                outputs.push(self.quantized_matmul(part, x.clone()));
                continue;
            }
            for first in (0..part.rows).step_by(slab) {
                let dense = self.dequantize(part, &x, first, slab.min(part.rows - first));
                outputs.push(x.clone().matmul(dense.transpose()));
            }
        }
        if outputs.len() == 1 {
            outputs.pop().expect("one output")
        } else {
            Tensor::cat(outputs, 1)
        }
    }

    /// `x · Wᵀ` for `part`'s rows, by the decode kernel.
    fn quantized_matmul(&self, part: &Part, x: Tensor<2>) -> Tensor<2> {
        let [n, _] = x.dims();
        let (kind, cols, row_words, rows) =
            (self.layout.kind, self.cols, self.row_words, part.rows);
        let tokens = TOKENS_PER_CUBE.min(n.next_power_of_two());
        let (gx, gy) = grid(rows.div_ceil(ROWS_PER_CUBE));
        let count = CubeCount::Static(gx, gy, n.div_ceil(tokens) as u32);
        let dim = CubeDim::new_2d(kernels::LANES, ROWS_PER_CUBE as u32);
        let [out] = custom_op(
            "realm_quantized_matmul",
            [Input::float(x), Input::int(part.words.clone())],
            [(Shape::new([n, rows]), DType::F32)],
            move |[x, w], [out]| {
                let client = x.client.clone();
                kernels::quantized_matmul::launch(
                    &client,
                    count.clone(),
                    dim,
                    w.into_tensor_arg(),
                    x.into_tensor_arg(),
                    out.into_tensor_arg(),
                    rows as u32,
                    cols as u32,
                    n as u32,
                    row_words as u32,
                    kind,
                    tokens,
                    ROWS_PER_CUBE,
                );
            },
        );
        Tensor::from_primitive::<Cube>(out)
    }

    /// Rows `first..first + rows` of `part` as a dense `[rows, cols]` f32
    /// tensor on `like`'s device.
    fn dequantize(&self, part: &Part, like: &Tensor<2>, first: usize, rows: usize) -> Tensor<2> {
        const UNITS_PER_CUBE: u32 = 64;
        let (kind, cols, row_words) = (self.layout.kind, self.cols, self.row_words);
        let units = rows * cols / kernels::GROUP as usize;
        let (gx, gy) = grid(units.div_ceil(UNITS_PER_CUBE as usize));
        let [out] = custom_op(
            "realm_dequantize",
            [Input::float(like.clone()), Input::int(part.words.clone())],
            [(Shape::new([rows, cols]), DType::F32)],
            move |[x, w], [out]| {
                kernels::dequantize::launch(
                    &x.client,
                    CubeCount::Static(gx, gy, 1),
                    CubeDim::new_1d(UNITS_PER_CUBE),
                    w.into_tensor_arg(),
                    out.into_tensor_arg(),
                    first as u32,
                    rows as u32,
                    cols as u32,
                    row_words as u32,
                    kind,
                );
            },
        );
        Tensor::from_primitive::<Cube>(out)
    }
}

/// Checks that every one of `matrices` is really on the device: uploads are
/// queued, and a device that cannot hold a buffer says so only when it is
/// used. One read touching every buffer turns that into an error here, at
/// load, rather than in the middle of a request.
pub(crate) fn check_resident<'a>(
    matrices: impl IntoIterator<Item = &'a DeviceMatrix>,
) -> Result<(), String> {
    let firsts: Vec<Tensor<1, Int>> = matrices
        .into_iter()
        .flat_map(DeviceMatrix::first_words)
        .collect();
    if firsts.is_empty() {
        return Ok(());
    }
    Tensor::cat(firsts, 0)
        .try_into_data()
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A grid of `cubes` cubes, wrapping from x to y.
fn grid(cubes: usize) -> (u32, u32) {
    let x = cubes.clamp(1, GRID_X);
    (x as u32, cubes.div_ceil(x).max(1) as u32)
}

/// A tensor a custom operation reads.
enum Input {
    Float(FusionTensor<FusionCubeRuntime>),
    Int(FusionTensor<FusionCubeRuntime>),
}

impl Input {
    /// An f32 tensor made on the GPU device.
    fn float<const D: usize>(t: Tensor<D>) -> Self {
        // Tensors made on the model's GPU device are always Cube (wgpu)
        // tensors: the conversion cannot fail.
        Input::Float(
            t.try_into_primitive::<Cube>()
                .expect("GPU tensors are Cube tensors"),
        )
    }

    /// A `u32` tensor made on the GPU device.
    fn int<const D: usize>(t: Tensor<D, Int>) -> Self {
        Input::Int(
            t.try_into_primitive::<Cube>()
                .expect("GPU tensors are Cube tensors"),
        )
    }
}

/// Queues `launch` on Burn's fused stream as a custom operation reading
/// `inputs` (contiguous when `launch` gets them) and writing new tensors of
/// `outputs`' shapes and types (handed to `launch` empty); returns those.
fn custom_op<const I: usize, const O: usize>(
    id: &'static str,
    inputs: [Input; I],
    outputs: [(Shape, DType); O],
    launch: impl Fn([CubeTensor; I], [CubeTensor; O]) + Send + Sync + 'static,
) -> [FusionTensor<FusionCubeRuntime>; O] {
    let client = match &inputs[0] {
        Input::Float(t) | Input::Int(t) => t.client.clone(),
    };
    let outs: [TensorIr; O] =
        outputs.map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype));
    let ins: [(bool, TensorIr); I] = inputs.map(|input| match input {
        Input::Float(t) => (true, t.into_ir()),
        Input::Int(t) => (false, t.into_ir()),
    });
    let in_irs: Vec<TensorIr> = ins.iter().map(|(_, ir)| ir.clone()).collect();
    let desc = CustomOpIr::new(id, &in_irs, &outs);
    let op = OperationFn(move |handles: &mut Handles| {
        let read = ins.clone().map(|(float, ir)| {
            into_contiguous(if float {
                handles.get_float_tensor::<CubeBackend>(&ir)
            } else {
                handles.get_int_tensor::<CubeBackend>(&ir)
            })
        });
        let (client, device) = (read[0].client.clone(), read[0].device.clone());
        let results = outs
            .clone()
            .map(|o| empty_device_dtype(client.clone(), device.clone(), o.shape, o.dtype));
        launch(read, results.clone());
        for (o, result) in outs.iter().zip(results) {
            if o.dtype == DType::F32 {
                handles.register_float_tensor::<CubeBackend>(&o.id, result);
            } else {
                handles.register_int_tensor::<CubeBackend>(&o.id, result);
            }
        }
        Ok(())
    });
    let made = client.register(StreamId::current(), OperationIr::Custom(desc), op);
    made.try_into()
        .unwrap_or_else(|_| unreachable!("one tensor per output"))
}

/// Cubes of [`attention::pack_halves`] and [`attention::unpack_halves`].
const WORDS_PER_CUBE: u32 = 256;

/// `rows` rounded to f16 (as the CPU cache rounds: to nearest, ties to
/// even, saturating) as f16 bits, two to a word: the last dimension halves.
pub(crate) fn pack_halves(rows: Tensor<3>) -> Tensor<3, Int> {
    let [a, b, c] = rows.dims();
    let words = a * b * c / 2;
    let (gx, gy) = grid(words.div_ceil(WORDS_PER_CUBE as usize));
    let [out] = custom_op(
        "realm_pack_halves",
        [Input::float(rows)],
        [(Shape::new([a, b, c / 2]), DType::U32)],
        move |[x], [out]| {
            attention::pack_halves::launch(
                &out.client.clone(),
                CubeCount::Static(gx, gy, 1),
                CubeDim::new_1d(WORDS_PER_CUBE),
                x.into_tensor_arg(),
                out.into_tensor_arg(),
                words as u32,
            );
        },
    );
    Tensor::from_primitive::<Cube>(out)
}

/// [`pack_halves`] undone: f16 pairs back to f32 values.
pub(crate) fn unpack_halves(words: Tensor<3, Int>) -> Tensor<3> {
    let [a, b, c] = words.dims();
    let count = a * b * c;
    let (gx, gy) = grid(count.div_ceil(WORDS_PER_CUBE as usize));
    let [out] = custom_op(
        "realm_unpack_halves",
        [Input::int(words)],
        [(Shape::new([a, b, c * 2]), DType::F32)],
        move |[w], [out]| {
            attention::unpack_halves::launch(
                &out.client.clone(),
                CubeCount::Static(gx, gy, 1),
                CubeDim::new_1d(WORDS_PER_CUBE),
                w.into_tensor_arg(),
                out.into_tensor_arg(),
                count as u32,
            );
        },
    );
    Tensor::from_primitive::<Cube>(out)
}

/// Whether [`decode_attention`] takes `heads` query heads over `kv_heads`
/// key/value heads (at most [`attention::MAX_GROUP`] per key/value head).
pub(crate) fn decodes(heads: usize, kv_heads: usize) -> bool {
    kv_heads > 0 && heads / kv_heads <= attention::MAX_GROUP
}

/// Decode attention of one query token (`q`: `[1, heads, head_dim]`) over
/// positions `first..first + len` of a sequence's f16 cache (`keys`,
/// `values`: [`pack_halves`]'d `[kv_heads, allocated, head_dim]`), by
/// [`attention::attend_split`] and
/// [`attention::combine`]; returns `[1, heads · head_dim]`.
pub(crate) fn decode_attention(
    q: Tensor<3>,
    keys: &Tensor<3, Int>,
    values: &Tensor<3, Int>,
    first: usize,
    len: usize,
    scoring: Scoring,
) -> Tensor<2> {
    let [_, heads, head_dim] = q.dims();
    let [kv_heads, _, _] = keys.dims();
    let group = heads / kv_heads;
    debug_assert_eq!(keys.dims()[2] * 2, head_dim);
    let splits = len.div_ceil(attention::SPLIT as usize);
    let (scale, softcap) = (scoring.scale, scoring.softcap);
    let [out] = custom_op(
        "realm_decode_attention",
        [
            Input::float(q.reshape([heads * head_dim])),
            Input::int(keys.clone()),
            Input::int(values.clone()),
        ],
        [(Shape::new([1, heads * head_dim]), DType::F32)],
        move |[q, keys, values], [out]| {
            let client = q.client.clone();
            let partial = empty_device_dtype(
                client.clone(),
                q.device.clone(),
                Shape::new([kv_heads * splits * group * (head_dim + 2)]),
                DType::F32,
            );
            attention::attend_split::launch(
                &client,
                CubeCount::Static(kv_heads as u32, splits as u32, 1),
                CubeDim::new_1d(attention::SPLIT),
                q.into_tensor_arg(),
                keys.into_tensor_arg(),
                values.into_tensor_arg(),
                partial.clone().into_tensor_arg(),
                first as u32,
                len as u32,
                scale,
                softcap.unwrap_or(1.0),
                group,
                head_dim,
                softcap.is_some(),
            );
            attention::combine::launch(
                &client,
                CubeCount::Static(heads as u32, 1, 1),
                CubeDim::new_1d(attention::COMBINE_UNITS),
                partial.into_tensor_arg(),
                out.into_tensor_arg(),
                splits as u32,
                group,
                head_dim,
            );
        },
    );
    Tensor::from_primitive::<Cube>(out)
}

#[cfg(test)]
mod tests {
    //! The kernels against the CPU's dequantization, for every weight type,
    //! on whatever Vulkan device there is (lavapipe in CI, through
    //! `scripts/test-gpu.sh`).

    use burn_tensor::DeviceKind;
    use half::{bf16, f16};

    use super::layout::tests::TYPES;
    use super::*;
    use crate::gguf::GgufWriter;
    use crate::quant::dequantize_row;

    /// A deterministic stream of values in [-1, 1).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// Random blocks of `ty`: random integer bits, halves (scales, minimums
    /// and float values) set to small finite numbers.
    fn random_bytes(ty: GgmlType, values: usize, rng: &mut Rng) -> Vec<u8> {
        let (block, size) = ty.block_layout().unwrap();
        let half = |rng: &mut Rng| f16::from_f32(rng.next() * 0.05).to_le_bytes();
        let mut out = Vec::new();
        for _ in 0..values / block {
            let mut b: Vec<u8> = (0..size)
                .map(|_| (rng.next() * 128.0 + 128.0) as u8)
                .collect();
            match ty {
                GgmlType::F32 => b.copy_from_slice(&rng.next().to_le_bytes()),
                GgmlType::F16 => b.copy_from_slice(&f16::from_f32(rng.next()).to_le_bytes()),
                GgmlType::BF16 => b.copy_from_slice(&bf16::from_f32(rng.next()).to_le_bytes()),
                GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
                    b[..2].copy_from_slice(&half(rng))
                }
                GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => {
                    b[..2].copy_from_slice(&half(rng));
                    b[2..4].copy_from_slice(&half(rng));
                }
                GgmlType::Q6K => b[208..].copy_from_slice(&half(rng)),
                GgmlType::Other(_) => unreachable!("not generated"),
            }
            out.extend(b);
        }
        out
    }

    #[test]
    fn products_on_the_blocks_equal_the_cpus_for_every_type() {
        let device = Device::wgpu(DeviceKind::DefaultDevice);
        let (rows, cols) = (37, 512);
        let mut rng = Rng(7);
        for ty in TYPES {
            let bytes = random_bytes(ty, rows * cols, &mut rng);
            let mut w = GgufWriter::new();
            w.tensor("w", &[cols as u64, rows as u64], ty, bytes.clone());
            let file = GgufFile::from_bytes(w.to_bytes()).unwrap();
            let matrix = Matrix::from_tensor(file.tensor("w").unwrap()).unwrap();
            // In parts of 16 rows, as the largest matrices are.
            let part_bytes = 16 * Layout::of(ty, cols).unwrap().row_words(cols) * 4;
            let on_device =
                DeviceMatrix::from_bytes(ty, rows, cols, matrix.bytes(&file), &device, part_bytes)
                    .expect("readable");
            assert_eq!(on_device.parts.len(), 3);
            let mut dense = vec![0f32; rows * cols];
            dequantize_row(ty, &bytes, 0, &mut dense).unwrap();
            // One token, a few (one cube of tokens, then two), and a prompt
            // chunk (the dequantize-then-matmul path).
            for n in [1, 3, 13, DENSE_ABOVE + 5] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.next()).collect();
                let input = Tensor::<2>::from_data(TensorData::new(x.clone(), [n, cols]), &device);
                let got = super::super::graph::to_vec(on_device.apply(input));
                assert_eq!(got.len(), n * rows);
                for t in 0..n {
                    for r in 0..rows {
                        let (mut want, mut size) = (0f64, 0f64);
                        for k in 0..cols {
                            let p = f64::from(x[t * cols + k]) * f64::from(dense[r * cols + k]);
                            want += p;
                            size += p.abs();
                        }
                        let diff = (f64::from(got[t * rows + r]) - want).abs();
                        assert!(
                            diff <= 1e-5 * size + 1e-6,
                            "{ty}, {n} tokens, token {t} row {r}: {} vs {want}",
                            got[t * rows + r]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn device_bytes_are_the_blocks_padded_to_words() {
        let device = Device::wgpu(DeviceKind::DefaultDevice);
        let mut rng = Rng(3);
        let (rows, cols) = (4, 256);
        for ty in TYPES {
            let mut w = GgufWriter::new();
            w.tensor(
                "w",
                &[cols as u64, rows as u64],
                ty,
                random_bytes(ty, rows * cols, &mut rng),
            );
            let file = GgufFile::from_bytes(w.to_bytes()).unwrap();
            let t = file.tensor("w").unwrap();
            let matrix = Matrix::from_tensor(t).unwrap();
            let on_device = DeviceMatrix::upload(&matrix, &file, &device).unwrap();
            let (file_bytes, words) = (t.size, on_device.bytes());
            assert!(
                words >= file_bytes && words * 100 <= file_bytes * 112,
                "{ty}: {words} for {file_bytes}"
            );
        }
    }

    #[test]
    fn decode_attention_equals_the_graphs() {
        use super::super::blocks::{AttentionSpan, attention, round_to_half};
        let device = Device::wgpu(DeviceKind::DefaultDevice);
        let mut rng = Rng(11);
        // Grouped heads, one split and several, a window starting past 0,
        // with and without a softcap, head sizes of SmolLM2 and Gemma 3.
        for (heads, kv_heads, head_dim, allocated, first, len, softcap) in [
            (9, 3, 64, 80, 0, 1, None),
            (9, 3, 64, 80, 0, 70, None),
            (4, 1, 256, 300, 0, 257, Some(50.0)),
            (8, 8, 64, 200, 37, 130, None),
        ] {
            let mut tensor = |shape: [usize; 3]| {
                let n = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| rng.next()).collect();
                Tensor::<3>::from_data(TensorData::new(v, shape), &device)
            };
            let q = tensor([1, heads, head_dim]);
            // The cache holds f16 values: rounded, then packed.
            let keys = round_to_half(tensor([kv_heads, allocated, head_dim]));
            let values = round_to_half(tensor([kv_heads, allocated, head_dim]));
            let (packed_keys, packed_values) =
                (pack_halves(keys.clone()), pack_halves(values.clone()));
            let unpacked = super::super::graph::to_vec(unpack_halves(packed_keys.clone()));
            assert_eq!(unpacked, super::super::graph::to_vec(keys.clone()));
            let scoring = Scoring {
                scale: 1.0 / (head_dim as f32).sqrt() * 4.0,
                softcap,
            };
            let span = AttentionSpan {
                first_query: first + len - 1,
                queries: 1,
                window: (first > 0).then_some(len),
            };
            assert_eq!((span.first_key(), span.keys()), (first, len));
            let want = super::super::graph::to_vec(attention(
                q.clone(),
                keys.clone().narrow(1, first, len),
                values.clone().narrow(1, first, len),
                span,
                scoring,
            ));
            let got = super::super::graph::to_vec(decode_attention(
                q,
                &packed_keys,
                &packed_values,
                first,
                len,
                scoring,
            ));
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-5,
                "{heads}/{kv_heads} heads of {head_dim}, {len} keys: {worst}"
            );
        }
    }

    #[test]
    fn halves_pack_rounding_as_the_cpu_and_unpack_exactly() {
        let device = Device::wgpu(DeviceKind::DefaultDevice);
        let mut rng = Rng(13);
        // Zeros, subnormals (and values rounding into and out of them), the
        // smallest normal, ties, the largest finite and past it, both signs,
        // then random values of every magnitude.
        let mut values = vec![
            0.0,
            -0.0,
            5.960_464_5e-8,
            2.980_232_2e-8,
            2.9e-8,
            8.940_697e-8,
            6.097_555e-5,
            6.103_515_6e-5,
            1.0,
            1.000_488_3,
            1.000_976_6,
            -2.5,
            0.333_25,
            65504.0,
            65519.0,
            -70000.0,
            -5.960_464_5e-8,
            1024.5,
            1e-9,
            f32::INFINITY,
        ];
        values.extend((0..4000).map(|i| rng.next() * 2f32.powi(i % 40 - 26)));
        let x = Tensor::<3>::from_data(
            TensorData::new(values.clone(), [1, 2, values.len() / 2]),
            &device,
        );
        let packed = pack_halves(x);
        let words = packed.clone().into_data().try_into_vec::<u32>().unwrap();
        // The CPU cache's rounding: to nearest, ties to even, saturating.
        let half = |v: f32| f16::from_f32(v.clamp(-65504.0, 65504.0));
        let want: Vec<u32> = values
            .chunks(2)
            .map(|p| u32::from(half(p[0]).to_bits()) | (u32::from(half(p[1]).to_bits()) << 16))
            .collect();
        for (i, (got, want)) in words.iter().zip(&want).enumerate() {
            assert_eq!(
                got,
                want,
                "values {} and {}",
                values[2 * i],
                values[2 * i + 1]
            );
        }
        let back = super::super::graph::to_vec(unpack_halves(packed));
        let rounded: Vec<f32> = values.iter().map(|&v| half(v).to_f32()).collect();
        assert_eq!(
            back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            rounded.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        // NaN stays NaN.
        let nan = Tensor::<3>::from_data(TensorData::new(vec![f32::NAN, 1.0], [1, 1, 2]), &device);
        assert!(super::super::graph::to_vec(unpack_halves(pack_halves(nan)))[0].is_nan());
    }

    #[test]
    fn a_buffer_the_device_cannot_hold_is_an_error_at_load() {
        let device = Device::wgpu(DeviceKind::DefaultDevice);
        // 210 MB of Q4_0 blocks in one buffer: over lavapipe's largest
        // allocation (CI's device), which fails it; a GPU that can hold it
        // must then read it back.
        let (rows, cols) = (81_920, 4096);
        let bytes = vec![0u8; rows * cols / 32 * 18];
        let mut w = GgufWriter::new();
        w.tensor("w", &[cols as u64, rows as u64], GgmlType::Q4_0, bytes);
        let file = GgufFile::from_bytes(w.to_bytes()).unwrap();
        let matrix = Matrix::from_tensor(file.tensor("w").unwrap()).unwrap();
        let words = matrix.bytes(&file);
        let whole =
            DeviceMatrix::from_bytes(GgmlType::Q4_0, rows, cols, words, &device, usize::MAX)
                .unwrap();
        assert_eq!(whole.parts.len(), 1);
        match check_resident([&whole]) {
            Ok(()) => eprintln!("this device holds a 210 MB buffer"),
            Err(e) => assert!(e.contains("allocate"), "{e}"),
        }
        // Uploaded in parts of PART_BYTES, it is always held.
        let parts = DeviceMatrix::upload(&matrix, &file, &device).unwrap();
        assert_eq!(parts.parts.len(), 4);
        check_resident([&parts]).unwrap();
    }

    #[test]
    fn stacked_matrices_give_each_ones_product() {
        let device = Device::wgpu(DeviceKind::DefaultDevice);
        let mut rng = Rng(5);
        let cols = 256;
        let mut w = GgufWriter::new();
        for (name, rows, ty) in [
            ("q", 24, GgmlType::Q4K),
            ("k", 8, GgmlType::Q4K),
            ("v", 8, GgmlType::Q4K),
            ("other", 8, GgmlType::Q6K),
        ] {
            w.tensor(
                name,
                &[cols as u64, rows],
                ty,
                random_bytes(ty, rows as usize * cols, &mut rng),
            );
        }
        let file = GgufFile::from_bytes(w.to_bytes()).unwrap();
        let m = |name| Matrix::from_tensor(file.tensor(name).unwrap()).unwrap();
        let (q, k, v, other) = (m("q"), m("k"), m("v"), m("other"));
        let whole = DeviceMatrix::upload_stacked(&[&q, &k, &v], &file, &device).unwrap();
        assert_eq!(whole.rows(), 40);
        assert!(DeviceMatrix::upload_stacked(&[&q, &other], &file, &device).is_none());
        let x: Vec<f32> = (0..3 * cols).map(|_| rng.next()).collect();
        let x = Tensor::<2>::from_data(TensorData::new(x, [3, cols]), &device);
        let all = super::super::graph::to_vec(whole.apply(x.clone()));
        let mut first = 0;
        for part in [&q, &k, &v] {
            let alone = DeviceMatrix::upload(part, &file, &device).unwrap();
            let want = super::super::graph::to_vec(alone.apply(x.clone()));
            for t in 0..3 {
                let got = &all[t * 40 + first..t * 40 + first + part.rows];
                assert_eq!(got, &want[t * part.rows..(t + 1) * part.rows]);
            }
            first += part.rows;
        }
    }

    #[test]
    fn packing_a_cache_longer_than_one_grid_row_covers_every_word() {
        let device = Device::wgpu(DeviceKind::DefaultDevice);
        // More words than GRID_X cubes of WORDS_PER_CUBE hold: the grid
        // wraps to a second row.
        let words = GRID_X * WORDS_PER_CUBE as usize + 100;
        let values: Vec<f32> = (0..2 * words).map(|i| (i % 2048) as f32).collect();
        let x = Tensor::<3>::from_data(TensorData::new(values.clone(), [1, 2, words]), &device);
        let back = super::super::graph::to_vec(unpack_halves(pack_halves(x)));
        assert!(back == values, "a value was lost past the first grid row");
    }
}
