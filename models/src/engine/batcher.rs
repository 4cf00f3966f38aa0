//! Continuous batching: one thread per model steps every running generation
//! together. Each step runs one decoded token of every decoding sequence and
//! chunks of waiting prompts (within a token budget) as one batch, so the
//! weights are read once per step however many tenants are generating. New
//! requests join between steps; tenants share the sequence slots by weight;
//! a cancelled generation leaves at once; prompts that start like a recent
//! one reuse its cached keys and values (the prefix cache).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::arch::pool::SpinPool;
use crate::arch::{BatchItem, Model, Sequence};
use crate::tokenizer::Tokenizer;

use super::decode::Decoder;
use super::{Completion, EngineError, FinishReason, GenerateParams};

/// How a batcher shares its model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatcherConfig {
    /// Most generations running at once; more wait their turn.
    pub max_sequences: usize,
    /// Most tokens one step runs (decoded tokens plus prompt chunks).
    pub step_tokens: usize,
    /// Prompt tokens whose keys and values are kept for reuse; 0 disables
    /// the prefix cache.
    pub prefix_cache_tokens: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            max_sequences: 32,
            step_tokens: 256,
            prefix_cache_tokens: 2048,
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
pub type OnDone = Box<dyn FnOnce(Result<Completion, EngineError>) + Send>;

/// One generation request.
pub struct Job {
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
        let mut scheduler = Scheduler {
            model,
            tokenizer,
            prefixes: PrefixCache::new(config.prefix_cache_tokens),
            config,
            receiver,
            waiting: Waiting::default(),
            running: Vec::new(),
            load: load.clone(),
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
    pub fn submit(&self, job: Job) {
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
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// The token to run next once the prompt is in.
    next: Option<u32>,
    seq: Sequence,
    /// `None` once decoding ended.
    decoder: Option<Decoder>,
    /// Text the sink has not taken yet; the generation waits while it holds any.
    outbox: VecDeque<String>,
    /// The result, once decoding ended (delivered after the outbox empties).
    completion: Option<Completion>,
    cancel: Arc<AtomicBool>,
    sink: Option<Box<dyn TextSink>>,
    done: OnDone,
}

impl Running {
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

    /// Ready to run this step: not finished, and not waiting on its reader.
    fn runnable(&self) -> bool {
        self.completion.is_none() && self.outbox.is_empty()
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
        let (rest, completion) = decoder.finish();
        if !rest.is_empty() {
            self.outbox.push_back(rest);
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

/// Recent prompts' caches, most recent first, within a token budget.
struct PrefixCache {
    entries: VecDeque<(Vec<u32>, Sequence)>,
    budget: usize,
}

/// Prompts shorter than this are not worth caching.
const MIN_PREFIX: usize = 16;

impl PrefixCache {
    fn new(budget: usize) -> Self {
        PrefixCache {
            entries: VecDeque::new(),
            budget,
        }
    }

    /// The cached prompt sharing the longest prefix with `prompt` (at least
    /// `MIN_PREFIX` tokens, and short of the whole prompt so a token is left
    /// to run), and how long that prefix is.
    fn lookup(&mut self, prompt: &[u32]) -> Option<(&Sequence, usize)> {
        let (index, shared) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (tokens, _))| {
                let common = tokens
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                (i, common.min(prompt.len() - 1))
            })
            .max_by_key(|&(i, common)| (common, std::cmp::Reverse(i)))?;
        if shared < MIN_PREFIX {
            return None;
        }
        let entry = self.entries.remove(index)?;
        self.entries.push_front(entry);
        self.entries.front().map(|(_, seq)| (seq, shared))
    }

    /// Remembers the cache of `prompt` (all of it in `seq`).
    fn insert(&mut self, prompt: &[u32], seq: &Sequence) {
        if prompt.len() < MIN_PREFIX || prompt.len() > self.budget {
            return;
        }
        // An entry that is a prefix of this prompt is superseded by it.
        self.entries
            .retain(|(tokens, _)| !prompt.starts_with(tokens));
        if self
            .entries
            .iter()
            .any(|(tokens, _)| tokens.starts_with(prompt))
        {
            return;
        }
        self.entries
            .push_front((prompt.to_vec(), seq.copy_prefix(prompt.len(), prompt.len())));
        let mut total = 0;
        self.entries.retain(|(tokens, _)| {
            total += tokens.len();
            total <= self.budget
        });
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
                completion_tokens: 0,
                finish: FinishReason::Cancelled,
            };
            (job.done)(Ok(completion));
        }
        true
    }

    /// Moves waiting jobs into free slots, fairly across tenants.
    fn admit(&mut self) {
        while self.running.len() < self.config.max_sequences.max(1) {
            let Some(job) = self.waiting.pop() else { break };
            if let Err(e) = self.check(&job.prompt) {
                (job.done)(Err(e));
                continue;
            }
            let context = self.model.config().context_length;
            let max_tokens = job.params.max_tokens.min(context - job.prompt.len());
            let capacity = job.prompt.len() + max_tokens;
            let (seq, fed) = match self.prefixes.lookup(&job.prompt) {
                Some((cached, shared)) => {
                    self.load.prefix_hits.fetch_add(1, Ordering::Relaxed);
                    (self.model.continue_prefix(cached, shared, capacity), shared)
                }
                None => (self.model.new_sequence(capacity), 0),
            };
            let decoder = Decoder::new(&job.prompt, &job.params, max_tokens);
            let mut running = Running {
                prompt: job.prompt,
                fed,
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
                done(Ok(completion.expect("checked above")));
                drop(sink);
                continue;
            }
            i += 1;
        }
    }

    /// Runs one batched step; false if no generation could run.
    fn step(&mut self) -> bool {
        let mut budget = self.config.step_tokens.max(1);
        // Decoding sequences first (one token each), then prompt chunks.
        let mut plan: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        for (i, r) in self.running.iter().enumerate() {
            if r.runnable() && r.fed == r.prompt.len() && r.next.is_some() && budget > 0 {
                plan.push((i, 0..1));
                budget -= 1;
            }
        }
        for (i, r) in self.running.iter().enumerate() {
            if r.runnable() && r.fed < r.prompt.len() && budget > 0 {
                let take = (r.prompt.len() - r.fed).min(budget);
                plan.push((i, r.fed..r.fed + take));
                budget -= take;
            }
        }
        if plan.is_empty() {
            return false;
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
                            self.prefixes.insert(&r.prompt, &r.seq);
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
                        r[0].accept(logits, tokenizer);
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
    }
}
