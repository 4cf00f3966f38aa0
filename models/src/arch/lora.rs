//! LoRA adapters as llama.cpp writes them (`convert_lora_to_gguf.py`), and
//! their low-rank deltas added per sequence in the fused CPU pass.
//!
//! An adapter file has `general.type = adapter`, `adapter.type = lora`,
//! `adapter.lora.alpha`, and for each adapted weight `W` (`rows × cols`) of
//! its base model two tensors, `<W>.lora_a` (`rank × cols`) and `<W>.lora_b`
//! (`rows × rank`). A sequence with the adapter computes `W x + s · B (A x)`
//! with `s = scale · alpha / rank` (`scale` when alpha is 0), as llama.cpp
//! does. The base product `W x` is shared by every sequence of a batch;
//! only the small delta is per sequence, so sequences with different
//! adapters (or none) run in one step.
//!
//! The factors are small (rank × (rows + cols) values a weight), but a
//! decoding token is bound by the bytes it reads: an adapter of rank 16 on
//! every weight of SmolLM2 is 20 MB in f32 beside the model's 98 MB, so
//! they are kept in f16 (half the bytes; converted with F16C on AVX2 CPUs).
//! `A x` is `rank` dot products as long as the input; `B` is kept
//! transposed, so that `B v` is `rank` long vector additions (`B`'s rows
//! are only `rank` long: a dot call per output value cost more in calls
//! than in arithmetic). Within a layer each target's factors are tens of KB, so a
//! batch's tokens with the same adapter find them in cache. Each adapted
//! target and token is one task (`A x`, then `B` times that) into a buffer
//! of its own, run in the same pool dispatch as the group's base products:
//! two more dispatches per group (240 per token of SmolLM2) cost more than
//! the deltas' arithmetic (measured with `realm-host bench --adapters`).

use crate::gguf::{GgmlType, GgufFile};
use crate::isa::{Isa, isa};

use super::config::ModelConfig;
use super::ops::Matrix;

/// Why an adapter cannot be used with a model.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// The file is not a LoRA adapter.
    #[error("not a LoRA adapter: {0}")]
    NotAnAdapter(String),
    /// The adapter was made for another model.
    #[error("the adapter does not fit this model: {0}")]
    Mismatch(String),
    /// A tensor is missing, misnamed, of the wrong shape or an unreadable type.
    #[error("adapter tensor `{tensor}`: {message}")]
    BadTensor {
        /// The tensor's name.
        tensor: String,
        /// What is wrong.
        message: String,
    },
}

/// The seven weights of a layer a delta may adapt, in the order of
/// `LayerWeights::matrices` (query, key, value, output, gate, up, down).
pub(crate) const TARGETS: usize = 7;

/// One adapted weight's factors.
#[derive(Debug, Clone)]
pub(crate) struct Delta {
    rank: usize,
    cols: usize,
    /// `A`, `rank × cols` row-major, f16 bits.
    a: Vec<u16>,
    /// `Bᵀ`, `rank × rows` row-major, f16 bits.
    bt: Vec<u16>,
    /// `scale · alpha / rank`.
    scale: f32,
}

/// A LoRA adapter, checked against the model it was loaded for.
#[derive(Debug)]
pub struct LoraAdapter {
    /// Unique to this load: keys and values computed with the adapter are
    /// reused only by sequences with the same one.
    id: u64,
    alpha: f32,
    scale: f32,
    /// Per layer, per target, the delta if the adapter adapts it.
    layers: Vec<[Option<Delta>; TARGETS]>,
    /// The base model's shape, to refuse running on another.
    n_embd: usize,
    /// What the factors take in memory.
    bytes: usize,
    /// Names of the adapted base tensors, sorted.
    targets: Vec<String>,
    rank: usize,
    /// This CPU's copies of the two loops.
    kernels: Kernels,
    /// The factors as tensors on the Burn device of the first graph model
    /// that ran the adapter.
    graph: std::sync::OnceLock<std::sync::Arc<GraphFactors>>,
}

/// What an adapter file holds, checked against a base model from the
/// files' headers alone (no factor is read): see [`LoraAdapter::check`].
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterShape {
    /// `adapter.lora.alpha` (0: the scale applies as is).
    pub alpha: f32,
    /// The largest rank among its weights.
    pub rank: usize,
    /// Bytes its factors will take in memory once loaded (f16).
    pub bytes: usize,
    /// The base tensors it adapts, sorted.
    pub targets: Vec<String>,
}

