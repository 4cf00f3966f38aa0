//! The decoder-only transformer: its weights, per-sequence KV caches, and the
//! forward pass batched over runs of tokens (a whole prompt chunk at once,
//! or one token of many sequences), either as Burn tensor operations or as
//! the fused CPU pass of [`super::host`].

use std::sync::{Arc, Mutex};

use burn_tensor::{Device, Tensor, TensorData, activation, s};

use crate::gguf::{GgufError, GgufFile};

use super::attend::HostKv;
use super::blocks::{AttentionSpan, RopeTables, attention, rms_norm, round_to_half};
use super::config::{Activation, ModelConfig};
use super::device::ComputeDevice;
use super::host::{self, HostLayer, HostRun, Scratch};
use super::linear::{self, Linear};
use super::ops::{Matrix, matmul_many};
use crate::quant::OutputRows;

/// Prompts longer than this run in chunks, bounding the attention scores' memory.
const PREFILL_CHUNK: usize = 256;

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
    /// A forward pass was asked to run no tokens.
    #[error("there are no tokens to run")]
    NoTokens,
    /// The sequence was made by a model of another shape or device.
    #[error(
        "the sequence belongs to another model (made by `Model::new_sequence` of a different model or device)"
    )]
    ForeignSequence,
    /// The requested compute device cannot be used.
    #[error("device `{device}` is unavailable: {message}")]
    Device {
        device: ComputeDevice,
        message: String,
    },
}

/// An RMS norm's weights, for both passes.
struct Norm {
    /// For the fused CPU pass.
    host: Vec<f32>,
    /// For the Burn pass, `[1, len]`.
    device: Tensor<2>,
}

impl Norm {
    /// The weights shaped to scale each head of `[n, heads, len]`.
    fn per_head(&self) -> Tensor<3> {
        let [_, len] = self.device.dims();
        self.device.clone().reshape([1, 1, len])
    }
}

struct Layer {
    attn_norm: Norm,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    post_attn_norm: Option<Norm>,
    ffn_norm: Norm,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: Option<Norm>,
}

impl Layer {
    /// The layer as the fused CPU pass reads it: every matrix quantized.
    fn host(&self) -> HostLayer<'_> {
        fn m(l: &Linear) -> &Matrix {
            match l {
                Linear::Quantized(m) => m,
                Linear::Dense(_) => unreachable!("the CPU pass keeps matrices quantized"),
            }
        }
        fn v(n: &Option<Norm>) -> Option<&[f32]> {
            n.as_ref().map(|n| n.host.as_slice())
        }
        HostLayer {
            attn_norm: &self.attn_norm.host,
            wq: m(&self.wq),
            wk: m(&self.wk),
            wv: m(&self.wv),
            wo: m(&self.wo),
            q_norm: v(&self.q_norm),
            k_norm: v(&self.k_norm),
            post_attn_norm: v(&self.post_attn_norm),
            ffn_norm: &self.ffn_norm.host,
            gate: m(&self.gate),
            up: m(&self.up),
            down: m(&self.down),
            post_ffn_norm: v(&self.post_ffn_norm),
        }
    }
}

/// A loaded model: its configuration and weights on a compute device.
pub struct Model {
    file: Arc<GgufFile>,
    config: ModelConfig,
    compute: ComputeDevice,
    device: Device,
    /// Embedding rows are looked up in the mapped file (quantized) on every device.
    token_embd: Matrix,
    output: Linear,
    output_norm: Norm,
    layers: Vec<Layer>,
    /// Buffers of the fused CPU pass, reused from pass to pass.
    scratch: Mutex<Vec<Scratch>>,
    /// Logits rows handed back ([`Model::recycle_logits`]) for the next
    /// step to write into.
    spare_logits: Mutex<SpareLogits>,
}

/// Logits rows to reuse, at most as many as the largest step returned.
#[derive(Default)]
struct SpareLogits {
    rows: Vec<Vec<f32>>,
    most: usize,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("device", &self.compute)
            .finish()
    }
}

/// One sequence's state: its KV cache (where its model's pass keeps it) and position.
pub struct Sequence {
    cache: KvCache,
    len: usize,
    capacity: usize,
}

