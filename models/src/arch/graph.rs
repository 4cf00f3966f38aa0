//! The Burn graph backend: the transformer as Burn tensor operations, on
//! Burn's CPU backend (weight products still on the quantized blocks, in the
//! mapped file) or on wgpu (the blocks uploaded, multiplied by Realm's
//! CubeCL kernels: [`super::gpu`]). The reference the fused CPU pass is
//! tested against, and the GPU path. A pass's hidden states stay on the
//! device; only the logits rows a step needs are read back.

use std::sync::Arc;

use burn_tensor::{Device, Int, Tensor, TensorData, activation};

use crate::gguf::GgufFile;

use super::blocks::{AttentionSpan, RopeTables, Scoring, rms_norm};
use super::config::{Activation, ModelConfig};
use super::device::ComputeDevice;
use super::graph_cache::{GraphCache, KvForm};
use super::linear::{self, Linear};
use super::lora::{GraphFactors, LoraAdapter};
use super::ops::Matrix;
use super::rope::Rope;
use super::transformer::{DeviceMemory, ModelError};
use super::weights::{self, LayerWeights};

/// A model's weights as Burn tensors (and quantized blocks on Burn's CPU).
pub(crate) struct GraphModel {
    device: Device,
    /// How its caches keep their values: f16 bits on the GPU (heads of an
    /// even size), f32 on Burn's CPU backend.
    kv_form: KvForm,
    /// Embedding rows are looked up in the mapped file (quantized).
    token_embd: Matrix,
    output: Linear,
    /// `[1, n_embd]`.
    output_norm: Tensor<2>,
    /// Norms (and biases) are `[1, len]` tensors.
    layers: Vec<LayerWeights<Linear, Tensor<2>>>,
    /// Per rotated pair, a divisor of its frequency.
    rope_factors: Option<Vec<f32>>,
}

/// A pass's final hidden states on the device: `[tokens, n_embd]`.
pub(crate) struct GraphHidden(Tensor<2>);

impl GraphHidden {
    /// Token rows.
    pub(crate) fn rows(&self) -> usize {
        self.0.dims()[0]
    }

    /// The rows read back, row after row.
    pub(crate) fn into_host(self) -> Vec<f32> {
        to_vec(self.0)
    }
}

/// One sequence's part of a pass: its cache, where its tokens start, the
/// tokens, and the adapter they run with.
pub(crate) struct GraphRun<'a> {
    pub(crate) cache: &'a mut GraphCache,
    pub(crate) first: usize,
    pub(crate) tokens: &'a [u32],
    pub(crate) adapter: Option<&'a LoraAdapter>,
}

/// Each run's rows in a pass and its adapter's factors on the device.
type RunDeltas = Vec<(usize, Option<Arc<GraphFactors>>)>;

/// Adds to each of `outs` (all runs' rows, run after run) the LoRA delta of
/// its target (`slots`, of layer `layer`) for the runs whose adapter adapts
/// it, from the targets' shared input `x`: `scale · (x Aᵀ) Bᵀ` per run, the
/// base product having been computed once for all runs.
fn add_deltas<const N: usize>(
    runs: &RunDeltas,
    layer: usize,
    slots: [usize; N],
    x: &Tensor<2>,
    outs: [&mut Tensor<2>; N],
) {
    if runs.iter().all(|(_, f)| f.is_none()) {
        return;
    }
    for (out, slot) in outs.into_iter().zip(slots) {
        let width = out.dims()[1];
        let mut parts = Vec::with_capacity(runs.len());
        let (mut row, mut any) = (0, false);
        for (rows, factors) in runs {
            parts.push(match factors.as_ref().and_then(|f| f.get(layer, slot)) {
                Some((a_t, b_t, scale)) => {
                    any = true;
                    let xr = x.clone().narrow(0, row, *rows);
                    xr.matmul(a_t.clone()).matmul(b_t.clone()) * *scale
                }
                None => Tensor::<2>::zeros([*rows, width], &x.device()),
            });
            row += rows;
        }
        if any {
            *out = out.clone() + Tensor::cat(parts, 0);
        }
    }
}