/// One adapted weight, checked: where its factors go.
struct Planned {
    weight: String,
    layer: usize,
    /// `(target slot, rows)` fed by the weight's rows, in order.
    slots: Vec<(usize, usize)>,
    a: Matrix,
    b: Matrix,
    cols: usize,
}

/// Checks every tensor of `adapter` against the base weight it adapts.
fn plan(
    adapter: &GgufFile,
    base: &GgufFile,
    config: &ModelConfig,
) -> Result<(f32, Vec<Planned>), LoraError> {
    let kind = adapter.get_str("general.type").unwrap_or("model");
    if kind != "adapter" {
        return Err(LoraError::NotAnAdapter(format!(
            "its general.type is `{kind}`, not `adapter`"
        )));
    }
    let kind = adapter.get_str("adapter.type").unwrap_or("none");
    if kind != "lora" {
        return Err(LoraError::NotAnAdapter(format!(
            "its adapter.type is `{kind}`; only `lora` is supported"
        )));
    }
    let arch = adapter.get_str("general.architecture").unwrap_or("unknown");
    if arch != config.architecture {
        return Err(LoraError::Mismatch(format!(
            "it adapts a `{arch}` model; this one is `{}`",
            config.architecture
        )));
    }
    let alpha = adapter.get_f64("adapter.lora.alpha").unwrap_or(0.0) as f32;
    let mut planned = Vec::new();
    for t in adapter.tensors() {
        let Some(weight) = t.name.strip_suffix(".lora_a") else {
            if !t.name.ends_with(".lora_b") {
                return Err(bad(
                    &t.name,
                    "is neither a `.lora_a` nor a `.lora_b` factor",
                ));
            }
            if adapter
                .tensor(&format!("{}.lora_a", &t.name[..t.name.len() - 7]))
                .is_err()
            {
                return Err(bad(&t.name, "has no `.lora_a` factor beside it"));
            }
            continue;
        };
        let b_name = format!("{weight}.lora_b");
        let (layer, mut slots) = target(weight, config)
            .ok_or_else(|| bad(&t.name, &format!("adapting `{weight}` is not supported")))?;
        // Without a gate, `ffn_up` holds the gate's rows then the up's (phi3).
        if weight.ends_with(".ffn_up.weight")
            && base
                .tensor(&format!("blk.{layer}.ffn_gate.weight"))
                .is_err()
        {
            slots = vec![(4, config.n_ff), (5, config.n_ff)];
        }
        let w = base
            .tensor(weight)
            .ok()
            .and_then(Matrix::from_tensor)
            .ok_or_else(|| bad(&t.name, &format!("the base model has no matrix `{weight}`")))?;
        let a = factor(adapter, &t.name)?;
        let b = factor(adapter, &b_name)?;
        let r = a.rows;
        if r == 0 || a.cols != w.cols {
            return Err(bad(
                &t.name,
                &format!(
                    "shape {}x{}, expected rank x {} for `{weight}`",
                    a.rows, a.cols, w.cols
                ),
            ));
        }
        let fed: usize = slots.iter().map(|&(_, rows)| rows).sum();
        if b.cols != r || b.rows != w.rows || fed != w.rows {
            return Err(bad(
                &b_name,
                &format!(
                    "shape {}x{}, expected {}x{r} for `{weight}`",
                    b.rows, b.cols, w.rows
                ),
            ));
        }
        planned.push(Planned {
            weight: weight.to_string(),
            layer,
            slots,
            a,
            b,
            cols: w.cols,
        });
    }
    if planned.is_empty() {
        return Err(LoraError::NotAnAdapter(
            "it has no `.lora_a`/`.lora_b` tensors".into(),
        ));
    }
    Ok((alpha, planned))
}