/// A sequence's keys and values for every layer.
enum KvCache {
    /// The fused CPU pass's, per layer.
    Host(Vec<HostKv>),
    /// The Burn pass's: per layer `[kv_heads, allocated, head_dim]` tensors,
    /// `None` only while a pass holds them (so updates happen in place).
    Device(Vec<Option<(Tensor<3>, Tensor<3>)>>),
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
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

    /// A CPU sequence of `len` tokens in one layer of one one-value head,
    /// for tests of code that copies, continues and measures sequences.
    #[cfg(test)]
    pub(crate) fn filled_for_tests(len: usize) -> Sequence {
        let mut kv = HostKv::with_capacity(len, 1, 1);
        let rows: Vec<f32> = (0..len).map(|i| i as f32).collect();
        kv.append(&rows, &rows);
        Sequence {
            cache: KvCache::Host(vec![kv]),
            len,
            capacity: len,
        }
    }

    /// The first `len` tokens of this (frozen) sequence, shared, then `more`
    /// tokens of its own: what [`Model::continue_prefix`] and a prompt's
    /// remaining tokens give, for tests.
    #[cfg(test)]
    pub(crate) fn continued_for_tests(&self, len: usize, more: usize) -> Sequence {
        let KvCache::Host(layers) = &self.cache else {
            panic!("test sequences are CPU sequences")
        };
        let rows: Vec<f32> = (0..more).map(|i| (len + i) as f32).collect();
        let layers = layers
            .iter()
            .map(|kv| {
                let mut next = kv.continued(len, more);
                next.append(&rows, &rows);
                next
            })
            .collect();
        Sequence {
            cache: KvCache::Host(layers),
            len: len + more,
            capacity: len + more,
        }
    }

    /// The frozen buffers this sequence's first positions are shared from,
    /// each with how many positions it holds (`None` on a device, where
    /// nothing is shared): identical for every layer, so told by the first.
    pub(crate) fn shared_buffers(&self) -> Option<Vec<(usize, usize)>> {
        match &self.cache {
            KvCache::Host(layers) => Some(layers.first().map_or_else(Vec::new, |kv| {
                kv.shared_buffers()
                    .into_iter()
                    .map(|(buffer, positions)| (buffer as usize, positions))
                    .collect()
            })),
            KvCache::Device(_) => None,
        }
    }

    /// Most tokens the sequence can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets everything after the first `len` tokens.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        if let KvCache::Host(layers) = &mut self.cache {
            layers.iter_mut().for_each(|kv| kv.truncate(self.len));
        }
    }

    /// A copy of the first `len` cached tokens in buffers of exactly that
    /// size (nothing shared with `self`), holding up to `capacity` tokens.
    /// On the CPU the copy is frozen: sequences continued from it
    /// ([`Model::continue_prefix`]) share its keys and values instead of
    /// copying them.
    pub fn copy_prefix(&self, len: usize, capacity: usize) -> Sequence {
        let len = len.min(self.len);
        let cache = match &self.cache {
            KvCache::Host(layers) => {
                KvCache::Host(layers.iter().map(|kv| kv.frozen(len)).collect())
            }
            KvCache::Device(layers) => KvCache::Device(
                layers
                    .iter()
                    .map(|slot| {
                        let (keys, values) = slot.as_ref().expect("cache present between passes");
                        Some((resized(keys, len, len), resized(values, len, len)))
                    })
                    .collect(),
            ),
        };
        Sequence {
            cache,
            len,
            capacity: capacity.max(len),
        }
    }

    /// Makes room for `needed` tokens, growing the cache geometrically.
    fn reserve(&mut self, needed: usize) {
        let layers = match &mut self.cache {
            KvCache::Host(layers) => {
                for kv in layers {
                    kv.reserve(needed, self.capacity);
                }
                return;
            }
            KvCache::Device(layers) => layers,
        };
        for slot in layers {
            let (keys, values) = slot.take().expect("cache present between passes");
            let [_, allocated, _] = keys.dims();
            if needed <= allocated {
                *slot = Some((keys, values));
                continue;
            }
            let grown = needed.max(allocated * 2).min(self.capacity);
            *slot = Some((
                resized(&keys, self.len, grown),
                resized(&values, self.len, grown),
            ));
        }
    }
}

