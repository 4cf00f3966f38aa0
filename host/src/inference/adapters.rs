//! LoRA adapters on the shared models.
//!
//! A served adapter is an [`Engine`] of its own ([`AdaptedModel`]): the base
//! model's text side and batch, with every generation and session run with
//! the adapter. Code that picks a model by name (the APIs, guests,
//! pipelines) needs nothing else to use one, and sequences with different
//! adapters still share the base model's batch.
//!
//! Adapters are checked from their files' headers when the configuration
//! loads, read on first use, and kept by an [`AdapterCache`]: within
//! `max-adapter-bytes`, the least recently used adapter that no generation
//! holds goes first. An adapter in use is never dropped, so when those in
//! use fill the budget a request for another one is refused with a hint to
//! retry, rather than memory growing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use realm_models::arch::{AdapterShape, LoraAdapter, LoraError, ModelConfig};
use realm_models::chat::ChatMessage;
use realm_models::chat::tools::{Tool, ToolSyntax};
use realm_models::engine::{
    Completer, Constraint, ConstraintSpec, Decoder, Engine, EngineError, EngineInfo, Prompter,
    Request,
};
use realm_models::gguf::{GgufError, GgufFile};

/// Why an adapter cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// A file could not be read as GGUF.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: GgufError,
    },
    /// The file is not an adapter for the model, or a tensor is wrong.
    #[error("{path}: {source}")]
    Unfit {
        /// The adapter file.
        path: PathBuf,
        /// What does not fit.
        source: LoraError,
    },
    /// The adapter alone is larger than the budget.
    #[error(
        "{path}: the adapter takes {bytes} bytes in memory, more than [loading] max-adapter-bytes ({budget})"
    )]
    TooLarge {
        /// The adapter file.
        path: PathBuf,
        /// What it takes.
        bytes: u64,
        /// The budget.
        budget: u64,
    },
    /// Adapters in use fill the budget; trying later may succeed.
    #[error(
        "the LoRA adapters in use fill [loading] max-adapter-bytes ({budget} bytes); try again when generations finish"
    )]
    Full {
        /// The budget.
        budget: u64,
    },
}

/// Where an adapter comes from and how strongly it applies.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSource {
    /// The base model's GGUF file.
    pub base: PathBuf,
    /// The adapter's GGUF file.
    pub file: PathBuf,
    /// The scale it applies at (1.0 as trained).
    pub scale: f32,
}

/// One version of an adapter: its files, its scale, and the adapter file's
/// size and modification time, so that an edited file is read afresh.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AdapterKey {
    base: PathBuf,
    file: PathBuf,
    scale: u32,
    len: u64,
    modified: Option<SystemTime>,
}

impl AdapterSource {
    /// Checks the adapter against its base from the files' headers (no
    /// factor is read); returns its shape and the identity of this version.
    pub fn check(&self) -> Result<(AdapterShape, AdapterKey), AdapterError> {
        let (adapter, base, config) = self.open()?;
        let shape =
            LoraAdapter::check(&adapter, &base, &config).map_err(|source| AdapterError::Unfit {
                path: self.file.clone(),
                source,
            })?;
        let meta = std::fs::metadata(&self.file).ok();
        let key = AdapterKey {
            base: self.base.clone(),
            file: self.file.clone(),
            scale: self.scale.to_bits(),
            len: meta.as_ref().map_or(0, |m| m.len()),
            modified: meta.and_then(|m| m.modified().ok()),
        };
        Ok((shape, key))
    }

    /// Reads the adapter.
    fn load(&self) -> Result<LoraAdapter, AdapterError> {
        let (adapter, base, config) = self.open()?;
        LoraAdapter::load(&adapter, &base, &config, self.scale).map_err(|source| {
            AdapterError::Unfit {
                path: self.file.clone(),
                source,
            }
        })
    }

    fn open(&self) -> Result<(GgufFile, GgufFile, ModelConfig), AdapterError> {
        let open = |path: &Path| {
            GgufFile::open(path).map_err(|source| AdapterError::File {
                path: path.to_path_buf(),
                source,
            })
        };
        let (adapter, base) = (open(&self.file)?, open(&self.base)?);
        let config = ModelConfig::from_gguf(&base).map_err(|source| AdapterError::File {
            path: self.base.clone(),
            source,
        })?;
        Ok((adapter, base, config))
    }
}

