//! The CPU backend: Realm's fused pass ([`super::host`]) over quantized
//! weights in the mapped file, with per-layer [`HostKv`] caches that
//! sequences can share prefixes of.

use std::sync::Mutex;

use crate::gguf::GgufFile;
use crate::quant::OutputRows;

use super::attend::HostKv;
use super::config::ModelConfig;
use super::host::{self, HostRun, Scratch};
use super::ops::matmul_many;
use super::transformer::ModelError;
use super::weights::{self, FileWeights};

/// A model's weights and reusable buffers for the fused CPU pass.
pub(crate) struct CpuModel {
    weights: FileWeights,
    /// Buffers of the fused pass, reused from pass to pass.
    scratch: Mutex<Vec<Scratch>>,
    /// Logits rows handed back ([`CpuModel::recycle_logits`]) for the next
    /// step to write into.
    spare_logits: Mutex<SpareLogits>,
}

/// Logits rows to reuse, at most as many as the largest step returned.
#[derive(Default)]
struct SpareLogits {
    rows: Vec<Vec<f32>>,
    most: usize,
}

/// A sequence's keys and values on the CPU: one [`HostKv`] per layer.
pub(crate) type CpuCache = Vec<HostKv>;

impl CpuModel {
    /// Reads the weights, interleaving those the kernels read so.
    pub(crate) fn load(file: &GgufFile, config: &ModelConfig) -> Result<Self, ModelError> {
        Ok(CpuModel {
            weights: weights::load(file, config, true)?,
            scratch: Mutex::new(Vec::new()),
            spare_logits: Mutex::new(SpareLogits::default()),
        })
    }

    /// An empty cache with room for `allocated` tokens before it grows.
    pub(crate) fn new_cache(config: &ModelConfig, allocated: usize) -> CpuCache {
        (0..config.n_layer)
            .map(|_| HostKv::with_capacity(allocated, config.n_head_kv, config.head_dim))
            .collect()
    }

    /// Whether `cache` has the shape of this model's.
    pub(crate) fn fits(config: &ModelConfig, cache: &CpuCache) -> bool {
        cache.len() == config.n_layer
            && cache
                .iter()
                .all(|kv| kv.shape() == (config.n_head_kv, config.head_dim))
    }

    /// The forward pass of `runs`; returns the final hidden states of all
    /// their tokens, run after run.
    pub(crate) fn run(
        &self,
        config: &ModelConfig,
        file: &GgufFile,
        runs: &mut [HostRun<'_>],
    ) -> Vec<f32> {
        let mut scratch = self
            .scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        let hidden = host::run(config, file, &self.weights, runs, &mut scratch);
        self.scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(scratch);
        hidden
    }

    /// The logits of each row of `hidden` (`n_embd` values a row), each
    /// written by the kernels where it is returned.
    pub(crate) fn logits(&self, file: &GgufFile, hidden: &[f32], n: usize) -> Vec<Vec<f32>> {
        let output = &self.weights.output;
        let mut rows = self.logits_rows(n, output.rows);
        let work = [(output, OutputRows::separate(&mut rows))];
        matmul_many(file, &work, hidden, n);
        drop(work);
        rows
    }

    /// Keeps logits rows of `vocab` values for later steps to write into, at
    /// most as many as the largest step returned.
    pub(crate) fn recycle_logits(&self, vocab: usize, rows: impl IntoIterator<Item = Vec<f32>>) {
        let mut spare = self.spare_logits.lock().unwrap_or_else(|p| p.into_inner());
        let room = spare.most.saturating_sub(spare.rows.len());
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
}