/// A new `[kv_heads, allocated, head_dim]` cache buffer holding the first
/// `len` positions of `old`.
fn resized(old: &Tensor<3>, len: usize, allocated: usize) -> Tensor<3> {
    let [kv_heads, _, head_dim] = old.dims();
    let fresh = Tensor::<3>::zeros([kv_heads, allocated.max(1), head_dim], &old.device());
    if len == 0 {
        return fresh;
    }
    fresh.slice_assign(s![.., 0..len, ..], old.clone().narrow(1, 0, len))
}

impl Model {
    /// Loads the model in `file` onto `compute`.
    pub fn load(file: Arc<GgufFile>, compute: ComputeDevice) -> Result<Self, ModelError> {
        let config = ModelConfig::from_gguf(&file)?;
        let device = compute
            .burn_device()
            .map_err(|message| ModelError::Device {
                device: compute,
                message,
            })?;
        let c = &config;
        let quantized = compute != ComputeDevice::Gpu;
        let matrix = |name: &str, cols: usize, rows: usize| -> Result<Matrix, ModelError> {
            let t = file.tensor(name)?;
            let mut m = Matrix::from_tensor(t).ok_or_else(|| ModelError::BadTensor {
                tensor: name.into(),
                message: format!("type {} cannot be used as a matrix", t.ggml_type),
            })?;
            if m.cols != cols || m.rows != rows {
                return Err(ModelError::BadTensor {
                    tensor: name.into(),
                    message: format!("shape {}x{}, expected {rows}x{cols}", m.rows, m.cols),
                });
            }
            if quantized {
                m.interleave(&file);
            }
            Ok(m)
        };
        let linear = |name: &str, cols: usize, rows: usize| -> Result<Linear, ModelError> {
            Ok(Linear::new(
                matrix(name, cols, rows)?,
                &file,
                &device,
                quantized,
            ))
        };
        // Norm weights are small: dequantized to f32 on the device.
        let vector = |name: &str, len: usize| -> Result<Vec<f32>, ModelError> {
            let m = matrix(name, len, 1)?;
            let mut v = vec![0f32; len];
            m.row(&file, 0, &mut v);
            Ok(v)
        };
        let norm = |name: &str, len: usize| -> Result<Norm, ModelError> {
            let host = vector(name, len)?;
            let device = Tensor::from_data(TensorData::new(host.clone(), [1, len]), &device);
            Ok(Norm { host, device })
        };
        let optional = |name: &str, len: usize| -> Result<Option<Norm>, ModelError> {
            match file.tensor(name) {
                Ok(_) => norm(name, len).map(Some),
                Err(_) => Ok(None),
            }
        };
        let head_norm = |name: &str| optional(name, c.head_dim);
        let (q_dim, kv_dim) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            let layer = Layer {
                attn_norm: norm(&n("attn_norm.weight"), c.n_embd)?,
                wq: linear(&n("attn_q.weight"), c.n_embd, q_dim)?,
                wk: linear(&n("attn_k.weight"), c.n_embd, kv_dim)?,
                wv: linear(&n("attn_v.weight"), c.n_embd, kv_dim)?,
                wo: linear(&n("attn_output.weight"), q_dim, c.n_embd)?,
                q_norm: head_norm(&n("attn_q_norm.weight"))?,
                k_norm: head_norm(&n("attn_k_norm.weight"))?,
                post_attn_norm: optional(&n("post_attention_norm.weight"), c.n_embd)?,
                ffn_norm: norm(&n("ffn_norm.weight"), c.n_embd)?,
                gate: linear(&n("ffn_gate.weight"), c.n_embd, c.n_ff)?,
                up: linear(&n("ffn_up.weight"), c.n_embd, c.n_ff)?,
                down: linear(&n("ffn_down.weight"), c.n_ff, c.n_embd)?,
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
            Ok(_) => linear("output.weight", c.n_embd, c.vocab_size)?,
            Err(_) => Linear::new(token_embd.clone(), &file, &device, quantized),
        };
        let output_norm = norm("output_norm.weight", c.n_embd)?;
        // Reading each tensor mapped the first pages of its neighbours back
        // in (the kernel maps pages around a fault); let them go again.
        for layer in &layers {
            for linear in [
                &layer.wq,
                &layer.wk,
                &layer.wv,
                &layer.wo,
                &layer.gate,
                &layer.up,
                &layer.down,
            ] {
                if let Linear::Quantized(m) = linear {
                    m.release_copied(&file);
                }
            }
        }
        if let Linear::Quantized(m) = &output {
            m.release_copied(&file);
        }
        token_embd.release_copied(&file);
        Ok(Model {
            config,
            compute,
            device,
            token_embd,
            output,
            output_norm,
            layers,
            file,
            scratch: Mutex::new(Vec::new()),
            spare_logits: Mutex::new(SpareLogits::default()),
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

    /// The device the model runs on.
    pub fn device(&self) -> ComputeDevice {
        self.compute
    }

    /// A sequence starting with the first `len` tokens of `prefix`,
    /// holding up to `capacity` tokens (at most the context length). On the
    /// CPU, tokens a frozen `prefix` ([`Sequence::copy_prefix`]) holds are
    /// shared with it, read-only: many sequences starting with one cached
    /// prompt keep one copy of its keys and values. Otherwise they are copied.
    pub fn continue_prefix(&self, prefix: &Sequence, len: usize, capacity: usize) -> Sequence {
        let capacity = capacity.min(self.config.context_length);
        let len = len.min(prefix.len);
        let KvCache::Host(layers) = &prefix.cache else {
            return prefix.copy_prefix(len, capacity);
        };
        // Short sequences never reallocate; long ones grow as they go.
        let room = capacity.saturating_sub(len).min(256);
        Sequence {
            cache: KvCache::Host(layers.iter().map(|kv| kv.continued(len, room)).collect()),
            len,
            capacity: capacity.max(len),
        }
    }

    /// An empty sequence holding up to `capacity` tokens (at most the context length).
    pub fn new_sequence(&self, capacity: usize) -> Sequence {
        let c = &self.config;
        let capacity = capacity.min(c.context_length).max(1);
        // Short sequences never reallocate; long ones grow as they go.
        let allocated = capacity.min(256);
        let cache = if self.compute == ComputeDevice::Cpu {
            KvCache::Host(
                (0..c.n_layer)
                    .map(|_| HostKv::with_capacity(allocated, c.n_head_kv, c.head_dim))
                    .collect(),
            )
        } else {
            let empty = || Tensor::<3>::zeros([c.n_head_kv, allocated, c.head_dim], &self.device);
            KvCache::Device((0..c.n_layer).map(|_| Some((empty(), empty()))).collect())
        };
        Sequence {
            cache,
            len: 0,
            capacity,
        }
    }

    /// Runs `tokens` through the model at the sequence's next positions and
    /// returns the logits of the token after the last one.
    pub fn forward(&self, seq: &mut Sequence, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let hidden = self.run_chunked(seq, tokens, |_| {})?;
        let d = self.config.n_embd;
        let [logits] = <[Vec<f32>; 1]>::try_from(self.logits(&hidden[hidden.len() - d..]))
            .expect("one row in, one row of logits out");
        Ok(logits)
    }

    /// One step of several sequences at once: each runs its own tokens at its
    /// own positions (attention stays within a sequence), while every linear
    /// layer reads its weights once for all of them. Returns, per item that
    /// asked for them, the logits after its last token. Nothing runs unless
    /// every item is valid. The caller bounds the total tokens (no chunking).
    pub fn step(&self, batch: &mut [BatchItem<'_>]) -> Result<Vec<Option<Vec<f32>>>, ModelError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for item in batch.iter() {
            self.check(item.seq, item.tokens)?;
        }
        let hidden = rayon::scope(|_| {
            let mut runs: Vec<(&mut Sequence, &[u32])> = batch
                .iter_mut()
                .map(|item| (&mut *item.seq, item.tokens))
                .collect();
            self.run(&mut runs)
        });
        let d = self.config.n_embd;
        let mut last_rows = Vec::new();
        let mut row = 0;
        for item in batch.iter() {
            row += item.tokens.len();
            if item.logits {
                last_rows.extend_from_slice(&hidden[(row - 1) * d..row * d]);
            }
        }
        let mut logits = if last_rows.is_empty() {
            Vec::new()
        } else {
            self.logits(&last_rows)
        }
        .into_iter();
        Ok(batch
            .iter()
            .map(|item| item.logits.then(|| logits.next()).flatten())
            .collect())
    }

    /// Runs `tokens` through the model and returns each one's final
    /// (normalized) hidden state, `tokens.len()` rows of `n_embd`.
    pub fn hidden_states(
        &self,
        seq: &mut Sequence,
        tokens: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        let mut rows = Vec::with_capacity(tokens.len() * self.config.n_embd);
        let last = self.run_chunked(seq, tokens, |hidden| rows.extend(hidden))?;
        rows.extend(last);
        Ok(rows)
    }

    /// Whether `seq`'s cache has the shape and place this model's passes use.
    fn made(&self, seq: &Sequence) -> bool {
        let c = &self.config;
        match &seq.cache {
            KvCache::Host(layers) => {
                self.compute == ComputeDevice::Cpu
                    && layers.len() == c.n_layer
                    && layers
                        .iter()
                        .all(|kv| kv.shape() == (c.n_head_kv, c.head_dim))
            }
            KvCache::Device(layers) => {
                self.compute != ComputeDevice::Cpu
                    && layers.len() == c.n_layer
                    && layers.iter().flatten().all(|(keys, values)| {
                        let [heads, _, dim] = keys.dims();
                        keys.dims() == values.dims()
                            && (heads, dim) == (c.n_head_kv, c.head_dim)
                            && keys.device() == self.device
                    })
            }
        }
    }

    /// Errors unless `tokens` can run next in `seq`.
    fn check(&self, seq: &Sequence, tokens: &[u32]) -> Result<(), ModelError> {
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(ModelError::BadToken(bad));
        }
        if tokens.is_empty() {
            return Err(ModelError::NoTokens);
        }
        if !self.made(seq) {
            return Err(ModelError::ForeignSequence);
        }
        if seq.len + tokens.len() > seq.capacity {
            return Err(ModelError::ContextFull(seq.capacity));
        }
        Ok(())
    }

    /// Checks `tokens` fit, then runs them in chunks; `each` sees every
    /// chunk's hidden states but the last, which is returned.
    fn run_chunked(
        &self,
        seq: &mut Sequence,
        tokens: &[u32],
        mut each: impl FnMut(Vec<f32>) + Send,
    ) -> Result<Vec<f32>, ModelError> {
        self.check(seq, tokens)?;
        // On a worker of the thread pool the kernels use: the pass's serial
        // work and its parallel products then share the pool's threads, and a
        // caller outside the pool does not compete with them for the cores.
        rayon::scope(|_| {
            let mut chunks = tokens.chunks(PREFILL_CHUNK).peekable();
            loop {
                let chunk = chunks.next().expect("checked: at least one token");
                let hidden = self.run(&mut [(&mut *seq, chunk)]);
                if chunks.peek().is_none() {
                    return Ok(hidden);
                }
                each(hidden);
            }
        })
    }

    /// Hands logits that [`Model::step`] or [`Model::forward`] returned
    /// back once read: the next steps write into them instead of into
    /// fresh memory, which the allocator would map and the kernel zero on
    /// every step. Keeps at most as many as the largest step returned.
    pub fn recycle_logits(&self, rows: impl IntoIterator<Item = Vec<f32>>) {
        let vocab = self.config.vocab_size;
        let mut spare = self.spare_logits.lock().unwrap_or_else(|p| p.into_inner());
        let most = spare.most;
        let room = most.saturating_sub(spare.rows.len());
        let rows = rows.into_iter().filter(|row| row.len() == vocab).take(room);
        spare.rows.extend(rows);
    }

    /// `n` rows of `len` logits to write into, recycled ones first.
    fn logits_rows(&self, n: usize, len: usize) -> Vec<Vec<f32>> {
        let mut spare = self.spare_logits.lock().unwrap_or_else(|p| p.into_inner());
        spare.most = spare.most.max(n);
        let reused = spare.rows.len().saturating_sub(n);
        let mut rows: Vec<Vec<f32>> = spare
            .rows
            .drain(reused..)
            .filter(|r| r.len() == len)
            .collect();
        drop(spare);
        rows.resize_with(n, || vec![0f32; len]);
        rows
    }

    /// The logits of each row of `hidden` (final hidden states), one vector per row.
    fn logits(&self, hidden: &[f32]) -> Vec<Vec<f32>> {
        let d = self.config.n_embd;
        let n = hidden.len() / d;
        match &self.output {
            Linear::Quantized(m) => {
                // Each row's logits written by the kernels where they are returned.
                let mut rows = self.logits_rows(n, m.rows);
                let work = [(m, OutputRows::separate(&mut rows))];
                matmul_many(&self.file, &work, hidden, n);
                drop(work);
                rows
            }
            Linear::Dense(_) => {
                let x =
                    Tensor::<2>::from_data(TensorData::new(hidden.to_vec(), [n, d]), &self.device);
                let [logits] = linear::apply(&self.file, [&self.output], x);
                let logits = to_vec(logits);
                logits
                    .chunks_exact(logits.len() / n)
                    .map(<[f32]>::to_vec)
                    .collect()
            }
        }
    }

    /// The forward pass for valid runs of tokens that fit their sequences;
    /// returns the final hidden states of all tokens, run after run.
    fn run(&self, runs: &mut [(&mut Sequence, &[u32])]) -> Vec<f32> {
        for (seq, tokens) in runs.iter_mut() {
            seq.reserve(seq.len + tokens.len());
        }
        if self.compute != ComputeDevice::Cpu {
            return to_vec(self.run_graph(runs));
        }
        let mut host_runs: Vec<HostRun<'_>> = runs
            .iter_mut()
            .map(|(seq, tokens)| match &mut seq.cache {
                KvCache::Host(layers) => {
                    // A pass that panicked midway may have appended to some layers.
                    layers.iter_mut().for_each(|kv| kv.truncate(seq.len));
                    HostRun {
                        cache: layers,
                        first: seq.len,
                        tokens,
                    }
                }
                KvCache::Device(_) => unreachable!("CPU models make host caches"),
            })
            .collect();
        let layers: Vec<HostLayer<'_>> = self.layers.iter().map(Layer::host).collect();
        let mut scratch = self
            .scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        let hidden = host::run(
            &self.config,
            &self.file,
            &self.token_embd,
            &layers,
            &self.output_norm.host,
            &mut host_runs,
            &mut scratch,
        );
        self.scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(scratch);
        for (seq, tokens) in runs.iter_mut() {
            seq.len += tokens.len();
        }
        hidden
    }

    /// [`Model::run`] as Burn tensor operations.
    fn run_graph(&self, runs: &mut [(&mut Sequence, &[u32])]) -> Tensor<2> {
        let c = &self.config;
        let file = &*self.file;
        let n: usize = runs.iter().map(|(_, tokens)| tokens.len()).sum();
        let mut embd = vec![0f32; n * c.n_embd];
        let mut positions = Vec::with_capacity(n);
        let mut rows = embd.chunks_exact_mut(c.n_embd);
        for (seq, tokens) in runs.iter_mut() {
            positions.extend(seq.len..seq.len + tokens.len());
            for (&t, row) in tokens.iter().zip(&mut rows) {
                self.token_embd.row(file, t as usize, row);
                if c.embed_scale != 1.0 {
                    row.iter_mut().for_each(|v| *v *= c.embed_scale);
                }
            }
        }
        let mut x = Tensor::<2>::from_data(TensorData::new(embd, [n, c.n_embd]), &self.device);
        let tables =
            |base| RopeTables::new(positions.iter().copied(), c.rope_dims, base, &self.device);
        let rope_global = tables(c.rope_base);
        let rope_local = (c.sliding_window.is_some() && c.rope_base_local != c.rope_base)
            .then(|| tables(c.rope_base_local));

        for (il, layer) in self.layers.iter().enumerate() {
            let local = c.is_local(il);
            let rope = match (&rope_local, local) {
                (Some(tables), true) => tables,
                _ => &rope_global,
            };
            let h = rms_norm(x.clone(), &layer.attn_norm.device, c.rms_eps);
            let [q, k, v] = linear::apply(file, [&layer.wq, &layer.wk, &layer.wv], h);
            let mut q: Tensor<3> = q.reshape([n, c.n_head, c.head_dim]);
            let mut k: Tensor<3> = k.reshape([n, c.n_head_kv, c.head_dim]);
            let v: Tensor<3> = v.reshape([n, c.n_head_kv, c.head_dim]);
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = rms_norm(q, &qn.per_head(), c.rms_eps);
                k = rms_norm(k, &kn.per_head(), c.rms_eps);
            }
            let q = rope.apply(q, c.rope_dims, c.rope_style);
            let k = rope.apply(k, c.rope_dims, c.rope_style);

            let window = c.sliding_window.filter(|_| local);
            let mut outputs = Vec::with_capacity(runs.len());
            let mut row = 0;
            for (seq, tokens) in runs.iter_mut() {
                let rows = tokens.len();
                let part = |t: &Tensor<3>| t.clone().narrow(0, row, rows);
                outputs.push(self.attend(seq, il, part(&q), part(&k), part(&v), window));
                row += rows;
            }
            let attn = if outputs.len() == 1 {
                outputs.pop().expect("one output")
            } else {
                Tensor::cat(outputs, 0)
            };

            let [mut o] = linear::apply(file, [&layer.wo], attn);
            if let Some(norm) = &layer.post_attn_norm {
                o = rms_norm(o, &norm.device, c.rms_eps);
            }
            x = x + o;

            let h = rms_norm(x.clone(), &layer.ffn_norm.device, c.rms_eps);
            let [gate, up] = linear::apply(file, [&layer.gate, &layer.up], h);
            let gate = match c.activation {
                Activation::Silu => activation::silu(gate),
                Activation::GeluTanh => activation::gelu_approximate(gate),
            };
            let [mut down] = linear::apply(file, [&layer.down], gate * up);
            if let Some(norm) = &layer.post_ffn_norm {
                down = rms_norm(down, &norm.device, c.rms_eps);
            }
            x = x + down;
        }
        for (seq, tokens) in runs.iter_mut() {
            seq.len += tokens.len();
        }
        rms_norm(x, &self.output_norm.device, c.rms_eps)
    }

    /// Layer `il`'s attention for one sequence's run: stores its keys and
    /// values in the cache at the sequence's next positions, then attends.
    fn attend(
        &self,
        seq: &mut Sequence,
        il: usize,
        q: Tensor<3>,
        k: Tensor<3>,
        v: Tensor<3>,
        window: Option<usize>,
    ) -> Tensor<2> {
        let [n, _, _] = q.dims();
        let pos = seq.len;
        let KvCache::Device(cache) = &mut seq.cache else {
            unreachable!("Burn models make device caches")
        };
        let (keys, values) = cache[il].take().expect("cache present between passes");
        let (k, v) = (round_to_half(k), round_to_half(v));
        let keys = keys.slice_assign(s![.., pos..pos + n, ..], k.swap_dims(0, 1));
        let values = values.slice_assign(s![.., pos..pos + n, ..], v.swap_dims(0, 1));
        let span = AttentionSpan {
            first_query: pos,
            queries: n,
            window,
        };
        let (first, len) = (span.first_key(), span.keys());
        let out = attention(
            q,
            keys.clone().narrow(1, first, len),
            values.clone().narrow(1, first, len),
            span,
            self.config.query_scale,
        );
        cache[il] = Some((keys, values));
        out
    }
}

/// One sequence's part of a batched [`Model::step`].
pub struct BatchItem<'a> {
    /// The sequence the tokens continue.
    pub seq: &'a mut Sequence,
    /// Its tokens for this step (prompt chunk or one decoded token).
    pub tokens: &'a [u32],
    /// Whether to return the logits after its last token.
    pub logits: bool,
}

/// A tensor's values, row-major (reading them back from the device).
pub(crate) fn to_vec<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .try_into_vec::<f32>()
        .expect("the model's tensors are f32")
}
