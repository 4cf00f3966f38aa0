//! The decoder-only transformer as callers see it: a [`Model`] on one of
//! two backends — the fused CPU pass ([`super::cpu`]) or the Burn graph
//! ([`super::graph`]) — chosen here, at load, and nowhere else; per-sequence
//! KV caches in the chosen backend's form; and the forward pass batched over
//! runs of tokens (a whole prompt chunk at once, or one token of many
//! sequences).

use std::sync::Arc;

use crate::gguf::{GgufError, GgufFile};

use super::config::ModelConfig;
use super::cpu::{CpuCache, CpuModel};
use super::device::ComputeDevice;
use super::graph::{GraphHidden, GraphModel, GraphRun};
use super::graph_cache::GraphCache;
use super::host::HostRun;
use super::lora::{LoraAdapter, LoraError};

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
    /// The sequence was made by a model of another shape or backend.
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
    /// An adapter cannot be used with this model.
    #[error(transparent)]
    Adapter(#[from] LoraError),
}

/// A device allocator's holdings ([`Model::device_memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes of live allocations.
    pub in_use: u64,
    /// Bytes reserved from the device: live allocations and pages kept for
    /// reuse.
    pub reserved: u64,
}

/// A loaded model: its configuration and weights on one backend.
pub struct Model {
    file: Arc<GgufFile>,
    config: ModelConfig,
    compute: ComputeDevice,
    backend: Backend,
}

/// The two ways a model runs; the one place that tells them apart.
enum Backend {
    /// [`ComputeDevice::Cpu`]: the fused pass.
    Cpu(Box<CpuModel>),
    /// [`ComputeDevice::BurnCpu`] and [`ComputeDevice::Gpu`]: the Burn graph.
    Graph(Box<GraphModel>),
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("device", &self.compute)
            .finish()
    }
}

/// One sequence's state: its KV cache (in its model's backend's form) and position.
pub struct Sequence {
    cache: KvCache,
    len: usize,
    capacity: usize,
    /// The adapter every token of this sequence runs with (its keys and
    /// values are the adapted model's).
    adapter: Option<Arc<LoraAdapter>>,
}

/// A sequence's keys and values for every layer, as its backend keeps them.
enum KvCache {
    Cpu(CpuCache),
    Graph(GraphCache),
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
        let mut kv = super::attend::HostKv::with_capacity(len, 1, 1);
        let rows: Vec<f32> = (0..len).map(|i| i as f32).collect();
        kv.append(&rows, &rows);
        Sequence {
            cache: KvCache::Cpu(vec![kv]),
            len,
            capacity: len,
            adapter: None,
        }
    }

    /// The first `len` tokens of this (frozen) sequence, shared, then `more`
    /// tokens of its own: what [`Model::continue_prefix`] and a prompt's
    /// remaining tokens give, for tests.
    #[cfg(test)]
    pub(crate) fn continued_for_tests(&self, len: usize, more: usize) -> Sequence {
        let KvCache::Cpu(layers) = &self.cache else {
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
            cache: KvCache::Cpu(layers),
            len: len + more,
            capacity: len + more,
            adapter: self.adapter.clone(),
        }
    }

    /// The frozen buffers this sequence's first positions are shared from,
    /// each with how many positions it holds (`None` on the graph backend,
    /// where nothing is shared): identical for every layer, so told by the first.
    pub(crate) fn shared_buffers(&self) -> Option<Vec<(usize, usize)>> {
        match &self.cache {
            KvCache::Cpu(layers) => Some(layers.first().map_or_else(Vec::new, |kv| {
                kv.shared_buffers()
                    .into_iter()
                    .map(|(buffer, positions)| (buffer as usize, positions))
                    .collect()
            })),
            KvCache::Graph(_) => None,
        }
    }

    /// Most tokens the sequence can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets everything after the first `len` tokens.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        if let KvCache::Cpu(layers) = &mut self.cache {
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
            KvCache::Cpu(layers) => KvCache::Cpu(layers.iter().map(|kv| kv.frozen(len)).collect()),
            KvCache::Graph(cache) => KvCache::Graph(cache.copy_prefix(len)),
        };
        Sequence {
            cache,
            len,
            capacity: capacity.max(len),
            adapter: self.adapter.clone(),
        }
    }

    /// The adapter the sequence runs with.
    pub fn adapter(&self) -> Option<&Arc<LoraAdapter>> {
        self.adapter.as_ref()
    }

    /// Runs the tokens from now on with `adapter`: for a sequence whose
    /// cached tokens were computed with the same one (the prefix cache keeps
    /// them without it, so that it never holds an adapter in memory).
    pub(crate) fn set_adapter(&mut self, adapter: Option<Arc<LoraAdapter>>) {
        self.adapter = adapter;
    }

    /// Makes room for `needed` tokens, growing the cache geometrically.
    fn reserve(&mut self, needed: usize) {
        match &mut self.cache {
            KvCache::Cpu(layers) => layers
                .iter_mut()
                .for_each(|kv| kv.reserve(needed, self.capacity)),
            KvCache::Graph(cache) => cache.reserve(self.len, needed, self.capacity),
        }
    }
}

