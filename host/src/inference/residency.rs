//! Which models are in memory: each loads on first use and unloads after
//! `keep-alive` idle, or when loading another would pass `max-loaded-bytes`
//! (least recently used first), never while it runs anything.
//!
//! A [`ResidentModel`] is what the host hands out for a model: its text side
//! (tokenizer, chat template) stays in memory, its weights come and go. Each
//! generation, decoding session and embedding holds a [`Lease`] on the
//! loaded weights; a model with leases is never unloaded.
//!
//! One manager thread decides, loads and unloads, so there is one owner of
//! the budget and loads run one at a time (two loads at once would only
//! split the same cores and disk). Requests for a model that is not loaded
//! wait in its queue, in arrival order across models. When a load needs
//! memory that busy models hold, those models *drain*: their running work
//! finishes, new work for them queues, and once they are idle they unload.
//! So a stream of requests to one model cannot keep another out for longer
//! than that model's running generations take; each waits at most
//! `max-wait`, then gets [`EngineError::Unavailable`]. A busy model drains
//! only once it has served [`TURN_FACTOR`] times as long as it took to load:
//! a tenant alternating between two models cannot make the host spend its
//! time loading them.
//!
//! Whether a model is loaded is shared state: a tenant's time to first
//! token tells it whether some tenant used that model within `keep-alive`.
//! Operators who must hide even that give tenants their own models, or
//! keep every model loaded (no budget, no keep-alive: the default).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use realm_models::arch::LoraAdapter;
use realm_models::chat::ChatMessage;
use realm_models::chat::tools::{Tool, ToolSyntax};
use realm_models::engine::{
    Completer, Completion, Constraint, ConstraintSpec, Decoder, Engine, EngineError, EngineInfo,
    FinishReason, Prompter, Request,
};

/// A busy model serves at least this many times its load time before it
/// drains for another: switching then costs at most about a fifth of the
/// time, however requests alternate. (An idle model unloads at once.)
pub const TURN_FACTOR: u32 = 4;

/// Loads a model's weights: called on the manager thread, once per load.
pub type Loader = Box<dyn Fn() -> Result<Arc<dyn Engine>, EngineError> + Send + Sync>;

/// How many models stay loaded, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidencyLimits {
    /// Bytes the loaded models may hold together; `None` is no limit.
    pub max_loaded_bytes: Option<u64>,
    /// How long an idle model stays loaded; `None` is for ever.
    pub keep_alive: Option<Duration>,
    /// How long a request waits for its model to be loaded before it gets
    /// [`EngineError::Unavailable`].
    pub max_wait: Duration,
}

impl Default for ResidencyLimits {
    fn default() -> Self {
        ResidencyLimits {
            max_loaded_bytes: None,
            keep_alive: None,
            max_wait: Duration::from_secs(60),
        }
    }
}

impl ResidencyLimits {
    /// True if models may be unloaded, so they load on first use; without
    /// a budget or keep-alive every model loads at once and stays.
    pub fn on_demand(&self) -> bool {
        self.max_loaded_bytes.is_some() || self.keep_alive.is_some()
    }
}

/// A model's state, as `realm-host ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Not in memory.
    Unloaded,
    /// Being loaded.
    Loading,
    /// In memory and serving.
    Loaded,
    /// In memory, finishing its work before it unloads for another model.
    Draining,
}

/// One model's place in memory, for `realm-host ps` and metrics.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelStatus {
    /// The model's source (catalog name, stored name, path or `hf:` name).
    pub model: String,
    /// What it holds in memory when loaded.
    pub bytes: u64,
    /// Bytes its weights take on a GPU while loaded (0 on the CPU).
    #[serde(default)]
    pub device_bytes: u64,
    /// Loaded or not.
    pub phase: Phase,
    /// Generations, decoding sessions and embeddings using it now.
    pub running: usize,
    /// Requests waiting for it to be loaded.
    pub waiting: usize,
    /// Its batch while loaded: generations waiting for a slot and running,
    /// and the KV cache they hold.
    #[serde(default)]
    pub batch: BatchView,
    /// Seconds since it was last used, while loaded and idle.
    pub idle_seconds: Option<f64>,
    /// Times it was loaded.
    pub loads: u64,
    /// Times it was unloaded after `keep-alive` idle.
    pub unloads_idle: u64,
    /// Times it was unloaded to make room for another model.
    pub unloads_evicted: u64,
    /// Loads that failed.
    pub load_failures: u64,
}

/// A batch's queue and KV cache, as [`ModelStatus`] reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchView {
    /// Generations waiting for a slot in the batch.
    pub waiting: usize,
    /// Generations in the batch.
    pub running: usize,
    /// The share of the batch's KV cache they hold, 0 to 1.
    pub kv_usage: f64,
}

impl From<realm_models::engine::BatchStatus> for BatchView {
    fn from(status: realm_models::engine::BatchStatus) -> Self {
        BatchView {
            waiting: status.waiting,
            running: status.running,
            kv_usage: status.kv_usage(),
        }
    }
}

/// The models of one host and the memory they share; see the module docs.
pub struct Residency {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the manager: a request queued, a lease ended, limits changed.
    wake: Condvar,
}

