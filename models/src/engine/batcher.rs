//! Continuous batching: one thread per model steps every running generation
//! together. Each step runs one decoded token of every decoding sequence and
//! chunks of waiting prompts (within a token budget) as one batch, so the
//! weights are read once per step however many tenants are generating. New
//! requests join between steps; tenants share the sequence slots by weight;
//! a cancelled generation leaves at once; prompts that start like a recent
//! one of the same tenant reuse its cached keys and values (the prefix
//! cache, [`super::prefix`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::arch::pool::SpinPool;
use crate::arch::{BatchItem, LoraAdapter, Model, Sequence};
use crate::tokenizer::Tokenizer;

use super::decode::Decoder;
use super::prefix::PrefixCache;
use super::{Completion, Constraint, EngineError, FinishReason, GenerateParams};

/// How a batcher shares its model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatcherConfig {
    /// Most generations running at once; more wait their turn.
    pub max_sequences: usize,
    /// Most tokens one step runs (decoded tokens plus prompt chunks).
    pub step_tokens: usize,
    /// Bytes of prompts' keys and values kept for reuse by later prompts
    /// of the same tenant (as the CPU cache stores them); 0 disables the
    /// prefix cache.
    pub prefix_cache_bytes: usize,
    /// Prompt beginnings (text, tokenized as prompts are) whose cache any
    /// tenant may share: only prompts that start with a whole one share it.
    pub public_prefixes: Vec<String>,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            max_sequences: 32,
            step_tokens: 256,
            prefix_cache_bytes: 64 << 20,
            public_prefixes: Vec::new(),
        }
    }
}

/// Where a generation's text goes as it is produced.
pub trait TextSink: Send {
    /// Offers a piece of text without waiting.
    fn offer(&mut self, piece: String) -> Offer;
}

/// What a [`TextSink`] did with a piece.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Taken.
    Taken,
    /// No room now: the piece comes back, and the generation pauses (only
    /// this one) until there is room.
    Full(String),
    /// The reader is gone: the generation is cancelled.
    Closed,
}

/// Receives the end of a generation.
pub(crate) type OnDone = Box<dyn FnOnce(Result<Completion, EngineError>) + Send>;

/// One generation request, as the scheduler takes it.
pub(crate) struct Job {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// What to generate.
    pub params: GenerateParams,
    /// Who asked: slots are shared fairly between tenants.
    pub tenant: String,
    /// The tenant's share relative to others (at least 1).
    pub weight: u32,
    /// Set to stop the generation; it leaves the batch at the next step.
    pub cancel: Arc<AtomicBool>,
    /// Streams the text; `None` delivers it only with the completion.
    pub sink: Option<Box<dyn TextSink>>,
    /// What the output must match.
    pub constraint: Option<Constraint>,
    /// The adapter it runs with.
    pub adapter: Option<Arc<LoraAdapter>>,
    /// Called once with the result, after the last piece was taken.
    pub done: OnDone,
}

/// What a batcher is doing, for metrics.
#[derive(Debug, Default)]
pub struct BatcherLoad {
    waiting: AtomicUsize,
    running: AtomicUsize,
    steps: AtomicUsize,
    prefix_hits: AtomicUsize,
    kv_tokens: AtomicUsize,
    kv_capacity: AtomicUsize,
}

/// A batcher's queue and KV cache at one moment (what a load balancer such
/// as the Gateway API Inference Extension routes on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStatus {
    /// Generations waiting for a slot.
    pub waiting: usize,
    /// Generations in the batch (paused ones included).
    pub running: usize,
    /// KV-cache tokens the generations in the batch hold: each holds its
    /// prompt plus its `max_tokens` from admission.
    pub kv_tokens: usize,
    /// KV-cache tokens the batch can hold: `max-sequences` full contexts.
    pub kv_capacity: usize,
}