/// One adapter's place in the cache.
struct Slot {
    /// What it takes in memory (from its header until it is read).
    bytes: u64,
    /// The clock when last asked for.
    used: u64,
    /// The adapter once read; locked while it is being read, so that
    /// callers asking for it meanwhile wait for that one read.
    adapter: Arc<Mutex<Option<Arc<LoraAdapter>>>>,
}

impl Slot {
    /// Whether dropping it frees memory now: read, and held by no
    /// generation, session or waiting caller.
    fn idle(&self) -> bool {
        Arc::strong_count(&self.adapter) == 1
            && with_read(&self.adapter, |a| {
                a.as_ref().is_none_or(|a| Arc::strong_count(a) == 1)
            })
            .unwrap_or(false)
    }
}

/// `look` at the adapter in `cell` (`None` if not read yet), or `None` while
/// the cell is locked (being read). A read that panicked left it unread.
fn with_read<R>(
    cell: &Mutex<Option<Arc<LoraAdapter>>>,
    look: impl FnOnce(&Option<Arc<LoraAdapter>>) -> R,
) -> Option<R> {
    match cell.try_lock() {
        Ok(adapter) => Some(look(&adapter)),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(look(&p.into_inner())),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

#[derive(Default)]
struct CacheState {
    budget: Option<u64>,
    slots: HashMap<AdapterKey, Slot>,
    clock: u64,
}

/// The adapters in memory, within a byte budget (see the module docs).
#[derive(Default)]
pub struct AdapterCache {
    state: Mutex<CacheState>,
}

impl std::fmt::Debug for AdapterCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("AdapterCache")
            .field("budget", &state.budget)
            .field("adapters", &state.slots.len())
            .finish()
    }
}

impl AdapterCache {
    fn lock(&self) -> MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps adapters within `budget` bytes from now on (`None`: no bound),
    /// dropping idle ones at once if they hold more.
    pub fn set_budget(&self, budget: Option<u64>) {
        let mut state = self.lock();
        state.budget = budget;
        // Nothing in use is dropped; what is stays counted.
        let _ = make_room(&mut state, 0, Path::new(""));
    }

    /// The budget.
    pub fn budget(&self) -> Option<u64> {
        self.lock().budget
    }

    /// How many adapters are held or being read.
    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    /// Whether no adapter is held or being read.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the adapters held or being read.
    pub fn bytes(&self) -> u64 {
        self.lock().slots.values().map(|s| s.bytes).sum()
    }

    /// Whether the adapter `key` is in memory, read (not being read).
    pub fn holds(&self, key: &AdapterKey) -> bool {
        let state = self.lock();
        (state.slots.get(key))
            .and_then(|slot| with_read(&slot.adapter, Option::is_some))
            .unwrap_or(false)
    }

    /// Forgets every idle adapter but those `keep` names (after a reload);
    /// one in use stays counted until it is idle and dropped to make room.
    pub fn retain(&self, keep: impl Fn(&AdapterKey) -> bool) {
        self.lock()
            .slots
            .retain(|key, slot| keep(key) || !slot.idle());
    }

    /// The adapter `key` if it is in memory, without reading any file.
    fn cached(&self, key: &AdapterKey) -> Option<Arc<LoraAdapter>> {
        let mut state = self.lock();
        state.clock += 1;
        let clock = state.clock;
        let slot = state.slots.get_mut(key)?;
        slot.used = clock;
        with_read(&slot.adapter, Option::clone).flatten()
    }

    /// The adapter of `source` (version `key`, taking `bytes`), read now if
    /// it is not in memory, after dropping idle ones to make room. Blocks
    /// while it reads.
    pub fn get(
        &self,
        source: &AdapterSource,
        key: &AdapterKey,
        bytes: u64,
    ) -> Result<Arc<LoraAdapter>, AdapterError> {
        loop {
            if let Some(done) = self.try_get(source, key, bytes) {
                return done;
            }
        }
    }