struct State {
    limits: ResidencyLimits,
    slots: Vec<Slot>,
    /// Whether the manager thread has been started.
    managed: bool,
}

struct Slot {
    model: String,
    bytes: u64,
    loader: Arc<Loader>,
    engine: Option<Arc<dyn Engine>>,
    loading: bool,
    draining: bool,
    leases: usize,
    last_used: Instant,
    /// Until when, once loaded, it keeps serving while busy (see [`TURN_FACTOR`]).
    turn_ends: Instant,
    waiting: VecDeque<Waiter>,
    loads: u64,
    unloads_idle: u64,
    unloads_evicted: u64,
    load_failures: u64,
}

impl Slot {
    fn new(model: &str, bytes: u64, load: Loader) -> Self {
        let now = Instant::now();
        Slot {
            model: model.to_string(),
            bytes,
            loader: Arc::new(load),
            engine: None,
            loading: false,
            draining: false,
            leases: 0,
            last_used: now,
            turn_ends: now,
            waiting: VecDeque::new(),
            loads: 0,
            unloads_idle: 0,
            unloads_evicted: 0,
            load_failures: 0,
        }
    }

    fn idle(&self) -> bool {
        self.engine.is_some() && self.leases == 0
    }

    fn status(&self, now: Instant) -> ModelStatus {
        let phase = match (&self.engine, self.loading, self.draining) {
            (Some(_), _, true) => Phase::Draining,
            (Some(_), _, false) => Phase::Loaded,
            (None, true, _) => Phase::Loading,
            (None, false, _) => Phase::Unloaded,
        };
        ModelStatus {
            model: self.model.clone(),
            bytes: self.bytes,
            device_bytes: self.engine.as_ref().map_or(0, |e| e.device_bytes()),
            phase,
            running: self.leases,
            waiting: self.waiting.len(),
            batch: self
                .engine
                .as_ref()
                .map_or_else(BatchView::default, |e| e.batch().into()),
            idle_seconds: self
                .idle()
                .then(|| now.duration_since(self.last_used).as_secs_f64()),
            loads: self.loads,
            unloads_idle: self.unloads_idle,
            unloads_evicted: self.unloads_evicted,
            load_failures: self.load_failures,
        }
    }
}

/// Something waiting for a model to be loaded.
struct Waiter {
    since: Instant,
    grant: Grant,
}

enum Grant {
    /// A generation, started once the model is loaded.
    Start(Box<Request>, Completer),
    /// A blocked caller (a decoding session, an embedding), handed a lease.
    Session(mpsc::SyncSender<Result<Lease, EngineError>>),
}

impl Grant {
    fn cancelled(&self) -> bool {
        match self {
            Grant::Start(request, _) => request.cancel.load(Ordering::Relaxed),
            Grant::Session(_) => false,
        }
    }

    /// Runs the granted work (or tells it why not). Never called with the
    /// state locked: starting runs engine code, failing runs hooks.
    fn give(self, lease: Result<Lease, EngineError>) {
        match (self, lease) {
            (Grant::Start(request, done), Ok(lease)) => lease.start(*request, done),
            (Grant::Start(request, done), Err(_)) if request.cancel.load(Ordering::Relaxed) => {
                done.complete(Ok(Completion {
                    text: String::new(),
                    prompt_tokens: request.prompt.len(),
                    cached_tokens: 0,
                    completion_tokens: 0,
                    finish: FinishReason::Cancelled,
                }));
            }
            (Grant::Start(_, done), Err(e)) => done.complete(Err(e)),
            (Grant::Session(reply), lease) => {
                // A caller that stopped waiting drops the lease with the reply.
                let _ = reply.send(lease);
            }
        }
    }
}

/// A hold on a loaded model: while any exists, the model stays loaded.
pub struct Lease {
    /// Declared before `_hold`, so it is dropped first: the slot keeps its
    /// own reference while leases exist, so this one is never the last, and
    /// the weights are freed by the manager thread, not by whichever thread
    /// (a batcher's) ends the last lease.
    engine: Arc<dyn Engine>,
    _hold: Hold,
}

/// Counts a lease in its slot until dropped.
struct Hold {
    shared: Arc<Shared>,
    slot: usize,
}