impl BatchStatus {
    /// The share of the KV cache in use, 0 to 1.
    pub fn kv_usage(&self) -> f64 {
        if self.kv_capacity == 0 {
            0.0
        } else {
            (self.kv_tokens as f64 / self.kv_capacity as f64).min(1.0)
        }
    }
}

impl BatcherLoad {
    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
    /// Generations in the batch.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }
    /// Steps run so far.
    pub fn steps(&self) -> usize {
        self.steps.load(Ordering::Relaxed)
    }
    /// Prompts that reused a cached prefix.
    pub fn prefix_hits(&self) -> usize {
        self.prefix_hits.load(Ordering::Relaxed)
    }
    /// The queue and KV cache now.
    pub fn status(&self) -> BatchStatus {
        BatchStatus {
            waiting: self.waiting(),
            running: self.running(),
            kv_tokens: self.kv_tokens.load(Ordering::Relaxed),
            kv_capacity: self.kv_capacity.load(Ordering::Relaxed),
        }
    }
}

/// The handle to a model's batching thread. Dropping it lets the thread
/// finish the running generations and exit.
pub struct Batcher {
    jobs: Mutex<Sender<Job>>,
    load: Arc<BatcherLoad>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("load", &self.load).finish()
    }
}

impl Batcher {
    /// Starts the batching thread for `model`.
    pub(crate) fn start(
        model: Arc<Model>,
        tokenizer: Arc<Tokenizer>,
        config: BatcherConfig,
    ) -> Result<Batcher, EngineError> {
        let (jobs, receiver) = mpsc::channel();
        let load = Arc::new(BatcherLoad::default());
        let c = model.config();
        load.kv_capacity.store(
            config.max_sequences.max(1) * c.context_length,
            Ordering::Relaxed,
        );
        // f16 keys and values: two per head dimension, per layer.
        let bytes_per_token = c.n_layer * 2 * c.n_head_kv * c.head_dim * 2;
        let mut public = Vec::new();
        for text in &config.public_prefixes {
            let tokens = tokenizer.encode_prompt(text);
            if tokens.len() < super::prefix::MIN_PREFIX {
                return Err(EngineError::InvalidInput(format!(
                    "public prefix {text:?} is {} tokens; shorter than {} is not worth caching",
                    tokens.len(),
                    super::prefix::MIN_PREFIX
                )));
            }
            public.push(tokens);
        }
        let mut scheduler = Scheduler {
            prefixes: PrefixCache::new(config.prefix_cache_bytes, bytes_per_token, public),
            model,
            tokenizer,
            config,
            receiver,
            waiting: Waiting::default(),
            running: Vec::new(),
            load: load.clone(),
            admissions: 0,
        };
        std::thread::Builder::new()
            .name("realm-batcher".into())
            .spawn(move || scheduler.run())
            .map_err(EngineError::Thread)?;
        Ok(Batcher {
            jobs: Mutex::new(jobs),
            load,
        })
    }

    /// Queues `job`; its `done` is called when it ends (at once if the
    /// batcher has stopped).
    pub(crate) fn submit(&self, job: Job) {
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job);
        if let Err(mpsc::SendError(job)) = sent {
            (job.done)(Err(EngineError::Stopped));
        }
    }

    /// What the batcher is doing.
    pub fn load(&self) -> &BatcherLoad {
        &self.load
    }
}

/// A generation in the batch.
struct Running {
    /// Whose generation this is (its prompt is cached in its scope).
    tenant: Arc<str>,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// Prompt tokens the prefix cache supplied.
    cached: usize,
    /// The token to run next once the prompt is in.
    next: Option<u32>,
    seq: Sequence,
    /// `None` once decoding ended.
    decoder: Option<Decoder>,
    /// Text the sink has not taken yet; the generation waits while it holds any.
    outbox: VecDeque<String>,
    /// The result, once decoding ended (delivered after the outbox empties).
    completion: Option<Result<Completion, EngineError>>,
    cancel: Arc<AtomicBool>,
    sink: Option<Box<dyn TextSink>>,
    done: OnDone,
    /// Paused (its cache kept) so a tenant below its share can run.
    paused: bool,
    /// Logits whose constraint's mask was not ready when the step ended:
    /// sampled once it is, while the others go on (a slow grammar delays
    /// its own sequence, never the batch).
    parked: Option<Vec<f32>>,
    /// The tenant's weight.
    weight: u32,
    /// Admission order, newest highest: the newest is paused first.
    admitted: u64,
}