    /// One try of [`get`](Self::get); `None` when a read by another caller
    /// failed meanwhile (its slot is gone: start over).
    fn try_get(
        &self,
        source: &AdapterSource,
        key: &AdapterKey,
        bytes: u64,
    ) -> Option<Result<Arc<LoraAdapter>, AdapterError>> {
        let cell = {
            let mut state = self.lock();
            state.clock += 1;
            let clock = state.clock;
            match state.slots.get_mut(key) {
                Some(slot) => {
                    slot.used = clock;
                    slot.adapter.clone()
                }
                None => {
                    if let Err(e) = make_room(&mut state, bytes, &source.file) {
                        return Some(Err(e));
                    }
                    let cell = Arc::new(Mutex::new(None));
                    state.slots.insert(
                        key.clone(),
                        Slot {
                            bytes,
                            used: clock,
                            adapter: cell.clone(),
                        },
                    );
                    cell
                }
            }
        };
        let mut adapter = cell.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(adapter) = &*adapter {
            return Some(Ok(adapter.clone()));
        }
        let current = |state: &CacheState| {
            (state.slots.get(key)).is_some_and(|s| Arc::ptr_eq(&s.adapter, &cell))
        };
        if !current(&self.lock()) {
            return None;
        }
        tracing::info!(adapter = %source.file.display(), "loading LoRA adapter");
        Some(match source.load() {
            Ok(loaded) => {
                let loaded = Arc::new(loaded);
                *adapter = Some(loaded.clone());
                if let Some(slot) = self.lock().slots.get_mut(key) {
                    slot.bytes = loaded.bytes() as u64;
                }
                Ok(loaded)
            }
            Err(e) => {
                // Not remembered: the next caller reads the file again.
                let mut state = self.lock();
                if current(&state) {
                    state.slots.remove(key);
                }
                Err(e)
            }
        })
    }
}

/// Drops idle adapters, least recently used first, until `bytes` more fit
/// the budget.
fn make_room(state: &mut CacheState, bytes: u64, file: &Path) -> Result<(), AdapterError> {
    let Some(budget) = state.budget else {
        return Ok(());
    };
    if bytes > budget {
        return Err(AdapterError::TooLarge {
            path: file.to_path_buf(),
            bytes,
            budget,
        });
    }
    loop {
        let held: u64 = state.slots.values().map(|s| s.bytes).sum();
        if held + bytes <= budget {
            return Ok(());
        }
        let oldest = (state.slots.iter())
            .filter(|(_, s)| s.idle())
            .min_by_key(|(_, s)| s.used)
            .map(|(k, _)| k.clone());
        match oldest {
            Some(key) => {
                tracing::info!(adapter = %key.file.display(), "unloading LoRA adapter (least recently used)");
                state.slots.remove(&key);
            }
            None => return Err(AdapterError::Full { budget }),
        }
    }
}

/// A base model with an adapter: an [`Engine`] whose generations and
/// sessions all run with the adapter (see the module docs).
#[derive(Clone)]
pub struct AdaptedModel {
    base: Arc<dyn Engine>,
    /// The name clients use (`small:support`), for messages.
    name: String,
    source: AdapterSource,
    key: AdapterKey,
    bytes: u64,
    cache: Arc<AdapterCache>,
}

impl std::fmt::Debug for AdaptedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdaptedModel")
            .field("name", &self.name)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl AdaptedModel {
    /// `base` run with the adapter of `source`, checked now (headers only),
    /// read through `cache` when first used; `name` is what clients call it.
    pub fn new(
        name: &str,
        base: Arc<dyn Engine>,
        source: AdapterSource,
        cache: Arc<AdapterCache>,
    ) -> Result<Self, AdapterError> {
        let (shape, key) = source.check()?;
        let bytes = shape.bytes as u64;
        if let Some(budget) = cache.budget().filter(|&b| bytes > b) {
            return Err(AdapterError::TooLarge {
                path: source.file.clone(),
                bytes,
                budget,
            });
        }
        Ok(AdaptedModel {
            base,
            name: name.to_string(),
            source,
            key,
            bytes,
            cache,
        })
    }

    /// The version of the adapter it serves.
    pub fn key(&self) -> &AdapterKey {
        &self.key
    }

    /// What the adapter takes in memory once read.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The error of a request or session that brings an adapter of its own.
    fn second_adapter(&self) -> EngineError {
        EngineError::InvalidInput(format!(
            "`{}` runs its own adapter; name the base model",
            self.name
        ))
    }

    fn adapter(&self) -> Result<Arc<LoraAdapter>, EngineError> {
        (self.cache.get(&self.source, &self.key, self.bytes)).map_err(|e| failed(&self.name, e))
    }
}