impl Lease {
    fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// Starts `request` on the leased model, holding the lease until the
    /// generation ends.
    fn start(self, request: Request, done: Completer) {
        let engine = self.engine.clone();
        engine.start(request, done.after(move || drop(self)));
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        let slot = &mut state.slots[self.slot];
        slot.leases -= 1;
        slot.last_used = Instant::now();
        if slot.leases == 0 {
            self.shared.wake.notify_all();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A lease on slot `index` if it can serve at once: loaded, not
    /// draining, and nobody queued ahead.
    fn try_lease(self: &Arc<Self>, state: &mut State, index: usize) -> Option<Lease> {
        let slot = &mut state.slots[index];
        let engine = slot.engine.clone().filter(|_| !slot.draining)?;
        if !slot.waiting.is_empty() {
            return None;
        }
        Some(self.lease(slot, index, engine))
    }

    fn lease(self: &Arc<Self>, slot: &mut Slot, index: usize, engine: Arc<dyn Engine>) -> Lease {
        slot.leases += 1;
        slot.last_used = Instant::now();
        Lease {
            engine,
            _hold: Hold {
                shared: self.clone(),
                slot: index,
            },
        }
    }

    /// A lease on slot `index`, waiting (up to `max-wait`) for it to load.
    fn lease_blocking(self: &Arc<Self>, index: usize) -> Result<Lease, EngineError> {
        let (reply, leased) = mpsc::sync_channel(1);
        {
            let mut state = self.lock();
            if let Some(lease) = self.try_lease(&mut state, index) {
                return Ok(lease);
            }
            state.slots[index].waiting.push_back(Waiter {
                since: Instant::now(),
                grant: Grant::Session(reply),
            });
            self.wake.notify_all();
        }
        leased.recv().unwrap_or(Err(EngineError::Stopped))
    }
}

impl Default for Residency {
    fn default() -> Self {
        Self::new(ResidencyLimits::default())
    }
}

impl Residency {
    /// No models yet, within `limits`. The manager thread starts with the
    /// first model, and stops once the residency and all its models are
    /// dropped.
    pub fn new(limits: ResidencyLimits) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                limits,
                slots: Vec::new(),
                managed: false,
            }),
            wake: Condvar::new(),
        });
        Residency { shared }
    }

    /// Applies `limits` from now on.
    pub fn set_limits(&self, limits: ResidencyLimits) {
        self.shared.lock().limits = limits;
        self.shared.wake.notify_all();
    }

    /// The limits in force.
    pub fn limits(&self) -> ResidencyLimits {
        self.shared.lock().limits.clone()
    }

    /// Adds a model named `model` whose text side is `text`, that holds
    /// `bytes` when `load` has loaded it. It is not loaded yet. Fails only
    /// if the manager thread cannot be started.
    pub fn add(
        &self,
        model: &str,
        text: Arc<dyn Prompter>,
        bytes: u64,
        load: Loader,
    ) -> Result<Arc<ResidentModel>, EngineError> {
        let mut state = self.shared.lock();
        if !state.managed {
            let manager = self.shared.clone();
            std::thread::Builder::new()
                .name("realm-residency".into())
                .spawn(move || manage(manager))
                .map_err(EngineError::Thread)?;
            state.managed = true;
        }
        state.slots.push(Slot::new(model, bytes, load));
        Ok(Arc::new(ResidentModel {
            shared: self.shared.clone(),
            slot: state.slots.len() - 1,
            text,
        }))
    }

    /// Every model's state.
    pub fn status(&self) -> Vec<ModelStatus> {
        let now = Instant::now();
        let state = self.shared.lock();
        state.slots.iter().map(|s| s.status(now)).collect()
    }
}

/// A model as the host hands it out: an [`Engine`] whose weights are loaded
/// when work needs them (see the module docs).
pub struct ResidentModel {
    shared: Arc<Shared>,
    slot: usize,
    text: Arc<dyn Prompter>,
}

impl std::fmt::Debug for ResidentModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResidentModel")
            .field("model", &self.shared.lock().slots[self.slot].model)
            .finish_non_exhaustive()
    }
}

impl ResidentModel {
    /// Loads the model now if it is not loaded (waiting up to `max-wait`).
    pub fn preload(&self) -> Result<(), EngineError> {
        self.shared.lease_blocking(self.slot).map(drop)
    }

    /// What the model holds in memory when loaded.
    pub fn bytes(&self) -> u64 {
        self.shared.lock().slots[self.slot].bytes
    }
}

impl Prompter for ResidentModel {
    fn info(&self) -> &EngineInfo {
        self.text.info()
    }

    fn max_prompt_bytes(&self) -> usize {
        self.text.max_prompt_bytes()
    }

    fn prompt_tokens(&self, prompt: &str) -> Vec<u32> {
        self.text.prompt_tokens(prompt)
    }

    fn tokenize(&self, text: &str) -> Vec<u32> {
        self.text.tokenize(text)
    }

    fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError> {
        self.text.detokenize(tokens)
    }

    fn chat_tokens(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
    ) -> Result<Vec<u32>, EngineError> {
        self.text.chat_tokens(messages, tools)
    }

    fn tool_syntax(&self) -> ToolSyntax {
        self.text.tool_syntax()
    }

    fn constrain(&self, spec: &ConstraintSpec) -> Result<Constraint, EngineError> {
        self.text.constrain(spec)
    }
}

impl Engine for ResidentModel {
    fn embed(&self, text: &str) -> Result<Vec<f32>, EngineError> {
        let lease = self.shared.lease_blocking(self.slot)?;
        lease.engine().embed(text)
    }

    fn start(&self, request: Request, done: Completer) {
        let lease = {
            let mut state = self.shared.lock();
            match self.shared.try_lease(&mut state, self.slot) {
                Some(lease) => lease,
                None => {
                    state.slots[self.slot].waiting.push_back(Waiter {
                        since: Instant::now(),
                        grant: Grant::Start(Box::new(request), done),
                    });
                    self.shared.wake.notify_all();
                    return;
                }
            }
        };
        lease.start(request, done);
    }