impl LoraAdapter {
    /// Checks the adapter in `adapter` against the model in `base`
    /// (described by `config`) as [`load`](Self::load) does, from the
    /// headers alone: what loading it would give, or why it cannot load.
    pub fn check(
        adapter: &GgufFile,
        base: &GgufFile,
        config: &ModelConfig,
    ) -> Result<AdapterShape, LoraError> {
        let (alpha, planned) = plan(adapter, base, config)?;
        let mut targets: Vec<String> = planned.iter().map(|p| p.weight.clone()).collect();
        targets.sort();
        Ok(AdapterShape {
            alpha,
            rank: planned.iter().map(|p| p.a.rows).max().unwrap_or(0),
            // `A` is kept once per target a fused weight feeds.
            bytes: (planned.iter())
                .map(|p| (p.a.rows * p.a.cols * p.slots.len() + p.b.rows * p.b.cols) * 2)
                .sum(),
            targets,
        })
    }

    /// Reads the adapter in `adapter` for the model in `base` (described by
    /// `config`), applied at `scale` (1.0 as trained); every tensor is
    /// checked against the base weight it adapts.
    pub fn load(
        adapter: &GgufFile,
        base: &GgufFile,
        config: &ModelConfig,
        scale: f32,
    ) -> Result<Self, LoraError> {
        if !scale.is_finite() {
            return Err(LoraError::Mismatch(format!("scale {scale} is not finite")));
        }
        let (alpha, planned) = plan(adapter, base, config)?;
        let mut layers: Vec<[Option<Delta>; TARGETS]> =
            (0..config.n_layer).map(|_| Default::default()).collect();
        let mut targets = Vec::new();
        let mut bytes = 0;
        let mut rank = 0;
        for p in planned {
            let r = p.a.rows;
            let a_values: Vec<u16> = p.a.values(adapter).iter().map(|&v| half(v)).collect();
            let b_values = p.b.values(adapter);
            bytes += (a_values.len() * p.slots.len() + b_values.len()) * 2;
            rank = rank.max(r);
            let s = if alpha != 0.0 {
                scale * alpha / r as f32
            } else {
                scale
            };
            // A fused weight (phi3's `attn_qkv`, `ffn_up`) feeds several
            // targets: each takes its rows of `B`.
            let mut first = 0;
            for (slot, rows) in p.slots {
                // Bᵀ of this target's rows `first..first + rows`.
                let mut bt = vec![0u16; r * rows];
                for (o, row) in b_values[first * r..(first + rows) * r]
                    .chunks_exact(r)
                    .enumerate()
                {
                    for (j, &v) in row.iter().enumerate() {
                        bt[j * rows + o] = half(v);
                    }
                }
                layers[p.layer][slot] = Some(Delta {
                    rank: r,
                    cols: p.cols,
                    a: a_values.clone(),
                    bt,
                    scale: s,
                });
                first += rows;
            }
            targets.push(p.weight);
        }
        targets.sort();
        static LOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(LoraAdapter {
            id: LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            alpha,
            scale,
            layers,
            n_embd: config.n_embd,
            bytes,
            targets,
            rank,
            kernels: Kernels::for_cpu(),
            graph: std::sync::OnceLock::new(),
        })
    }

    /// This load's identity: two loads of one file differ.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// `adapter.lora.alpha`.
    pub fn alpha(&self) -> f32 {
        self.alpha
    }

    /// The scale it is applied at.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// The largest rank among its weights.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The base tensors it adapts, sorted.
    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    /// Bytes its factors take in memory.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether it was loaded for a model shaped as `config`.
    pub(crate) fn fits(&self, config: &ModelConfig) -> bool {
        self.layers.len() == config.n_layer && self.n_embd == config.n_embd
    }

    fn delta(&self, layer: usize, slot: usize) -> Option<&Delta> {
        self.layers.get(layer)?[slot].as_ref()
    }

    /// The factors as tensors on `device` (made once there, for the Burn
    /// graph: each weight's `Aᵀ` and `Bᵀ` in f32, and its scale).
    pub(crate) fn graph_factors(
        &self,
        device: &burn_tensor::Device,
    ) -> std::sync::Arc<GraphFactors> {
        let made = self
            .graph
            .get_or_init(|| std::sync::Arc::new(GraphFactors::new(self, device)));
        if made.device == *device {
            made.clone()
        } else {
            // Another device (an adapter shared by two models): not kept.
            std::sync::Arc::new(GraphFactors::new(self, device))
        }
    }
}

/// An adapter's factors on a Burn device, per layer and target:
/// `(Aᵀ [cols, rank], Bᵀ [rank, rows], scale)`.
#[derive(Debug)]
pub(crate) struct GraphFactors {
    device: burn_tensor::Device,
    layers: Vec<[Option<(burn_tensor::Tensor<2>, burn_tensor::Tensor<2>, f32)>; TARGETS]>,
}