impl Running {
    /// Samples from `logits` now if its mask is ready; else keeps a copy
    /// for [`Running::unpark`].
    fn accept_or_park(&mut self, logits: &[f32], tokenizer: &Tokenizer) {
        if self.decoder.as_mut().is_some_and(|d| !d.is_ready()) {
            self.parked = Some(logits.to_vec());
        } else {
            self.accept(logits, tokenizer);
        }
    }

    /// Samples the parked logits if the mask is ready, or (`wait`) once it is.
    fn unpark(&mut self, tokenizer: &Tokenizer, wait: bool) -> bool {
        let ready = self.decoder.as_mut().is_none_or(Decoder::is_ready);
        if !(ready || wait) {
            return false;
        }
        match self.parked.take() {
            Some(logits) => {
                self.accept(&logits, tokenizer);
                self.flush();
                true
            }
            None => false,
        }
    }

    /// Hands queued text to the sink; cancels if the reader is gone.
    fn flush(&mut self) {
        let Some(sink) = &mut self.sink else {
            self.outbox.clear();
            return;
        };
        while let Some(piece) = self.outbox.pop_front() {
            match sink.offer(piece) {
                Offer::Taken => {}
                Offer::Full(piece) => {
                    self.outbox.push_front(piece);
                    return;
                }
                Offer::Closed => {
                    self.outbox.clear();
                    self.cancel.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    /// Ready to run this step: not finished, not paused for another
    /// tenant, and not waiting on its reader.
    fn runnable(&self) -> bool {
        self.completion.is_none() && self.outbox.is_empty() && !self.paused && self.parked.is_none()
    }

    /// Takes the logits after its last token.
    fn accept(&mut self, logits: &[f32], tokenizer: &Tokenizer) {
        let Some(decoder) = &mut self.decoder else {
            return;
        };
        let decoded = decoder.decode(logits, tokenizer);
        if !decoded.piece.is_empty() {
            self.outbox.push_back(decoded.piece);
        }
        self.next = decoded.next;
        if decoder.is_finished() {
            self.end(false);
        }
    }

    /// Ends decoding, cancelled or not; the generation stays until its
    /// outbox is flushed.
    fn end(&mut self, cancelled: bool) {
        let Some(mut decoder) = self.decoder.take() else {
            return;
        };
        if cancelled {
            decoder.cancel();
        }
        let (rest, mut completion) = decoder.finish();
        if !rest.is_empty() {
            self.outbox.push_back(rest);
        }
        if let Ok(completion) = &mut completion {
            completion.cached_tokens = self.cached;
        }
        self.completion = Some(completion);
    }
}

/// Waiting jobs, per tenant, picked by stride scheduling: each pick advances
/// the tenant's pass by `1 / weight`, and the lowest pass goes next.
#[derive(Default)]
struct Waiting {
    tenants: BTreeMap<String, TenantQueue>,
    /// The pass of the last pick: a tenant arriving now starts here, so
    /// earlier idleness earns it no burst.
    now: f64,
    len: usize,
}

struct TenantQueue {
    jobs: VecDeque<Job>,
    pass: f64,
}

impl Waiting {
    fn push(&mut self, job: Job) {
        let now = self.now;
        self.tenants
            .entry(job.tenant.clone())
            .or_insert_with(|| TenantQueue {
                jobs: VecDeque::new(),
                pass: now,
            })
            .jobs
            .push_back(job);
        self.len += 1;
    }

    /// The tenant whose job [`Waiting::pop`] would return, and its weight.
    fn peek(&self) -> Option<(&str, u32)> {
        let (tenant, queue) = self
            .tenants
            .iter()
            .min_by(|a, b| a.1.pass.total_cmp(&b.1.pass))?;
        Some((tenant.as_str(), queue.jobs.front()?.weight))
    }

    fn pop(&mut self) -> Option<Job> {
        let tenant = self
            .tenants
            .iter()
            .min_by(|a, b| a.1.pass.total_cmp(&b.1.pass))
            .map(|(tenant, _)| tenant.clone())?;
        let queue = self.tenants.get_mut(&tenant)?;
        let job = queue.jobs.pop_front()?;
        self.now = queue.pass;
        queue.pass += 1.0 / f64::from(job.weight.max(1));
        if queue.jobs.is_empty() {
            self.tenants.remove(&tenant);
        }
        self.len -= 1;
        Some(job)
    }

    /// Removes the jobs whose callers gave up, returning them.
    fn take_cancelled(&mut self) -> Vec<Job> {
        let mut cancelled = Vec::new();
        for queue in self.tenants.values_mut() {
            let (gone, kept): (VecDeque<Job>, VecDeque<Job>) = std::mem::take(&mut queue.jobs)
                .into_iter()
                .partition(|job| job.cancel.load(Ordering::Relaxed));
            queue.jobs = kept;
            cancelled.extend(gone);
        }
        self.tenants.retain(|_, queue| !queue.jobs.is_empty());
        self.len -= cancelled.len();
        cancelled
    }
}

struct Scheduler {
    model: Arc<Model>,
    tokenizer: Arc<Tokenizer>,
    config: BatcherConfig,
    receiver: Receiver<Job>,
    waiting: Waiting,
    running: Vec<Running>,
    prefixes: PrefixCache,
    load: Arc<BatcherLoad>,
    /// Generations admitted so far.
    admissions: u64,
}

/// How long an idle-but-blocked batcher (every generation waiting on its
/// reader) waits for news before looking again.
const BLOCKED_POLL: Duration = Duration::from_millis(2);

impl Scheduler {
    fn run(&mut self) {
        loop {
            if !self.receive() {
                return;
            }
            self.admit();
            self.retire();
            if !self.step() && !self.running.is_empty() {
                // Every generation waits on its reader: wait for room or news.
                match self.receiver.recv_timeout(BLOCKED_POLL) {
                    Ok(job) => self.waiting.push(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    // The handle is gone but readers still drain: wait, don't spin.
                    Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(BLOCKED_POLL),
                }
            }
            self.publish();
        }
    }

    /// Takes queued jobs; blocks when there is nothing to do. False when the
    /// batcher was dropped and all work is done.
    fn receive(&mut self) -> bool {
        if self.running.is_empty() && self.waiting.len == 0 {
            match self.receiver.recv() {
                Ok(job) => self.waiting.push(job),
                Err(_) => return false,
            }
        }
        while let Ok(job) = self.receiver.try_recv() {
            self.waiting.push(job);
        }
        for job in self.waiting.take_cancelled() {
            let completion = Completion {
                text: String::new(),
                prompt_tokens: job.prompt.len(),
                cached_tokens: 0,
                completion_tokens: 0,
                finish: FinishReason::Cancelled,
            };
            (job.done)(Ok(completion));
        }
        true
    }

    /// Generations holding a slot (running and not paused).
    fn active(&self) -> usize {
        self.running.iter().filter(|r| !r.paused).count()
    }

    /// Moves waiting jobs into free slots, fairly across tenants. Paused
    /// generations resume first. When every slot is taken and the next
    /// waiting tenant holds less than its weighted share, a generation of
    /// the tenant furthest over its share is paused (its cache kept) to
    /// make room: running generations cannot hold every slot while others
    /// wait.
    fn admit(&mut self) {
        let slots = self.config.max_sequences.max(1);
        loop {
            if self.active() < slots {
                // A waiting tenant below its share goes before the paused
                // generations of tenants above theirs.
                if self.running.iter().any(|r| r.paused)
                    && !self.next_waiting_is_owed(slots)
                    && self.resume()
                {
                    continue;
                }
            } else if !self.preempt(slots) {
                break;
            }
            let Some(job) = self.waiting.pop() else { break };
            if let Err(e) = self.check(&job.prompt) {
                (job.done)(Err(e));
                continue;
            }
            let context = self.model.config().context_length;
            let max_tokens = job.params.max_tokens.min(context - job.prompt.len());
            let capacity = job.prompt.len() + max_tokens;
            let hit = self
                .prefixes
                .lookup(&job.tenant, &job.prompt, job.adapter.as_ref());
            let (seq, fed) = match (hit, job.adapter) {
                (Some(hit), adapter) => {
                    self.load.prefix_hits.fetch_add(1, Ordering::Relaxed);
                    // Computed with the same adapter (the cache's key).
                    let mut seq = self.model.continue_prefix(hit.seq, hit.shared, capacity);
                    seq.set_adapter(adapter);
                    (seq, hit.shared)
                }
                (None, None) => (self.model.new_sequence(capacity), 0),
                (None, Some(adapter)) => match self.model.new_adapted_sequence(capacity, adapter) {
                    Ok(seq) => (seq, 0),
                    Err(e) => {
                        (job.done)(Err(EngineError::InvalidInput(e.to_string())));
                        continue;
                    }
                },
            };
            let decoder = Decoder::new(&job.prompt, &job.params, max_tokens, job.constraint);
            self.admissions += 1;
            let mut running = Running {
                paused: false,
                parked: None,
                weight: job.weight.max(1),
                admitted: self.admissions,
                tenant: Arc::from(job.tenant),
                prompt: job.prompt,
                fed,
                cached: fed,
                next: None,
                seq,
                decoder: Some(decoder),
                outbox: VecDeque::new(),
                completion: None,
                cancel: job.cancel,
                sink: job.sink,
                done: job.done,
            };
            if max_tokens == 0 {
                running.end(false);
            }
            self.running.push(running);
        }
    }

    /// Resumes the paused generation of the tenant with the fewest active
    /// ones; false if none is paused.
    fn resume(&mut self) -> bool {
        let active = self.active_by_tenant();
        let pick = self
            .running
            .iter()
            .enumerate()
            .filter(|(_, r)| r.paused)
            .min_by_key(|(_, r)| (active.get(&r.tenant).copied().unwrap_or(0), r.admitted))
            .map(|(i, _)| i);
        match pick {
            Some(i) => {
                self.running[i].paused = false;
                true
            }
            None => false,
        }
    }

    /// The active-slot share of each tenant running or next in line, by
    /// weight, and whether that next waiting tenant holds less than its own.
    fn shares(&self, slots: usize) -> Option<(BTreeMap<Arc<str>, usize>, bool)> {
        let (next, next_weight) = self.waiting.peek()?;
        let mut weights: BTreeMap<Arc<str>, u32> = BTreeMap::new();
        for r in &self.running {
            weights.insert(r.tenant.clone(), r.weight);
        }
        let next: Arc<str> = Arc::from(next);
        weights.insert(next.clone(), next_weight.max(1));
        let total: u64 = weights.values().map(|&w| u64::from(w)).sum();
        let shares: BTreeMap<Arc<str>, usize> = weights
            .into_iter()
            .map(|(t, w)| {
                let share = (slots as u64 * u64::from(w)).div_ceil(total.max(1)) as usize;
                (t, share)
            })
            .collect();
        let held = self.active_by_tenant().get(&next).copied().unwrap_or(0);
        let owed = held < shares.get(&next).copied().unwrap_or(0);
        Some((shares, owed))
    }

    /// Whether the next waiting tenant holds less than its share of slots.
    fn next_waiting_is_owed(&self, slots: usize) -> bool {
        self.shares(slots).is_some_and(|(_, owed)| owed)
    }

    /// With every slot taken and the next waiting tenant owed a slot:
    /// pauses the newest generation of the tenant furthest over its share;
    /// true if one was paused.
    fn preempt(&mut self, slots: usize) -> bool {
        // Paused generations keep their memory: at most as many as slots.
        if self.running.len() >= 2 * slots {
            return false;
        }
        let Some((shares, true)) = self.shares(slots) else {
            return false;
        };
        let active = self.active_by_tenant();
        let over = active
            .iter()
            .filter_map(|(t, &n)| {
                let share = shares.get(t).copied().unwrap_or(1).max(1);
                (n > share).then(|| (t.clone(), n as f64 / share as f64))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(t, _)| t);
        let Some(over) = over else {
            return false;
        };
        let victim = self
            .running
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.paused && r.tenant == over && r.completion.is_none())
            .max_by_key(|(_, r)| r.admitted)
            .map(|(i, _)| i);
        match victim {
            Some(i) => {
                self.running[i].paused = true;
                true
            }
            None => false,
        }
    }

    fn active_by_tenant(&self) -> BTreeMap<Arc<str>, usize> {
        let mut active = BTreeMap::new();
        for r in self.running.iter().filter(|r| !r.paused) {
            *active.entry(r.tenant.clone()).or_insert(0) += 1;
        }
        active
    }

    fn check(&self, prompt: &[u32]) -> Result<(), EngineError> {
        let config = self.model.config();
        if prompt.is_empty() {
            return Err(EngineError::InvalidInput("the prompt is empty".into()));
        }
        if prompt.len() >= config.context_length {
            return Err(EngineError::InvalidInput(format!(
                "the prompt has {} tokens; the model's context holds {}",
                prompt.len(),
                config.context_length
            )));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= config.vocab_size) {
            return Err(EngineError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        Ok(())
    }

    /// Flushes every outbox; delivers and removes finished and cancelled
    /// generations (freeing their slots).
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let r = &mut self.running[i];
            r.flush();
            let cancelled = r.cancel.load(Ordering::Relaxed);
            if cancelled {
                r.end(true);
            }
            if r.completion.is_some() && (r.outbox.is_empty() || cancelled) {
                let r = self.running.swap_remove(i);
                let Running {
                    completion,
                    done,
                    sink,
                    ..
                } = r;
                done(completion.expect("checked above"));
                drop(sink);
                continue;
            }
            i += 1;
        }
    }

    /// Runs one batched step; false if no generation could run.
    fn step(&mut self) -> bool {
        // Sequences whose masks came in since the last step sample now.
        let tokenizer = &self.tokenizer;
        let mut unparked = false;
        for r in &mut self.running {
            // Every ready one, not only the first.
            unparked |= r.unpark(tokenizer, false);
        }
        let mut budget = self.config.step_tokens.max(1);
        // Decoding sequences first (one token each), then prompt chunks.
        let mut plan: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        for (i, r) in self.running.iter().enumerate() {
            if r.runnable() && r.fed == r.prompt.len() && r.next.is_some() && budget > 0 {
                plan.push((i, 0..1));
                budget -= 1;
            }
        }
        // Prompt chunks share what is left fairly between tenants: each
        // first gets an equal part, then the rest goes in admission order.
        // (In admission order alone, one tenant's long prompts delayed every
        // later tenant's first token.)
        let prefilling: Vec<usize> = (0..self.running.len())
            .filter(|&i| {
                let r = &self.running[i];
                r.runnable() && r.fed < r.prompt.len()
            })
            .collect();
        let mut tenants: Vec<&Arc<str>> = prefilling
            .iter()
            .map(|&i| &self.running[i].tenant)
            .collect();
        tenants.sort();
        tenants.dedup();
        let part = budget / tenants.len().max(1);
        let mut taken = vec![0usize; self.running.len()];
        for tenant in &tenants {
            let mut left = part;
            for &i in prefilling
                .iter()
                .filter(|&&i| self.running[i].tenant == **tenant)
            {
                let r = &self.running[i];
                let take = (r.prompt.len() - r.fed).min(left);
                taken[i] += take;
                left -= take;
            }
            budget -= part - left;
        }
        for &i in &prefilling {
            let r = &self.running[i];
            let take = (r.prompt.len() - r.fed - taken[i]).min(budget);
            taken[i] += take;
            budget -= take;
        }
        for &i in &prefilling {
            if taken[i] > 0 {
                let fed = self.running[i].fed;
                plan.push((i, fed..fed + taken[i]));
            }
        }
        if plan.is_empty() {
            // Nothing else to run: wait for a parked sequence's mask.
            let tokenizer = &self.tokenizer;
            let waited = (self.running.iter_mut())
                .find(|r| r.parked.is_some())
                .is_some_and(|r| r.unpark(tokenizer, true));
            return unparked || waited;
        }
        let decoded: Vec<[u32; 1]> = plan
            .iter()
            .map(|(i, _)| [self.running[*i].next.unwrap_or(0)])
            .collect();
        let wants_logits: Vec<bool> = plan
            .iter()
            .map(|(i, range)| {
                let r = &self.running[*i];
                r.fed == r.prompt.len() || range.end == r.prompt.len()
            })
            .collect();
        let result = {
            // Disjoint mutable borrows of the planned sequences, in plan order.
            let mut seqs: Vec<Option<&mut Running>> = self.running.iter_mut().map(Some).collect();
            let mut batch = Vec::with_capacity(plan.len());
            for (k, (i, range)) in plan.iter().enumerate() {
                let r = seqs[*i].take().expect("each sequence planned once");
                let tokens: &[u32] = if r.fed == r.prompt.len() {
                    &decoded[k]
                } else {
                    &r.prompt[range.clone()]
                };
                batch.push(BatchItem {
                    seq: &mut r.seq,
                    tokens,
                    logits: wants_logits[k],
                });
            }
            self.model.step(&mut batch)
        };
        self.load.steps.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(logits) => {
                let mut sampled: Vec<Option<Vec<f32>>> = vec![None; self.running.len()];
                let mut ran = Vec::with_capacity(plan.len());
                for ((i, range), logits) in plan.into_iter().zip(logits) {
                    let r = &mut self.running[i];
                    if r.fed < r.prompt.len() {
                        r.fed = range.end;
                        if r.fed == r.prompt.len() {
                            self.prefixes.insert(&r.tenant, &r.prompt, &r.seq);
                        }
                    }
                    sampled[i] = logits;
                    ran.push(i);
                }
                // Each sequence samples on its own (its own random state),
                // so the step's sampling is spread over the pool.
                let tokenizer = &self.tokenizer;
                SpinPool::global().run_chunks(&mut self.running, 1, &|i, r| {
                    if let Some(logits) = &sampled[i] {
                        r[0].accept_or_park(logits, tokenizer);
                    }
                });
                for i in ran {
                    self.running[i].flush();
                }
                self.model.recycle_logits(sampled.into_iter().flatten());
            }
            Err(error) => {
                // Only possible through a bug in planning: fail what ran.
                let message = error.to_string();
                let mut failed: Vec<usize> = plan.into_iter().map(|(i, _)| i).collect();
                failed.sort_unstable_by(|a, b| b.cmp(a));
                for i in failed {
                    let r = self.running.swap_remove(i);
                    (r.done)(Err(EngineError::StepFailed(message.clone())));
                }
            }
        }
        true
    }

    fn publish(&self) {
        self.load.waiting.store(self.waiting.len, Ordering::Relaxed);
        self.load
            .running
            .store(self.running.len(), Ordering::Relaxed);
        let kv: usize = self.running.iter().map(|r| r.seq.capacity()).sum();
        self.load.kv_tokens.store(kv, Ordering::Relaxed);
    }
}