impl Model {
    /// Loads the model in `file` onto `compute`.
    pub fn load(file: Arc<GgufFile>, compute: ComputeDevice) -> Result<Self, ModelError> {
        let config = ModelConfig::from_gguf(&file)?;
        let backend = match compute {
            ComputeDevice::Cpu => Backend::Cpu(Box::new(CpuModel::load(&file, &config)?)),
            ComputeDevice::BurnCpu | ComputeDevice::Gpu => {
                Backend::Graph(Box::new(GraphModel::load(&file, &config, compute)?))
            }
        };
        Ok(Model {
            file,
            config,
            compute,
            backend,
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

    /// Bytes of the weights as the device keeps them (on a GPU: the
    /// matrices' blocks, padded to words, and the norms); 0 on the CPU,
    /// where they stay in the mapped file.
    pub fn device_bytes(&self) -> u64 {
        match &self.backend {
            Backend::Cpu(_) => 0,
            Backend::Graph(graph) => graph.device_bytes() as u64,
        }
    }

    /// What the device's allocator holds now, for every model and sequence
    /// on it: `None` on the CPU.
    pub fn device_memory(&self) -> Option<DeviceMemory> {
        match &self.backend {
            Backend::Cpu(_) => None,
            Backend::Graph(graph) => graph.device_memory(),
        }
    }

    /// A sequence starting with the first `len` tokens of `prefix`,
    /// holding up to `capacity` tokens (at most the context length). On the
    /// CPU, tokens a frozen `prefix` ([`Sequence::copy_prefix`]) holds are
    /// shared with it, read-only: many sequences starting with one cached
    /// prompt keep one copy of its keys and values. Otherwise they are copied.
    pub fn continue_prefix(&self, prefix: &Sequence, len: usize, capacity: usize) -> Sequence {
        let capacity = capacity.min(self.config.context_length);
        let len = len.min(prefix.len);
        let KvCache::Cpu(layers) = &prefix.cache else {
            return prefix.copy_prefix(len, capacity);
        };
        // Short sequences never reallocate; long ones grow as they go.
        let room = capacity.saturating_sub(len).min(256);
        Sequence {
            cache: KvCache::Cpu(layers.iter().map(|kv| kv.continued(len, room)).collect()),
            len,
            capacity: capacity.max(len),
            adapter: prefix.adapter.clone(),
        }
    }

    /// An empty sequence holding up to `capacity` tokens (at most the context length).
    pub fn new_sequence(&self, capacity: usize) -> Sequence {
        let c = &self.config;
        let capacity = capacity.min(c.context_length).max(1);
        // Short sequences never reallocate; long ones grow as they go.
        let allocated = capacity.min(256);
        let cache = match &self.backend {
            Backend::Cpu(_) => KvCache::Cpu(CpuModel::new_cache(c, allocated)),
            Backend::Graph(graph) => KvCache::Graph(graph.new_cache(c, allocated)),
        };
        Sequence {
            cache,
            len: 0,
            capacity,
            adapter: None,
        }
    }

    /// An empty sequence whose tokens all run with `adapter` (one loaded for
    /// this model, [`Model::load_adapter`]), on any backend.
    pub fn new_adapted_sequence(
        &self,
        capacity: usize,
        adapter: Arc<LoraAdapter>,
    ) -> Result<Sequence, ModelError> {
        if !adapter.fits(&self.config) {
            return Err(
                LoraError::Mismatch("it was loaded for a model of another shape".into()).into(),
            );
        }
        let mut seq = self.new_sequence(capacity);
        seq.adapter = Some(adapter);
        Ok(seq)
    }

    /// Reads the LoRA adapter in `file` for this model, applied at `scale`
    /// (1.0 as trained), checking every tensor against the weight it adapts.
    pub fn load_adapter(&self, file: &GgufFile, scale: f32) -> Result<LoraAdapter, ModelError> {
        Ok(LoraAdapter::load(file, &self.file, &self.config, scale)?)
    }

    /// Runs `tokens` through the model at the sequence's next positions and
    /// returns the logits of the token after the last one.
    pub fn forward(&self, seq: &mut Sequence, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let hidden = self.run_chunked(seq, tokens, |_| {})?;
        let last = hidden.rows(self.config.n_embd) - 1;
        let [logits] = <[Vec<f32>; 1]>::try_from(self.logits(hidden, &[last]))
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
        })?;
        let mut wanted = Vec::new();
        let mut row = 0;
        for item in batch.iter() {
            row += item.tokens.len();
            if item.logits {
                wanted.push(row - 1);
            }
        }
        let mut logits = if wanted.is_empty() {
            Vec::new()
        } else {
            self.logits(hidden, &wanted)
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
        let last = self.run_chunked(seq, tokens, |hidden| rows.extend(hidden.into_host()))?;
        rows.extend(last.into_host());
        Ok(rows)
    }

    /// Whether `seq`'s cache has the backend and shape of this model's.
    fn made(&self, seq: &Sequence) -> bool {
        match (&self.backend, &seq.cache) {
            (Backend::Cpu(_), KvCache::Cpu(cache)) => CpuModel::fits(&self.config, cache),
            (Backend::Graph(graph), KvCache::Graph(cache)) => graph.fits(&self.config, cache),
            _ => false,
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
        mut each: impl FnMut(Hidden<'_>) + Send,
    ) -> Result<Hidden<'_>, ModelError> {
        self.check(seq, tokens)?;
        // On a worker of the thread pool the kernels use: the pass's serial
        // work and its parallel products then share the pool's threads, and a
        // caller outside the pool does not compete with them for the cores.
        rayon::scope(|_| {
            let mut chunks = tokens.chunks(PREFILL_CHUNK).peekable();
            loop {
                let chunk = chunks.next().expect("checked: at least one token");
                let hidden = self.run(&mut [(&mut *seq, chunk)])?;
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
        if let Backend::Cpu(cpu) = &self.backend {
            cpu.recycle_logits(self.config.vocab_size, rows);
        }
    }

    /// The logits of rows `wanted` of a pass's final hidden states, one
    /// vector per wanted row. On the graph only those rows' logits leave the
    /// device.
    fn logits(&self, hidden: Hidden<'_>, wanted: &[usize]) -> Vec<Vec<f32>> {
        let mut rows = match hidden {
            Hidden::Host(cpu, all) => {
                let d = self.config.n_embd;
                let picked: Vec<f32> = (wanted.iter())
                    .flat_map(|&r| &all[r * d..(r + 1) * d])
                    .copied()
                    .collect();
                cpu.logits(&self.file, &picked, wanted.len())
            }
            Hidden::Graph(graph, all) => graph.logits(&self.file, *all, wanted),
        };
        if let Some(cap) = self.config.final_softcap {
            for v in rows.iter_mut().flatten() {
                *v = (*v / cap).tanh() * cap;
            }
        }
        rows
    }

    /// The forward pass for checked runs of tokens that fit their sequences
    /// ([`Model::check`]); returns the final hidden states of all tokens,
    /// run after run.
    fn run(&self, runs: &mut [(&mut Sequence, &[u32])]) -> Result<Hidden<'_>, ModelError> {
        for (seq, tokens) in runs.iter_mut() {
            seq.reserve(seq.len + tokens.len());
        }
        let hidden = match &self.backend {
            Backend::Cpu(cpu) => {
                let mut host_runs = Vec::with_capacity(runs.len());
                for (seq, tokens) in runs.iter_mut() {
                    let seq: &mut Sequence = seq;
                    let KvCache::Cpu(layers) = &mut seq.cache else {
                        return Err(ModelError::ForeignSequence);
                    };
                    // A pass that panicked midway may have appended to some layers.
                    layers.iter_mut().for_each(|kv| kv.truncate(seq.len));
                    host_runs.push(HostRun {
                        cache: layers,
                        first: seq.len,
                        tokens,
                        adapter: seq.adapter.as_deref(),
                    });
                }
                Hidden::Host(cpu, cpu.run(&self.config, &self.file, &mut host_runs))
            }
            Backend::Graph(graph) => {
                let mut graph_runs = Vec::with_capacity(runs.len());
                for (seq, tokens) in runs.iter_mut() {
                    let seq: &mut Sequence = seq;
                    let KvCache::Graph(cache) = &mut seq.cache else {
                        return Err(ModelError::ForeignSequence);
                    };
                    graph_runs.push(GraphRun {
                        cache,
                        first: seq.len,
                        tokens,
                        adapter: seq.adapter.as_deref(),
                    });
                }
                Hidden::Graph(
                    graph,
                    Box::new(graph.run(&self.config, &self.file, &mut graph_runs)),
                )
            }
        };
        for (seq, tokens) in runs.iter_mut() {
            seq.len += tokens.len();
        }
        Ok(hidden)
    }
}

/// A pass's final hidden states, where its backend left them, with the
/// backend that makes their logits.
enum Hidden<'m> {
    /// On the host, row after row (the fused CPU pass).
    Host(&'m CpuModel, Vec<f32>),
    /// On the graph's device, read back only when asked.
    Graph(&'m GraphModel, Box<GraphHidden>),
}

impl Hidden<'_> {
    /// How many token rows the pass ran (of `d` values each).
    fn rows(&self, d: usize) -> usize {
        match self {
            Hidden::Host(_, rows) => rows.len() / d,
            Hidden::Graph(_, hidden) => hidden.rows(),
        }
    }

    /// The rows on the host, row after row.
    fn into_host(self) -> Vec<f32> {
        match self {
            Hidden::Host(_, rows) => rows,
            Hidden::Graph(_, hidden) => hidden.into_host(),
        }
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