impl GraphFactors {
    fn new(adapter: &LoraAdapter, device: &burn_tensor::Device) -> Self {
        use burn_tensor::{Tensor, TensorData};
        let widen = |bits: &[u16]| -> Vec<f32> {
            bits.iter()
                .map(|&b| half::f16::from_bits(b).to_f32())
                .collect()
        };
        let layers = (adapter.layers.iter())
            .map(|targets| {
                targets.each_ref().map(|delta| {
                    let d = delta.as_ref()?;
                    let rows = d.bt.len() / d.rank;
                    let a = Tensor::<2>::from_data(
                        TensorData::new(widen(&d.a), [d.rank, d.cols]),
                        device,
                    );
                    let bt = Tensor::<2>::from_data(
                        TensorData::new(widen(&d.bt), [d.rank, rows]),
                        device,
                    );
                    Some((a.transpose(), bt, d.scale))
                })
            })
            .collect();
        GraphFactors {
            device: device.clone(),
            layers,
        }
    }

    /// `(Aᵀ, Bᵀ, scale)` of layer `layer`'s target `slot`, if adapted.
    pub(crate) fn get(
        &self,
        layer: usize,
        slot: usize,
    ) -> Option<&(burn_tensor::Tensor<2>, burn_tensor::Tensor<2>, f32)> {
        self.layers.get(layer)?[slot].as_ref()
    }
}

/// The adapter deltas of one group of targets sharing an input (`slots` of
/// layer `layer`), for every token whose adapter adapts them: `scale · B (A
/// x)`, a task per target and few tokens of one adapter. The tasks write only their
/// own buffer, so they run in the same pool dispatch as the base products
/// of that input ([`matmul_many_beside`](super::ops::matmul_many_beside)),
/// where waking the pool twice more per group cost more than the deltas'
/// arithmetic; [`add_to`](Self::add_to) then adds them to the products.
pub(crate) struct DeltaPass<'a, const N: usize> {
    /// Per task: target, the factors, the adapter (for its kernels), and
    /// its tokens (a range of `rows`).
    tasks: Vec<(usize, &'a Delta, &'a LoraAdapter, std::ops::Range<usize>)>,
    /// Per adapted target and token: target, token, and where its delta
    /// starts in `sums`.
    rows: Vec<(usize, usize, usize)>,
    x: &'a [f32],
    cols: usize,
    /// Each target's output width.
    lens: [usize; N],
    /// The deltas, row after row.
    sums: Vec<f32>,
    /// `sums`' start, through which the tasks write their own ranges.
    sums_start: *mut f32,
}

/// Tokens with the same adapter a task takes at most: its factors are read
/// once for them (from memory once, then from cache), while prompts of many
/// tokens still spread over the threads.
const TASK_TOKENS: usize = 4;