impl GraphModel {
    /// Reads the weights onto `compute`'s Burn device.
    pub(crate) fn load(
        file: &GgufFile,
        config: &ModelConfig,
        compute: ComputeDevice,
    ) -> Result<Self, ModelError> {
        let device = compute
            .burn_device()
            .map_err(|message| ModelError::Device {
                device: compute,
                message,
            })?;
        // Burn's CPU backend keeps the quantized blocks in the file for
        // Realm's kernels; a GPU gets them uploaded for its own.
        let quantized = compute != ComputeDevice::Gpu;
        let w = weights::load(file, config, quantized)?;
        let linear = |m: Matrix| {
            if quantized {
                Linear::Quantized(m)
            } else {
                Linear::on_gpu(&m, file, &device)
            }
        };
        let norm = |v: Vec<f32>| {
            let len = v.len();
            Tensor::from_data(TensorData::new(v, [1, len]), &device)
        };
        let model = GraphModel {
            token_embd: w.token_embd,
            output: linear(w.output),
            output_norm: norm(w.output_norm),
            layers: (w.layers.into_iter())
                .map(|layer| {
                    if quantized {
                        return layer.map(Linear::Quantized, norm);
                    }
                    let [q, k, v, o, gate, up, down] = layer.matrices();
                    let [q, k, v] = Linear::stacked_on_gpu([q, k, v], file, &device);
                    let [gate, up] = Linear::stacked_on_gpu([gate, up], file, &device);
                    let [o, down] = [o, down].map(|m| Linear::on_gpu(m, file, &device));
                    layer
                        .map(|m| m, norm)
                        .with_matrices([q, k, v, o, gate, up, down])
                })
                .collect(),
            rope_factors: w.rope_factors,
            device,
            kv_form: match compute {
                #[cfg(feature = "gpu")]
                ComputeDevice::Gpu if config.head_dim.is_multiple_of(2) => KvForm::Half,
                _ => KvForm::Float,
            },
        };
        #[cfg(feature = "gpu")]
        if compute == ComputeDevice::Gpu {
            let matrices = model.linears().filter_map(Linear::on_device);
            super::gpu::check_resident(matrices).map_err(|e| ModelError::Device {
                device: compute,
                message: format!(
                    "the model's weights ({} MiB as the device keeps them) do not fit on it: {e}",
                    model.device_bytes() >> 20
                ),
            })?;
        }
        Ok(model)
    }

    /// Every weight matrix.
    fn linears(&self) -> impl Iterator<Item = &Linear> {
        (self.layers.iter())
            .flat_map(|l| l.matrices())
            .chain([&self.output])
    }

    /// Bytes the weights take on the device: the matrices kept there and
    /// the norm vectors (none on Burn's CPU backend, whose matrices stay in
    /// the mapped file).
    pub(crate) fn device_bytes(&self) -> usize {
        let norms: usize = (self.layers.iter())
            .flat_map(|l| {
                [
                    Some(&l.attn_norm),
                    l.bq.as_ref(),
                    l.bk.as_ref(),
                    l.bv.as_ref(),
                    l.q_norm.as_ref(),
                    l.k_norm.as_ref(),
                    l.post_attn_norm.as_ref(),
                    Some(&l.ffn_norm),
                    l.post_ffn_norm.as_ref(),
                ]
            })
            .chain([Some(&self.output_norm)])
            .flatten()
            .map(|t| t.shape().num_elements() * 4)
            .sum();
        self.linears().map(Linear::device_bytes).sum::<usize>() + norms
    }

    /// What the device's allocator holds (`None` where Burn's backend does
    /// not report it).
    pub(crate) fn device_memory(&self) -> Option<DeviceMemory> {
        self.device.memory_pool_usage().map(|u| DeviceMemory {
            in_use: u.bytes_in_use,
            reserved: u.bytes_reserved,
        })
    }

    /// An empty cache with room for `allocated` tokens before it grows.
    pub(crate) fn new_cache(&self, c: &ModelConfig, allocated: usize) -> GraphCache {
        let shape = [c.n_head_kv, allocated, c.head_dim];
        GraphCache::new(self.kv_form, c.n_layer, shape, &self.device)
    }

    /// Whether `cache` has the shape, form and device of this model's.
    pub(crate) fn fits(&self, c: &ModelConfig, cache: &GraphCache) -> bool {
        let shape = [c.n_head_kv, c.head_dim];
        cache.fits(self.kv_form, c.n_layer, shape, &self.device)
    }

    /// The logits of rows `wanted` of `hidden`: the rows are picked and
    /// multiplied on the device, and only their logits read back.
    pub(crate) fn logits(
        &self,
        file: &GgufFile,
        hidden: GraphHidden,
        wanted: &[usize],
    ) -> Vec<Vec<f32>> {
        let all = hidden.0;
        let picked =
            if wanted.len() == all.dims()[0] && wanted.iter().enumerate().all(|(i, &r)| i == r) {
                all
            } else {
                let ids: Vec<i64> = wanted.iter().map(|&r| r as i64).collect();
                let ids =
                    Tensor::<1, Int>::from_data(TensorData::new(ids, [wanted.len()]), &self.device);
                all.select(0, ids)
            };
        let [logits] = linear::apply(file, [&self.output], picked);
        let logits = to_vec(logits);
        logits
            .chunks_exact(logits.len() / wanted.len())
            .map(<[f32]>::to_vec)
            .collect()
    }