    /// The session loads the model at its first `forward`, and holds it
    /// loaded until it is dropped.
    fn decoder(&self, adapter: Option<Arc<LoraAdapter>>) -> Result<Box<dyn Decoder>, EngineError> {
        Ok(Box::new(ResidentDecoder {
            inner: None,
            adapter,
            shared: self.shared.clone(),
            slot: self.slot,
        }))
    }

    /// The loaded engine's (0 while unloaded).
    fn device_bytes(&self) -> u64 {
        let state = self.shared.lock();
        state.slots[self.slot]
            .engine
            .as_ref()
            .map_or(0, |e| e.device_bytes())
    }
}

/// A decoding session on a [`ResidentModel`].
struct ResidentDecoder {
    /// The session and its lease, once loaded: a tuple drops in order, so
    /// the session lets go of the weights before the lease ends.
    inner: Option<(Box<dyn Decoder>, Lease)>,
    /// The adapter the session runs with, handed over at the first `forward`.
    adapter: Option<Arc<LoraAdapter>>,
    shared: Arc<Shared>,
    slot: usize,
}

impl Decoder for ResidentDecoder {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let (decoder, _) = match &mut self.inner {
            Some(inner) => inner,
            None => {
                let lease = self.shared.lease_blocking(self.slot)?;
                let decoder = lease.engine().decoder(self.adapter.take())?;
                self.inner.insert((decoder, lease))
            }
        };
        decoder.forward(tokens)
    }

    fn truncate(&mut self, len: usize) {
        if let Some((decoder, _)) = &mut self.inner {
            decoder.truncate(len);
        }
    }
}

/// The manager's work for one turn, done with the state unlocked.
#[derive(Default)]
struct Turn {
    grants: Vec<(Grant, Result<Lease, EngineError>)>,
    unloaded: Vec<Arc<dyn Engine>>,
    load: Option<(usize, Arc<Loader>)>,
}

/// The manager thread: plans under the lock, acts outside it, sleeps until
/// something changes or a deadline (keep-alive, max-wait) comes.
fn manage(shared: Arc<Shared>) {
    loop {
        // Only this thread holds the state: everything else was dropped.
        if Arc::strong_count(&shared) == 1 {
            return;
        }
        let turn = {
            let mut state = shared.lock();
            let turn = plan(&shared, &mut state, Instant::now());
            if turn.grants.is_empty() && turn.unloaded.is_empty() && turn.load.is_none() {
                let timeout = next_deadline(&state, Instant::now());
                drop(shared.wake.wait_timeout(state, timeout));
                continue;
            }
            turn
        };
        drop(turn.unloaded);
        for (grant, lease) in turn.grants {
            grant.give(lease);
        }
        if let Some((index, loader)) = turn.load {
            let started = Instant::now();
            let loaded = loader();
            let now = Instant::now();
            let mut state = shared.lock();
            let slot = &mut state.slots[index];
            slot.loading = false;
            match loaded {
                Ok(engine) => {
                    let took = now - started;
                    tracing::info!(model = %slot.model, bytes = slot.bytes, ?took, "model loaded");
                    slot.engine = Some(engine);
                    slot.loads += 1;
                    slot.last_used = now;
                    slot.turn_ends = now + took * TURN_FACTOR;
                }
                Err(e) => {
                    tracing::warn!(model = %slot.model, error = %e, "model failed to load");
                    slot.load_failures += 1;
                    let message = format!("model `{}` failed to load: {e}", slot.model);
                    let failed: Vec<_> = slot.waiting.drain(..).collect();
                    drop(state);
                    for waiter in failed {
                        waiter
                            .grant
                            .give(Err(EngineError::Unavailable(message.clone())));
                    }
                }
            }
        }
    }
}

/// Decides one turn: expire and grant waiters, unload idle models past
/// keep-alive, and pick the next model to load (making room for it).
fn plan(shared: &Arc<Shared>, state: &mut State, now: Instant) -> Turn {
    let mut turn = Turn::default();
    let limits = state.limits.clone();
    for slot in &mut state.slots {
        let mut kept = VecDeque::with_capacity(slot.waiting.len());
        for waiter in slot.waiting.drain(..) {
            if waiter.grant.cancelled() {
                turn.grants.push((waiter.grant, Err(EngineError::Stopped)));
            } else if now.duration_since(waiter.since) >= limits.max_wait {
                let why = format!(
                    "model `{}` could not be loaded within {} (the models in use fill [loading] max-loaded-bytes); try again later",
                    slot.model,
                    humantime::format_duration(limits.max_wait)
                );
                turn.grants
                    .push((waiter.grant, Err(EngineError::Unavailable(why))));
            } else {
                kept.push_back(waiter);
            }
        }
        slot.waiting = kept;
        let expired = limits
            .keep_alive
            .is_some_and(|k| now.duration_since(slot.last_used) >= k);
        if slot.idle() && slot.waiting.is_empty() && expired {
            tracing::info!(model = %slot.model, "model unloaded after keep-alive");
            turn.unloaded.extend(slot.engine.take());
            slot.unloads_idle += 1;
        }
    }
    // A model loaded last turn serves its queue before anything can count
    // it idle and unload it again.
    grant_loaded(shared, state, &mut turn);
    state.slots.iter_mut().for_each(|s| s.draining = false);
    // The model whose oldest request has waited longest loads next.
    let next = (state.slots.iter().enumerate())
        .filter(|(_, s)| s.engine.is_none() && !s.loading)
        .filter_map(|(i, s)| Some((i, s.waiting.front()?.since)))
        .min_by_key(|&(_, since)| since)
        .map(|(i, _)| i);
    if let Some(index) = next {
        match make_room(state, index, limits.max_loaded_bytes, now) {
            Room::Ready(evicted) => {
                turn.unloaded.extend(evicted);
                let slot = &mut state.slots[index];
                slot.loading = true;
                turn.load = Some((index, slot.loader.clone()));
            }
            Room::Later(evicted) => turn.unloaded.extend(evicted),
            Room::Never(why) => {
                for waiter in state.slots[index].waiting.drain(..) {
                    turn.grants
                        .push((waiter.grant, Err(EngineError::Unavailable(why.clone()))));
                }
            }
        }
    }
    // And models no longer draining serve theirs.
    grant_loaded(shared, state, &mut turn);
    turn
}