impl Prompter for AdaptedModel {
    fn info(&self) -> &EngineInfo {
        self.base.info()
    }

    fn max_prompt_bytes(&self) -> usize {
        self.base.max_prompt_bytes()
    }

    fn prompt_tokens(&self, prompt: &str) -> Vec<u32> {
        self.base.prompt_tokens(prompt)
    }

    fn tokenize(&self, text: &str) -> Vec<u32> {
        self.base.tokenize(text)
    }

    fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError> {
        self.base.detokenize(tokens)
    }

    fn chat_tokens(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
    ) -> Result<Vec<u32>, EngineError> {
        self.base.chat_tokens(messages, tools)
    }

    fn tool_syntax(&self) -> ToolSyntax {
        self.base.tool_syntax()
    }

    fn constrain(&self, spec: &ConstraintSpec) -> Result<Constraint, EngineError> {
        self.base.constrain(spec)
    }
}

impl Engine for AdaptedModel {
    fn embed(&self, _text: &str) -> Result<Vec<f32>, EngineError> {
        let base = self.name.split(':').next().unwrap_or_default();
        Err(EngineError::InvalidInput(format!(
            "embeddings come from base models: use `{base}`, not `{}`",
            self.name
        )))
    }

    /// Starts at once when the adapter is in memory; else reads it first
    /// on a blocking thread, so the caller never waits on the disk.
    fn start(&self, mut request: Request, done: Completer) {
        if request.adapter.is_some() {
            done.complete(Err(self.second_adapter()));
            return;
        }
        if let Some(adapter) = self.cache.cached(&self.key) {
            request.adapter = Some(adapter);
            self.base.start(request, done);
            return;
        }
        let this = self.clone();
        let load = move || match this.adapter() {
            Ok(adapter) => {
                request.adapter = Some(adapter);
                this.base.start(request, done);
            }
            Err(e) => done.complete(Err(e)),
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(load)),
            // A thread that cannot start drops `done`, which ends the
            // request with an error.
            Err(_) => drop(
                std::thread::Builder::new()
                    .name("adapter-read".into())
                    .spawn(load),
            ),
        }
    }

    /// The adapter is read at the session's first `forward`.
    fn decoder(&self, adapter: Option<Arc<LoraAdapter>>) -> Result<Box<dyn Decoder>, EngineError> {
        if adapter.is_some() {
            return Err(self.second_adapter());
        }
        Ok(Box::new(AdaptedDecoder {
            inner: None,
            model: self.clone(),
        }))
    }

    /// The base model's: an adapter's factors are not on the device budget.
    fn device_bytes(&self) -> u64 {
        self.base.device_bytes()
    }
}

/// The error a caller of `name` gets when its adapter cannot be had: a
/// full budget is worth a retry; why a file failed (paths included) is the
/// operator's to read in the log, not the client's.
fn failed(name: &str, e: AdapterError) -> EngineError {
    if let AdapterError::Full { .. } = e {
        return EngineError::Unavailable(e.to_string());
    }
    tracing::error!(model = name, "cannot load the LoRA adapter: {e}");
    EngineError::StepFailed(format!(
        "the LoRA adapter of `{name}` could not be loaded (the server's log says why)"
    ))
}

/// A decoding session of an [`AdaptedModel`].
struct AdaptedDecoder {
    inner: Option<Box<dyn Decoder>>,
    model: AdaptedModel,
}

impl Decoder for AdaptedDecoder {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let decoder = match &mut self.inner {
            Some(decoder) => decoder,
            None => {
                let adapter = self.model.adapter()?;
                self.inner.insert(self.model.base.decoder(Some(adapter))?)
            }
        };
        decoder.forward(tokens)
    }

    fn truncate(&mut self, len: usize) {
        if let Some(decoder) = &mut self.inner {
            decoder.truncate(len);
        }
    }
}