impl<'a, const N: usize> DeltaPass<'a, N> {
    /// The pass for tokens with `adapters` (one per token of `x`, `cols`
    /// values a token), targets `slots` of layer `layer` with output widths
    /// `lens`; `None` when no token's adapter adapts any of them.
    pub(crate) fn new(
        adapters: &[Option<&'a LoraAdapter>],
        layer: usize,
        slots: [usize; N],
        x: &'a [f32],
        cols: usize,
        lens: [usize; N],
    ) -> Option<Self> {
        let (mut tasks, mut rows) = (Vec::new(), Vec::new());
        let mut at = 0;
        // The distinct adapters, in the order of their first token.
        let mut distinct: Vec<&LoraAdapter> = Vec::new();
        for a in adapters.iter().flatten() {
            if !distinct.iter().any(|d| std::ptr::eq(*d, *a)) {
                distinct.push(a);
            }
        }
        for (target, &slot) in slots.iter().enumerate() {
            for &a in &distinct {
                let Some(d) = a.delta(layer, slot) else {
                    continue;
                };
                debug_assert_eq!(d.cols, cols);
                let tokens = (adapters.iter().enumerate())
                    .filter(|(_, b)| b.is_some_and(|b| std::ptr::eq(b, a)))
                    .map(|(t, _)| t);
                let first = rows.len();
                for t in tokens {
                    rows.push((target, t, at));
                    at += lens[target];
                }
                for start in (first..rows.len()).step_by(TASK_TOKENS) {
                    tasks.push((target, d, a, start..(start + TASK_TOKENS).min(rows.len())));
                }
            }
        }
        if tasks.is_empty() {
            return None;
        }
        let mut sums = vec![0f32; at];
        let sums_start = sums.as_mut_ptr();
        Some(DeltaPass {
            tasks,
            rows,
            x,
            cols,
            lens,
            sums,
            sums_start,
        })
    }

    /// How many tasks [`run`](Self::run) takes.
    pub(crate) fn tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Task `i`: the deltas of one target for a few tokens with the same
    /// adapter.
    ///
    /// # Safety
    /// Each `i < self.tasks()` runs once, and nothing reads the deltas until
    /// every task has returned.
    pub(crate) unsafe fn run(&self, i: usize) {
        let (target, d, a, ref rows) = self.tasks[i];
        let len = self.lens[target];
        let mut stack = [0f32; 64];
        let mut heap = Vec::new();
        let v = if d.rank <= stack.len() {
            &mut stack[..d.rank]
        } else {
            heap.resize(d.rank, 0f32);
            &mut heap[..]
        };
        for &(_, t, at) in &self.rows[rows.clone()] {
            let xt = &self.x[t * self.cols..(t + 1) * self.cols];
            for (vj, row) in v.iter_mut().zip(d.a.chunks_exact(self.cols)) {
                *vj = (a.kernels.dot)(row, xt) * d.scale;
            }
            // SAFETY: this task alone writes `sums[at..at + len]`: it runs
            // once (the caller's promise), and rows are disjoint (`new`).
            let out = unsafe { std::slice::from_raw_parts_mut(self.sums_start.add(at), len) };
            for (j, &vj) in v.iter().enumerate() {
                (a.kernels.axpy)(vj, &d.bt[j * len..(j + 1) * len], out);
            }
        }
    }

    /// Adds the deltas to the products `outs` (`n` token rows each,
    /// token-major), once every task has run.
    pub(crate) fn add_to(self, outs: [&mut [f32]; N]) {
        for &(target, t, at) in &self.rows {
            let len = self.lens[target];
            let row = &mut outs[target][t * len..(t + 1) * len];
            for (o, d) in row.iter_mut().zip(&self.sums[at..at + len]) {
                *o += d;
            }
        }
    }
}

// SAFETY: tasks share `&self` and write disjoint ranges of `sums` through
// `sums_start` (see `run`; the buffer does not move while the pass lives);
// all else is read only.
unsafe impl<const N: usize> Sync for DeltaPass<'_, N> {}

/// `v` as f16 bits.
fn half(v: f32) -> u16 {
    half::f16::from_f32(v).to_bits()
}

/// The delta's two loops, in the copy this CPU runs best.
#[derive(Debug, Clone, Copy)]
struct Kernels {
    /// `a · x`, `a` in f16 bits, over equal lengths.
    dot: fn(&[u16], &[f32]) -> f32,
    /// `y += s · x`, `x` in f16 bits, over equal lengths.
    axpy: fn(f32, &[u16], &mut [f32]),
}

impl Kernels {
    fn for_cpu() -> Self {
        match isa() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Kernels {
                dot: avx2::dot,
                axpy: avx2::axpy,
            },
            _ => Kernels {
                dot: generic::dot,
                axpy: generic::axpy,
            },
        }
    }
}

mod generic {
    use half::f16;

    pub(super) fn dot(a: &[u16], x: &[f32]) -> f32 {
        a.iter()
            .zip(x)
            .map(|(&a, x)| f16::from_bits(a).to_f32() * x)
            .sum()
    }

