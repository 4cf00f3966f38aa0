//! The Burn graph's key/value cache: per sequence and layer, the keys and
//! values of every position so far, on the model's device.
//!
//! Values are rounded to f16 as they are stored, as llama.cpp's default cache
//! and the fused CPU pass do. On Burn's CPU backend they are kept as f32
//! tensors holding those rounded values, for Burn's attention. On the GPU
//! they are kept as f16 bits, two to a `u32` word, which halves the cache's
//! memory and the bytes a decode step reads; Realm's kernels round and pack
//! them (in integer operations, the same rounding) and read them
//! ([`super::gpu`]).

#[cfg(feature = "gpu")]
use burn_tensor::{DType, Int};
use burn_tensor::{Device, Tensor, s};

use super::blocks::{AttentionSpan, Scoring, attention, round_to_half};

/// A sequence's keys and values on the device, one pair per layer, `None`
/// only while a pass holds them (so updates happen in place).
pub(crate) struct GraphCache(Vec<Option<(KvBuffer, KvBuffer)>>);

/// How a cache keeps its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KvForm {
    /// f32 tensors of f16-rounded values.
    Float,
    /// f16 bits, two to a word (GPU).
    #[cfg(feature = "gpu")]
    Half,
}

/// One layer's keys or values: `[kv_heads, allocated, head_dim]` values.
enum KvBuffer {
    /// f32, each value rounded to f16.
    Float(Tensor<3>),
    /// f16 bits in `u32` words: `[kv_heads, allocated, head_dim / 2]`.
    #[cfg(feature = "gpu")]
    Half(Tensor<3, Int>),
}

impl KvBuffer {
    fn zeros(form: KvForm, [heads, allocated, dim]: [usize; 3], device: &Device) -> Self {
        match form {
            KvForm::Float => KvBuffer::Float(Tensor::zeros([heads, allocated, dim], device)),
            #[cfg(feature = "gpu")]
            KvForm::Half => KvBuffer::Half(Tensor::zeros(
                [heads, allocated, dim / 2],
                (device, DType::U32),
            )),
        }
    }

    fn form(&self) -> KvForm {
        match self {
            KvBuffer::Float(_) => KvForm::Float,
            #[cfg(feature = "gpu")]
            KvBuffer::Half(_) => KvForm::Half,
        }
    }

    /// `[kv_heads, allocated, head_dim]`, in values.
    fn dims(&self) -> [usize; 3] {
        match self {
            KvBuffer::Float(t) => t.dims(),
            #[cfg(feature = "gpu")]
            KvBuffer::Half(t) => {
                let [heads, allocated, words] = t.dims();
                [heads, allocated, words * 2]
            }
        }
    }

    fn device(&self) -> Device {
        match self {
            KvBuffer::Float(t) => t.device(),
            #[cfg(feature = "gpu")]
            KvBuffer::Half(t) => t.device(),
        }
    }

    /// Stores `rows` (`[n, kv_heads, head_dim]`) rounded to f16 at
    /// positions `pos..pos + n`.
    fn store(self, pos: usize, rows: Tensor<3>) -> Self {
        let n = rows.dims()[0];
        let rows = rows.swap_dims(0, 1);
        match self {
            KvBuffer::Float(t) => {
                let rows = round_to_half(rows);
                KvBuffer::Float(t.slice_assign(s![.., pos..pos + n, ..], rows))
            }
            #[cfg(feature = "gpu")]
            KvBuffer::Half(t) => {
                let packed = super::gpu::pack_halves(rows);
                KvBuffer::Half(t.slice_assign(s![.., pos..pos + n, ..], packed))
            }
        }
    }

    /// Positions `first..first + len` as f32 `[kv_heads, len, head_dim]`.
    fn span(&self, first: usize, len: usize) -> Tensor<3> {
        match self {
            KvBuffer::Float(t) => t.clone().narrow(1, first, len),
            #[cfg(feature = "gpu")]
            KvBuffer::Half(t) => super::gpu::unpack_halves(t.clone().narrow(1, first, len)),
        }
    }