/// Hands leases to the queues of loaded models that are not draining.
fn grant_loaded(shared: &Arc<Shared>, state: &mut State, turn: &mut Turn) {
    for (index, slot) in state.slots.iter_mut().enumerate() {
        let Some(engine) = slot.engine.clone().filter(|_| !slot.draining) else {
            continue;
        };
        while let Some(waiter) = slot.waiting.pop_front() {
            let lease = shared.lease(slot, index, engine.clone());
            turn.grants.push((waiter.grant, Ok(lease)));
        }
    }
}

enum Room {
    /// There is room now, after unloading these idle models.
    Ready(Vec<Arc<dyn Engine>>),
    /// Not yet: busy models drain (or will, once their turn ends) to make
    /// room; these idle ones unloaded meanwhile.
    Later(Vec<Arc<dyn Engine>>),
    /// The model is larger than the whole budget.
    Never(String),
}

/// Frees memory for slot `index` within `budget`: idle models go first
/// (least recently used first); if that is not enough, busy ones whose turn
/// is over drain.
fn make_room(state: &mut State, index: usize, budget: Option<u64>, now: Instant) -> Room {
    let Some(budget) = budget else {
        return Room::Ready(Vec::new());
    };
    let need = state.slots[index].bytes;
    if need > budget {
        return Room::Never(format!(
            "model `{}` needs {} bytes, more than [loading] max-loaded-bytes ({budget})",
            state.slots[index].model, need
        ));
    }
    let used: u64 = (state.slots.iter())
        .filter(|s| s.engine.is_some())
        .map(|s| s.bytes)
        .sum();
    let mut short = (used + need).saturating_sub(budget);
    if short == 0 {
        return Room::Ready(Vec::new());
    }
    let mut loaded: Vec<usize> = (0..state.slots.len())
        .filter(|&i| state.slots[i].engine.is_some())
        .collect();
    // Idle first, then by last use.
    loaded.sort_by_key(|&i| (!state.slots[i].idle(), state.slots[i].last_used));
    let mut evicted = Vec::new();
    for i in loaded {
        if short == 0 {
            break;
        }
        let slot = &mut state.slots[i];
        if slot.idle() {
            tracing::info!(model = %slot.model, for_model = index, "model unloaded to make room");
            evicted.extend(slot.engine.take());
            slot.unloads_evicted += 1;
        } else if now >= slot.turn_ends {
            slot.draining = true;
        } else {
            continue;
        }
        short = short.saturating_sub(slot.bytes);
    }
    if short == 0 && !state.slots.iter().any(|s| s.draining) {
        Room::Ready(evicted)
    } else {
        Room::Later(evicted)
    }
}