    pub(super) fn axpy(s: f32, x: &[u16], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y += s * f16::from_bits(x).to_f32();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    pub(super) fn dot(a: &[u16], x: &[f32]) -> f32 {
        // SAFETY: only chosen by `Kernels::for_cpu` when the CPU reported
        // AVX2, FMA and F16C.
        unsafe { dot_avx2(a, x) }
    }

    pub(super) fn axpy(s: f32, x: &[u16], y: &mut [f32]) {
        // SAFETY: as for `dot`.
        unsafe { axpy_avx2(s, x, y) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_avx2(a: &[u16], x: &[f32]) -> f32 {
        let n = a.len().min(x.len());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads 8 values at `i..i + 8` (16 bytes of f16,
        // 32 of f32), within both slices while `i + 8 <= n`.
        unsafe {
            while i + 32 <= n {
                for (k, acc) in acc.iter_mut().enumerate() {
                    let j = i + 8 * k;
                    let h = _mm256_cvtph_ps(_mm_loadu_si128(a.as_ptr().add(j).cast()));
                    *acc = _mm256_fmadd_ps(h, _mm256_loadu_ps(x.as_ptr().add(j)), *acc);
                }
                i += 32;
            }
            while i + 8 <= n {
                let h = _mm256_cvtph_ps(_mm_loadu_si128(a.as_ptr().add(i).cast()));
                acc[0] = _mm256_fmadd_ps(h, _mm256_loadu_ps(x.as_ptr().add(i)), acc[0]);
                i += 8;
            }
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 values.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        lanes.iter().sum::<f32>() + super::generic::dot(&a[i..n], &x[i..n])
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn axpy_avx2(s: f32, x: &[u16], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let scale = _mm256_set1_ps(s);
        let mut i = 0;
        // SAFETY: every access covers `i..i + 8` of both slices, within
        // them while `i + 8 <= n`.
        unsafe {
            while i + 8 <= n {
                let h = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().add(i).cast()));
                let p = y.as_mut_ptr().add(i);
                _mm256_storeu_ps(p, _mm256_fmadd_ps(scale, h, _mm256_loadu_ps(p)));
                i += 8;
            }
        }
        super::generic::axpy(s, &x[i..n], &mut y[i..n]);
    }
}

fn bad(tensor: &str, message: &str) -> LoraError {
    LoraError::BadTensor {
        tensor: tensor.into(),
        message: message.into(),
    }
}

/// A factor tensor, of a type whose values can be read.
fn factor(file: &GgufFile, name: &str) -> Result<Matrix, LoraError> {
    let t = file
        .tensor(name)
        .map_err(|_| bad(name, "is missing (every `.lora_a` needs its `.lora_b`)"))?;
    if !matches!(t.ggml_type, GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0) {
        return Err(bad(
            name,
            &format!("type {} is not supported (F32, F16 or Q8_0)", t.ggml_type),
        ));
    }
    Matrix::from_tensor(t).ok_or_else(|| bad(name, "its shape does not fit its type's blocks"))
}

/// The layer of the base weight `name` and the targets it feeds, each with
/// its rows (one target, or the parts of a fused weight in order).
fn target(name: &str, c: &ModelConfig) -> Option<(usize, Vec<(usize, usize)>)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, weight) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer >= c.n_layer {
        return None;
    }
    let (q, kv) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
    let slots = match weight {
        "attn_q.weight" => vec![(0, q)],
        "attn_k.weight" => vec![(1, kv)],
        "attn_v.weight" => vec![(2, kv)],
        "attn_qkv.weight" => vec![(0, q), (1, kv), (2, kv)],
        "attn_output.weight" => vec![(3, c.n_embd)],
        "ffn_gate.weight" => vec![(4, c.n_ff)],
        "ffn_up.weight" => vec![(5, c.n_ff)],
        "ffn_down.weight" => vec![(6, c.n_embd)],
        _ => return None,
    };
    Some((layer, slots))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This CPU's kernels agree with the portable ones, tails included.
    #[test]
    fn kernels_agree_with_the_portable_loops() {
        let k = Kernels::for_cpu();
        for n in [0, 1, 7, 8, 31, 32, 33, 100, 576] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 19) as f32 - 9.0) / 7.0).collect();
            let a: Vec<u16> = (0..n)
                .map(|i| half(((i * 11 % 23) as f32 - 11.0) / 5.0))
                .collect();
            let (got, want) = ((k.dot)(&a, &x), generic::dot(&a, &x));
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "dot {n}: {got} vs {want}"
            );
            let mut y = x.clone();
            let mut y_want = x.clone();
            (k.axpy)(0.75, &a, &mut y);
            generic::axpy(0.75, &a, &mut y_want);
            for (g, w) in y.iter().zip(&y_want) {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "axpy {n}: {g} vs {w}"
                );
            }
        }
    }
}