    /// The forward pass of `runs` (each fits its cache); returns the final,
    /// normalized hidden states of all their tokens, run after run, on the
    /// device.
    pub(crate) fn run(
        &self,
        c: &ModelConfig,
        file: &GgufFile,
        runs: &mut [GraphRun<'_>],
    ) -> GraphHidden {
        let n: usize = runs.iter().map(|r| r.tokens.len()).sum();
        let mut embd = vec![0f32; n * c.n_embd];
        let mut positions = Vec::with_capacity(n);
        let mut rows = embd.chunks_exact_mut(c.n_embd);
        for run in runs.iter() {
            positions.extend(run.first..run.first + run.tokens.len());
            for (&t, row) in run.tokens.iter().zip(&mut rows) {
                self.token_embd.row(file, t as usize, row);
                if c.embed_scale != 1.0 {
                    row.iter_mut().for_each(|v| *v *= c.embed_scale);
                }
            }
        }
        let mut x = Tensor::<2>::from_data(TensorData::new(embd, [n, c.n_embd]), &self.device);
        let factors = self.rope_factors.as_deref();
        let tables = |base| {
            let rope = Rope::new(c, base, factors);
            RopeTables::new(positions.iter().copied(), &rope, &self.device)
        };
        let deltas: RunDeltas = (runs.iter())
            .map(|r| {
                (
                    r.tokens.len(),
                    r.adapter.map(|a| a.graph_factors(&self.device)),
                )
            })
            .collect();
        let rope_global = tables(c.rope_base);
        let rope_local = (c.sliding_window.is_some() && c.rope_base_local != c.rope_base)
            .then(|| tables(c.rope_base_local));

        for (il, layer) in self.layers.iter().enumerate() {
            let local = c.is_local(il);
            let rope = match (&rope_local, local) {
                (Some(tables), true) => tables,
                _ => &rope_global,
            };
            let h = rms_norm(x.clone(), &layer.attn_norm, c.rms_eps);
            let [mut q, mut k, mut v] =
                linear::apply(file, [&layer.wq, &layer.wk, &layer.wv], h.clone());
            add_deltas(&deltas, il, [0, 1, 2], &h, [&mut q, &mut k, &mut v]);
            for (x, bias) in [
                (&mut q, &layer.bq),
                (&mut k, &layer.bk),
                (&mut v, &layer.bv),
            ] {
                if let Some(bias) = bias {
                    *x = x.clone() + bias.clone();
                }
            }
            let mut q: Tensor<3> = q.reshape([n, c.n_head, c.head_dim]);
            let mut k: Tensor<3> = k.reshape([n, c.n_head_kv, c.head_dim]);
            let v: Tensor<3> = v.reshape([n, c.n_head_kv, c.head_dim]);
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = rms_norm(q, &per_head(qn), c.rms_eps);
                k = rms_norm(k, &per_head(kn), c.rms_eps);
            }
            let q = rope.apply(q, c.rope_dims, c.rope_style);
            let k = rope.apply(k, c.rope_dims, c.rope_style);

            let window = c.sliding_window.filter(|_| local);
            let mut outputs = Vec::with_capacity(runs.len());
            let mut row = 0;
            for run in runs.iter_mut() {
                let rows = run.tokens.len();
                let part = |t: &Tensor<3>| t.clone().narrow(0, row, rows);
                let span = AttentionSpan {
                    first_query: run.first,
                    queries: rows,
                    window,
                };
                let (q, k, v) = (part(&q), part(&k), part(&v));
                let scoring = Scoring {
                    scale: c.query_scale,
                    softcap: c.attn_softcap,
                };
                outputs.push(run.cache.attend(il, span, (q, k, v), scoring));
                row += rows;
            }
            let attn = if outputs.len() == 1 {
                outputs.pop().expect("one output")
            } else {
                Tensor::cat(outputs, 0)
            };

            let [mut o] = linear::apply(file, [&layer.wo], attn.clone());
            add_deltas(&deltas, il, [3], &attn, [&mut o]);
            if let Some(norm) = &layer.post_attn_norm {
                o = rms_norm(o, norm, c.rms_eps);
            }
            x = x + o;

            let h = rms_norm(x.clone(), &layer.ffn_norm, c.rms_eps);
            let [mut gate, mut up] = linear::apply(file, [&layer.gate, &layer.up], h.clone());
            add_deltas(&deltas, il, [4, 5], &h, [&mut gate, &mut up]);
            let gate = match c.activation {
                Activation::Silu => activation::silu(gate),
                Activation::GeluTanh => activation::gelu_approximate(gate),
            };
            let inner = gate * up;
            let [mut down] = linear::apply(file, [&layer.down], inner.clone());
            add_deltas(&deltas, il, [6], &inner, [&mut down]);
            if let Some(norm) = &layer.post_ffn_norm {
                down = rms_norm(down, norm, c.rms_eps);
            }
            x = x + down;
        }
        GraphHidden(rms_norm(x, &self.output_norm, c.rms_eps))
    }
}

/// A `[1, len]` norm shaped to scale each head of `[n, heads, len]`.
fn per_head(norm: &Tensor<2>) -> Tensor<3> {
    let [_, len] = norm.dims();
    norm.clone().reshape([1, 1, len])
}

/// A tensor's values, row-major (reading them back from the device).
pub(crate) fn to_vec<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .try_into_vec::<f32>()
        .expect("the model's tensors are f32")
}