/// How long the manager may sleep: until the next keep-alive expiry, turn
/// end or waiter deadline, and briefly while generations wait (to notice
/// one cancelled by its caller), at most a second.
fn next_deadline(state: &State, now: Instant) -> Duration {
    let mut wait = Duration::from_secs(1);
    let anyone_waits = state.slots.iter().any(|s| !s.waiting.is_empty());
    for slot in &state.slots {
        if anyone_waits && slot.engine.is_some() && slot.turn_ends > now {
            wait = wait.min(slot.turn_ends - now);
        }
        if let (Some(keep), true) = (
            state.limits.keep_alive,
            slot.idle() && slot.waiting.is_empty(),
        ) {
            wait = wait.min((slot.last_used + keep).saturating_duration_since(now));
        }
        for waiter in &slot.waiting {
            wait = wait.min((waiter.since + state.limits.max_wait).saturating_duration_since(now));
            if matches!(waiter.grant, Grant::Start(..)) {
                wait = wait.min(Duration::from_millis(50));
            }
        }
    }
    wait.max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use realm_models::engine::{FakeEngine, GenerateOptions, OnEnd, Pending};

    use super::*;

    fn limits(budget: u64, max_wait: Duration) -> ResidencyLimits {
        ResidencyLimits {
            max_loaded_bytes: Some(budget),
            keep_alive: None,
            max_wait,
        }
    }

    /// Live engines, and the most that were ever alive at once.
    #[derive(Default)]
    struct Census {
        alive: AtomicUsize,
        most: AtomicUsize,
        loads: AtomicUsize,
    }

    /// A fake engine that counts itself in a [`Census`] while it lives.
    #[derive(Debug)]
    struct Counted {
        engine: FakeEngine,
        census: Arc<Census>,
    }

    impl std::fmt::Debug for Census {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Census")
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.census.alive.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Prompter for Counted {
        fn info(&self) -> &EngineInfo {
            self.engine.info()
        }
        fn max_prompt_bytes(&self) -> usize {
            self.engine.max_prompt_bytes()
        }
        fn prompt_tokens(&self, prompt: &str) -> Vec<u32> {
            self.engine.prompt_tokens(prompt)
        }
        fn tokenize(&self, text: &str) -> Vec<u32> {
            self.engine.tokenize(text)
        }
        fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError> {
            self.engine.detokenize(tokens)
        }
        fn chat_tokens(
            &self,
            messages: &[ChatMessage],
            tools: &[Tool],
        ) -> Result<Vec<u32>, EngineError> {
            self.engine.chat_tokens(messages, tools)
        }
        fn tool_syntax(&self) -> ToolSyntax {
            self.engine.tool_syntax()
        }
        fn constrain(&self, spec: &ConstraintSpec) -> Result<Constraint, EngineError> {
            self.engine.constrain(spec)
        }
    }

    impl Engine for Counted {
        fn embed(&self, text: &str) -> Result<Vec<f32>, EngineError> {
            self.engine.embed(text)
        }
        fn start(&self, request: Request, done: Completer) {
            self.engine.start(request, done)
        }
        fn decoder(
            &self,
            adapter: Option<Arc<LoraAdapter>>,
        ) -> Result<Box<dyn Decoder>, EngineError> {
            self.engine.decoder(adapter)
        }
        fn device_bytes(&self) -> u64 {
            self.engine.device_bytes()
        }
    }

    /// Adds a model of `bytes` whose engines (made by `make`) are counted.
    fn add(
        residency: &Residency,
        name: &str,
        bytes: u64,
        census: &Arc<Census>,
        make: impl Fn() -> FakeEngine + Send + Sync + 'static,
    ) -> Arc<ResidentModel> {
        let census = census.clone();
        let load: Loader = Box::new(move || {
            census.loads.fetch_add(1, Ordering::SeqCst);
            let alive = census.alive.fetch_add(1, Ordering::SeqCst) + 1;
            census.most.fetch_max(alive, Ordering::SeqCst);
            Ok(Arc::new(Counted {
                engine: make(),
                census: census.clone(),
            }) as Arc<dyn Engine>)
        });
        residency
            .add(name, Arc::new(FakeEngine::new()), bytes, load)
            .unwrap()
    }

    fn request(model: &ResidentModel, prompt: &str, max_tokens: u32) -> Request {
        let params = GenerateOptions {
            max_tokens: Some(max_tokens),
            ..Default::default()
        }
        .check()
        .unwrap();
        Request::new(model.prompt_tokens(prompt), params, "t", 1)
    }

    fn generate(model: &ResidentModel, prompt: &str) -> Pending {
        model.submit(request(model, prompt, 100), None)
    }

    /// A generation that runs until cancelled, and the flag that cancels it.
    fn endless(model: &ResidentModel) -> (Pending, Arc<AtomicBool>) {
        let request = request(model, "x", 1000);
        let cancel = request.cancel.clone();
        (model.submit(request, None), cancel)
    }

    fn slow() -> FakeEngine {
        FakeEngine::new()
            .with_reply(|_| "y".repeat(1000))
            .with_token_delay(Duration::from_millis(2))
    }

    fn status(residency: &Residency, name: &str) -> ModelStatus {
        residency
            .status()
            .into_iter()
            .find(|s| s.model == name)
            .unwrap()
    }

    /// Waits (without a deadline that a slow machine could miss) until
    /// `check` holds.
    async fn until(mut check: impl FnMut() -> bool) {
        let start = Instant::now();
        while !check() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "condition never held"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn models_load_on_first_use_and_take_turns_within_the_budget() {
        let residency = Residency::new(limits(100, Duration::from_secs(60)));
        let census = Arc::new(Census::default());
        let a = add(&residency, "a", 60, &census, FakeEngine::new);
        let b = add(&residency, "b", 60, &census, FakeEngine::new);
        assert_eq!(status(&residency, "a").phase, Phase::Unloaded);
        assert_eq!(
            a.tokenize("hi"),
            vec![104, 105],
            "the text side needs no load"
        );

        assert_eq!(generate(&a, "one").await.unwrap().text, "echo: one");
        assert_eq!(status(&residency, "a").phase, Phase::Loaded);
        assert_eq!(generate(&b, "two").await.unwrap().text, "echo: two");
        // The generation's lease ends just after its result is delivered.
        for _ in 0..200 {
            if status(&residency, "b").idle_seconds.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (a_now, b_now) = (status(&residency, "a"), status(&residency, "b"));
        assert_eq!((a_now.phase, a_now.unloads_evicted), (Phase::Unloaded, 1));
        assert_eq!((b_now.phase, b_now.loads), (Phase::Loaded, 1));
        assert_eq!(census.most.load(Ordering::SeqCst), 1);
        assert!(b_now.idle_seconds.is_some() && a_now.idle_seconds.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_model_drains_so_a_flood_on_it_cannot_keep_another_out() {
        let residency = Residency::new(limits(100, Duration::from_secs(120)));
        let census = Arc::new(Census::default());
        let a = add(&residency, "a", 60, &census, slow);
        let b = add(&residency, "b", 60, &census, FakeEngine::new);
        let order = Arc::new(Mutex::new(Vec::new()));
        let noted = |name: &'static str| -> Option<OnEnd> {
            let order = order.clone();
            Some(Box::new(move |_| order.lock().unwrap().push(name)))
        };
        let (running, cancel) = endless(&a);
        until(|| status(&residency, "a").running == 1).await;
        let for_b = b.submit(request(&b, "b", 10), noted("b"));
        until(|| status(&residency, "a").phase == Phase::Draining).await;
        // The hostile flood: more work for `a` queues behind `b`.
        let flood: Vec<_> = (0..5)
            .map(|_| a.submit(request(&a, "a", 3), noted("a")))
            .collect();
        assert_eq!(
            status(&residency, "a").running,
            1,
            "nothing new starts on a"
        );
        cancel.store(true, Ordering::Relaxed);
        running.await.unwrap();
        for_b.await.unwrap();
        for done in flood {
            assert_eq!(done.await.unwrap().text, "yyy");
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order[0], "b", "b ran before the flood: {order:?}");
        assert_eq!(census.most.load(Ordering::SeqCst), 1, "never both loaded");
        assert_eq!(status(&residency, "a").loads, 2);
    }

    #[test]
    fn a_models_gpu_bytes_show_while_it_is_loaded() {
        let on_gpu: Loader = Box::new(|| {
            Ok(Arc::new(FakeEngine::new().with_device_bytes(7 << 20)) as Arc<dyn Engine>)
        });
        let mut slot = Slot::new("a", 60, on_gpu);
        let now = Instant::now();
        assert_eq!(slot.status(now).device_bytes, 0, "not loaded");
        slot.engine = Some((slot.loader)().unwrap());
        assert_eq!(slot.status(now).device_bytes, 7 << 20);
        slot.engine = None;
        assert_eq!(slot.status(now).device_bytes, 0, "unloaded");
    }

    #[test]
    fn a_busy_model_keeps_its_turn_for_four_times_its_load_time() {
        let fake: Loader = Box::new(|| Ok(Arc::new(FakeEngine::new()) as Arc<dyn Engine>));
        let t0 = Instant::now();
        let mut a = Slot::new("a", 60, Box::new(|| unreachable!("loaded by hand")));
        a.engine = Some(fake().unwrap());
        a.leases = 1;
        // Loaded at t0 after a one-second load: its turn ends at t0 + 4 s.
        a.turn_ends = t0 + Duration::from_secs(4);
        let mut state = State {
            limits: ResidencyLimits::default(),
            slots: vec![a, Slot::new("b", 60, fake)],
            managed: false,
        };
        let at = |s| t0 + Duration::from_secs(s);
        let room = make_room(&mut state, 1, Some(100), at(1));
        assert!(matches!(room, Room::Later(ref e) if e.is_empty()));
        assert!(
            !state.slots[0].draining,
            "mid-turn: new work still starts on a"
        );
        let room = make_room(&mut state, 1, Some(100), at(5));
        assert!(matches!(room, Room::Later(ref e) if e.is_empty()));
        assert!(state.slots[0].draining, "turn over: a drains");
        // An idle model makes room at once, turn or not (each turn of the
        // manager starts with no model draining).
        state.slots[0].leases = 0;
        state.slots[0].draining = false;
        let room = make_room(&mut state, 1, Some(100), at(1));
        assert!(matches!(room, Room::Ready(ref e) if e.len() == 1));
        assert_eq!(state.slots[0].unloads_evicted, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_waits_at_most_max_wait_then_is_refused() {
        let residency = Residency::new(limits(100, Duration::from_millis(100)));
        let census = Arc::new(Census::default());
        let a = add(&residency, "a", 60, &census, slow);
        let b = add(&residency, "b", 60, &census, FakeEngine::new);
        let (running, cancel) = endless(&a);
        until(|| status(&residency, "a").running == 1).await;
        let refused = generate(&b, "b").await.unwrap_err();
        assert!(matches!(refused, EngineError::Unavailable(_)), "{refused}");
        assert!(
            refused
                .to_string()
                .contains("could not be loaded within 100ms")
        );
        // Nobody wants `b` any more: `a` serves again.
        assert_eq!(status(&residency, "a").phase, Phase::Loaded);
        cancel.store(true, Ordering::Relaxed);
        running.await.unwrap();
        assert_eq!(status(&residency, "b").loads, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_larger_than_the_budget_is_refused_at_once() {
        let residency = Residency::new(limits(100, Duration::from_secs(60)));
        let census = Arc::new(Census::default());
        let big = add(&residency, "big", 101, &census, FakeEngine::new);
        let refused = generate(&big, "x").await.unwrap_err();
        assert!(refused.to_string().contains("needs 101 bytes"), "{refused}");
        assert!(big.embed("x").is_err());
        assert_eq!(census.loads.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_load_fails_its_waiters_and_the_next_request_tries_again() {
        let residency = Residency::new(limits(100, Duration::from_secs(60)));
        let tries = Arc::new(AtomicUsize::new(0));
        let counted = tries.clone();
        let load: Loader = Box::new(move || {
            if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(EngineError::InvalidInput("tensor `x` is missing".into()))
            } else {
                Ok(Arc::new(FakeEngine::new()) as Arc<dyn Engine>)
            }
        });
        let model = residency
            .add("m", Arc::new(FakeEngine::new()), 10, load)
            .unwrap();
        let failed = generate(&model, "x").await.unwrap_err();
        assert!(
            failed
                .to_string()
                .contains("model `m` failed to load: tensor `x` is missing"),
            "{failed}"
        );
        assert_eq!(generate(&model, "x").await.unwrap().text, "echo: x");
        let now = status(&residency, "m");
        assert_eq!((now.loads, now.load_failures), (1, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keep_alive_unloads_an_idle_model() {
        let residency = Residency::new(ResidencyLimits {
            keep_alive: Some(Duration::from_millis(20)),
            ..ResidencyLimits::default()
        });
        let census = Arc::new(Census::default());
        let model = add(&residency, "m", 10, &census, FakeEngine::new);
        generate(&model, "x").await.unwrap();
        until(|| status(&residency, "m").phase == Phase::Unloaded).await;
        assert_eq!(status(&residency, "m").unloads_idle, 1);
        assert_eq!(
            census.alive.load(Ordering::SeqCst),
            0,
            "the weights are freed"
        );
        generate(&model, "x").await.unwrap();
        assert_eq!(status(&residency, "m").loads, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_waiter_ends_cancelled_and_loads_nothing() {
        let residency = Residency::new(limits(100, Duration::from_secs(60)));
        let census = Arc::new(Census::default());
        let a = add(&residency, "a", 60, &census, slow);
        let b = add(&residency, "b", 60, &census, FakeEngine::new);
        let (running, cancel) = endless(&a);
        until(|| status(&residency, "a").running == 1).await;
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = b.submit(
            request(&b, "b", 10),
            Some(Box::new(move |r| {
                tx.send(r.as_ref().map(|c| c.finish).ok()).unwrap()
            })),
        );
        until(|| status(&residency, "b").waiting == 1).await;
        drop(waiting);
        let finish = tokio::task::spawn_blocking(move || rx.recv().unwrap())
            .await
            .unwrap();
        assert_eq!(finish, Some(FinishReason::Cancelled));
        cancel.store(true, Ordering::Relaxed);
        running.await.unwrap();
        assert_eq!(status(&residency, "b").loads, 0);
        assert_eq!(status(&residency, "a").phase, Phase::Loaded);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_decoding_session_holds_its_model_until_dropped() {
        let residency = Residency::new(limits(100, Duration::from_secs(60)));
        let census = Arc::new(Census::default());
        let a = add(&residency, "a", 60, &census, FakeEngine::new);
        let b = add(&residency, "b", 60, &census, FakeEngine::new);
        let mut session = a.decoder(None).unwrap();
        assert_eq!(status(&residency, "a").loads, 0, "loaded at first use");
        let logits = tokio::task::spawn_blocking(move || {
            let logits = session.forward(&[7]).unwrap();
            (session, logits)
        });
        let (session, logits) = logits.await.unwrap();
        assert_eq!(logits[8], 1.0);
        let for_b = generate(&b, "b");
        until(|| status(&residency, "a").phase == Phase::Draining).await;
        drop(session);
        assert_eq!(for_b.await.unwrap().text, "echo: b");
        assert_eq!(census.most.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_clients_of_two_models_lose_nothing() {
        let residency = Residency::new(limits(100, Duration::from_secs(120)));
        let census = Arc::new(Census::default());
        let models = [
            add(&residency, "a", 60, &census, FakeEngine::new),
            add(&residency, "b", 60, &census, || {
                FakeEngine::new().with_reply(|p| format!("b says {p}"))
            }),
        ];
        let mut clients = Vec::new();
        for client in 0..8 {
            let models = models.clone();
            clients.push(tokio::spawn(async move {
                for i in 0..10 {
                    let which = (client + i) % 2;
                    let prompt = format!("{client}-{i}");
                    let text = generate(&models[which], &prompt).await.unwrap().text;
                    let want = if which == 0 {
                        format!("echo: {prompt}")
                    } else {
                        format!("b says {prompt}")
                    };
                    assert_eq!(text, want);
                }
            }));
        }
        for client in clients {
            client.await.unwrap();
        }
        assert_eq!(census.most.load(Ordering::SeqCst), 1, "never both loaded");
        let loads: u64 = residency.status().iter().map(|s| s.loads).sum();
        assert!(loads >= 2, "{loads}");
    }
}