    /// A new buffer of `allocated` positions holding the first `len` of these.
    fn resized(&self, len: usize, allocated: usize) -> Self {
        let [heads, _, dim] = self.dims();
        let shape = [heads, allocated.max(1), dim];
        let device = self.device();
        match self {
            KvBuffer::Float(old) => {
                let fresh = Tensor::zeros(shape, &device);
                KvBuffer::Float(match len {
                    0 => fresh,
                    _ => fresh.slice_assign(s![.., 0..len, ..], old.clone().narrow(1, 0, len)),
                })
            }
            #[cfg(feature = "gpu")]
            KvBuffer::Half(old) => {
                let fresh = Tensor::zeros([heads, shape[1], dim / 2], (&device, DType::U32));
                KvBuffer::Half(match len {
                    0 => fresh,
                    _ => fresh.slice_assign(s![.., 0..len, ..], old.clone().narrow(1, 0, len)),
                })
            }
        }
    }
}

impl GraphCache {
    /// An empty cache of `layers` layers, `form`, with room for `allocated`
    /// positions of `kv_heads × head_dim` values before it grows.
    pub(crate) fn new(
        form: KvForm,
        layers: usize,
        [kv_heads, allocated, head_dim]: [usize; 3],
        device: &Device,
    ) -> Self {
        let empty = || KvBuffer::zeros(form, [kv_heads, allocated, head_dim], device);
        GraphCache((0..layers).map(|_| Some((empty(), empty()))).collect())
    }

    /// Whether this cache has `layers` layers of `form`, `kv_heads ×
    /// head_dim` values a position, on `device`.
    pub(crate) fn fits(
        &self,
        form: KvForm,
        layers: usize,
        shape: [usize; 2],
        device: &Device,
    ) -> bool {
        self.0.len() == layers
            && self.0.iter().flatten().all(|(keys, values)| {
                let [heads, _, dim] = keys.dims();
                keys.dims() == values.dims()
                    && [heads, dim] == shape
                    && keys.form() == form
                    && values.form() == form
                    && keys.device() == *device
            })
    }

    /// Layer `il`'s attention for one run: stores its keys and values at the
    /// run's positions, then attends over the span's keys. A single query
    /// on the GPU goes to the decode kernel, reading the f16 cache in place.
    pub(crate) fn attend(
        &mut self,
        il: usize,
        span: AttentionSpan,
        (q, k, v): (Tensor<3>, Tensor<3>, Tensor<3>),
        scoring: Scoring,
    ) -> Tensor<2> {
        let pos = span.first_query;
        let (keys, values) = self.0[il].take().expect("cache present between passes");
        let keys = keys.store(pos, k);
        let values = values.store(pos, v);
        let (first, len) = (span.first_key(), span.keys());
        let out = match (&keys, &values) {
            #[cfg(feature = "gpu")]
            (KvBuffer::Half(k), KvBuffer::Half(v))
                if span.queries == 1 && super::gpu::decodes(q.dims()[1], k.dims()[0]) =>
            {
                super::gpu::decode_attention(q, k, v, first, len, scoring)
            }
            _ => attention(
                q,
                keys.span(first, len),
                values.span(first, len),
                span,
                scoring,
            ),
        };
        self.0[il] = Some((keys, values));
        out
    }

    /// A copy of the first `len` positions in buffers of exactly that size.
    pub(crate) fn copy_prefix(&self, len: usize) -> GraphCache {
        GraphCache(
            self.0
                .iter()
                .map(|slot| {
                    let (keys, values) = slot.as_ref().expect("cache present between passes");
                    Some((keys.resized(len, len), values.resized(len, len)))
                })
                .collect(),
        )
    }

    /// Makes room for `needed` positions (keeping the first `len`), growing
    /// geometrically up to `capacity`.
    pub(crate) fn reserve(&mut self, len: usize, needed: usize, capacity: usize) {
        for slot in &mut self.0 {
            let (keys, values) = slot.take().expect("cache present between passes");
            let [_, allocated, _] = keys.dims();
            if needed <= allocated {
                *slot = Some((keys, values));
                continue;
            }
            let grown = needed.max(allocated * 2).min(capacity);
            *slot = Some((keys.resized(len, grown), values.resized(len, grown)));
        }
    }
}
