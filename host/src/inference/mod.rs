//! Models shared by every tenant: each file is loaded once and handed out to
//! pipelines and guests by name, in memory while [`residency`] says so.

pub mod adapters;
pub mod residency;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use realm_models::arch::ComputeDevice;
use realm_models::engine::{
    BatcherConfig, Engine, EngineError, GgufPrompter, LoadedModel, Prompter,
};
use realm_models::gguf::GgufFile;

use adapters::{AdaptedModel, AdapterCache, AdapterError, AdapterSource};
use residency::{Loader, ModelStatus, Residency, ResidencyLimits, ResidentModel};

use crate::registry::{ModelStore, RegistryError, catalog_entry};

/// Why a model could not be made available.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// The source could not be found or fetched.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The file could not be loaded.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A background task failed.
    #[error("model loading task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A LoRA adapter cannot be served.
    #[error("adapter `{name}`: {source}")]
    Adapter {
        /// Its name.
        name: String,
        /// Why.
        source: AdapterError,
    },
    /// The model is not a GGUF file, so it cannot take adapters.
    #[error("adapter `{name}`: model `{model}` is not a GGUF model; adapters apply only to those")]
    NotAdaptable {
        /// The adapter's name.
        name: String,
        /// The model's source.
        model: String,
    },
    /// The model alone needs more memory than the whole budget.
    #[error(
        "model `{model}` needs {bytes} bytes (weights and prefix cache), more than [loading] max-loaded-bytes ({budget})"
    )]
    OverBudget {
        /// The model's source.
        model: String,
        /// What it needs.
        bytes: u64,
        /// The budget.
        budget: u64,
    },
}

/// One value per key, made once by whichever caller asks first; callers
/// asking for the same key meanwhile wait for it, others do not.
type OnceMap<K, V> = std::sync::Mutex<HashMap<K, Arc<tokio::sync::OnceCell<V>>>>;

/// Whose adapter one is, which decides the cache that keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterUse {
    /// One of the server's `[adapters]`, within `max-adapter-bytes`.
    Served,
    /// A pipeline model's: kept apart, so that pipeline runs cannot take
    /// the budget the served ones are checked against.
    Pipeline,
}

/// The loaded models of this process.
pub struct ModelHub {
    store: ModelStore,
    device: ComputeDevice,
    batching: std::sync::Mutex<BatcherConfig>,
    /// Each source's file, resolved (and pulled) once.
    resolved: OnceMap<String, PathBuf>,
    /// Each file's model, added to the residency once.
    loaded: OnceMap<PathBuf, Arc<ResidentModel>>,
    /// Which models are in memory.
    residency: Residency,
    /// Engines made by the embedding program, by source name; they come
    /// before the store.
    provided: std::sync::Mutex<HashMap<String, Arc<dyn Engine>>>,
    /// The served adapters (`[adapters]`) in memory, within their budget.
    adapters: Arc<AdapterCache>,
    /// Pipelines' adapters in memory (see [`AdapterUse::Pipeline`]; they
    /// are as many as the pipelines' files name).
    pipeline_adapters: Arc<AdapterCache>,
}

/// The cell for `key` in `map`, made empty if absent. The map's lock is held
/// only for the lookup, never while a value is being made.
fn cell<K: std::hash::Hash + Eq, V>(map: &OnceMap<K, V>, key: K) -> Arc<tokio::sync::OnceCell<V>> {
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_default()
        .clone()
}

impl ModelHub {
    /// A hub that finds models in `store` and runs them on `device`.
    pub fn new(store: ModelStore, device: ComputeDevice) -> Self {
        ModelHub {
            store,
            device,
            batching: std::sync::Mutex::new(BatcherConfig::default()),
            resolved: Default::default(),
            loaded: Default::default(),
            residency: Residency::default(),
            provided: Default::default(),
            adapters: Default::default(),
            pipeline_adapters: Default::default(),
        }
    }

    /// The LoRA adapters in memory, bounded by
    /// [`AdapterCache::set_budget`].
    pub fn adapters(&self) -> &AdapterCache {
        &self.adapters
    }

    /// The model `base` (as [`load`](Self::load) gave it, from `source`)
    /// with the LoRA adapter `adapter` (a path to a `.gguf` or a stored
    /// name) at `scale`, served as `name`: the adapter is checked against
    /// the model now, from the files' headers, and read when first used,
    /// into the cache of its `purpose`.
    pub async fn adapted(
        &self,
        purpose: AdapterUse,
        name: &str,
        (source, base): (&str, Arc<dyn Engine>),
        adapter: &str,
        scale: f32,
    ) -> Result<Arc<AdaptedModel>, InferenceError> {
        let provided = (self.provided.lock())
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(source);
        if provided {
            return Err(InferenceError::NotAdaptable {
                name: name.to_string(),
                model: source.to_string(),
            });
        }
        let base_file = self.file(source).await?;
        let (store, adapter) = (self.store.clone(), adapter.to_string());
        let cache = match purpose {
            AdapterUse::Served => self.adapters.clone(),
            AdapterUse::Pipeline => self.pipeline_adapters.clone(),
        };
        let label = name.to_string();
        tokio::task::spawn_blocking(move || {
            let file = store.resolve(&adapter)?;
            let source = AdapterSource {
                base: base_file,
                file,
                scale,
            };
            AdaptedModel::new(&label, base, source, cache).map_err(|source| {
                InferenceError::Adapter {
                    name: label.clone(),
                    source,
                }
            })
        })
        .await?
        .map(Arc::new)
    }

    /// How many models stay in memory, and for how long, from now on.
    pub fn set_residency(&self, limits: ResidencyLimits) {
        self.residency.set_limits(limits);
    }

    /// Every model's place in memory (for `realm-host ps` and metrics).
    pub fn status(&self) -> Vec<ModelStatus> {
        self.residency.status()
    }

    /// Serves the model `source` from now on as one that `load` loads into
    /// memory (holding `bytes`) when work needs it, like a model file, with
    /// `text` as its text side: for tests of residency without model files.
    pub fn provide_loadable(
        &self,
        source: &str,
        text: Arc<dyn Prompter>,
        bytes: u64,
        load: Loader,
    ) -> Result<(), EngineError> {
        let model = self.residency.add(source, text, bytes, load)?;
        self.provide(source, model);
        Ok(())
    }

    /// Serves `engine` as the model `source` from now on, in place of any
    /// stored or catalog model of that name: for a program that embeds the
    /// host with an engine it built (and for tests, with a
    /// [`FakeEngine`](realm_models::engine::FakeEngine)).
    pub fn provide(&self, source: &str, engine: Arc<dyn Engine>) {
        self.provided
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(source.to_string(), engine);
    }

    /// How models loaded from now on batch their generations (models
    /// already loaded keep theirs).
    pub fn set_batching(&self, batching: BatcherConfig) {
        *self.batching.lock().unwrap_or_else(|e| e.into_inner()) = batching;
    }

    /// The model `source` (a catalog name, pulled on first use; a stored
    /// model's name; or a path to a `.gguf`), shared. Its text side is read
    /// once; its weights load now if models stay loaded for ever (no budget,
    /// no keep-alive), else on first use.
    ///
    /// Pulling or reading one model holds up only callers of the same one:
    /// a download of one model never delays another. A failure is not
    /// remembered; the next caller tries again.
    pub async fn load(&self, source: &str) -> Result<Arc<dyn Engine>, InferenceError> {
        let provided = (self.provided.lock())
            .unwrap_or_else(|e| e.into_inner())
            .get(source)
            .cloned();
        if let Some(engine) = provided {
            return Ok(engine);
        }
        let path = self.file(source).await?;
        let limits = self.residency.limits();
        let cell = cell(&self.loaded, path.clone());
        let model = cell
            .get_or_try_init(|| self.add(source, path.clone(), limits.max_loaded_bytes))
            .await?
            .clone();
        if !limits.on_demand() {
            let loading = model.clone();
            tokio::task::spawn_blocking(move || loading.preload()).await??;
        }
        Ok(model)
    }

    /// Reads the text side of the model in `path` and adds it to the
    /// residency, refusing one larger than `budget` by itself.
    async fn add(
        &self,
        source: &str,
        path: PathBuf,
        budget: Option<u64>,
    ) -> Result<Arc<ResidentModel>, InferenceError> {
        let read = path.clone();
        let prompter = tokio::task::spawn_blocking(move || {
            let file = GgufFile::open(&read)?;
            Ok::<_, EngineError>(Arc::new(GgufPrompter::from_gguf(&file)?))
        })
        .await??;
        let (device, batching) = (
            self.device,
            self.batching
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        );
        let bytes = prompter.info().weight_bytes + batching.prefix_cache_bytes as u64;
        if let Some(budget) = budget.filter(|&b| bytes > b) {
            return Err(InferenceError::OverBudget {
                model: source.to_string(),
                bytes,
                budget,
            });
        }
        let text = prompter.clone();
        let name = source.to_string();
        let load: Loader = Box::new(move || {
            tracing::info!(model = %name, path = %path.display(), %device, "loading model");
            let file = Arc::new(GgufFile::open(&path)?);
            let model = LoadedModel::load(prompter.clone(), file, device, batching.clone())?;
            Ok(Arc::new(model) as Arc<dyn Engine>)
        });
        Ok(self.residency.add(source, text, bytes, load)?)
    }

    /// The GGUF file of `source` (resolved, and pulled, once).
    pub async fn file(&self, source: &str) -> Result<PathBuf, InferenceError> {
        let resolved = cell(&self.resolved, source.to_string());
        let path = resolved.get_or_try_init(|| self.resolve(source)).await?;
        Ok(path.clone())
    }

    /// The file of `source`, pulled into the store first if it is a catalog
    /// model or a Hugging Face file not there yet.
    async fn resolve(&self, source: &str) -> Result<PathBuf, InferenceError> {
        let store = self.store.clone();
        let source = source.to_string();
        tokio::task::spawn_blocking(move || {
            if source.starts_with("hf:") {
                tracing::info!(model = %source, "fetching from the Hugging Face Hub (or checking the stored copy)");
                return store.pull(&source).map(|m| m.path);
            }
            match store.resolve(&source) {
                Ok(path) => Ok(path),
                Err(RegistryError::NotFound(_)) if catalog_entry(&source).is_some() => {
                    tracing::info!(model = %source, "model not in the store yet; pulling it");
                    store.pull(&source).map(|m| m.path)
                }
                Err(e) => Err(e),
            }
        })
        .await?
        .map_err(InferenceError::from)
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::registry::Sources;
    use crate::registry::testing::{Reply, empty, server};
    use realm_models::engine::FakeEngine;
    use realm_models::gguf::{GgufWriter, MetaValue};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hub_sources_are_pulled_on_first_use_and_provided_engines_come_first() {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", MetaValue::String("llama".into()))
            .tensor_f32("x", &[2], &[1.0, 2.0]);
        let body = w.to_bytes();
        let sha = hex::encode(Sha256::digest(&body));
        let served = body.clone();
        let hub = server(move |r| match r.path.as_str() {
            "/acme/tiny-GGUF/resolve/main/Tiny.gguf" => Reply {
                status: "200 OK",
                headers: vec![("X-Linked-Etag", format!("\"{sha}\""))],
                cut: served.len(),
                body: served.clone(),
            },
            _ => empty("404 Not Found"),
        });
        let dir = tempfile::tempdir().unwrap();
        let sources = Sources {
            pypi_index: "http://unused".into(),
            hf_endpoint: hub,
            hf_token: None,
        };
        let store = ModelStore::with_sources(dir.path().join("models"), sources);
        let models = ModelHub::new(store, ComputeDevice::Cpu);
        let source = "hf:acme/tiny-GGUF/Tiny.gguf";
        let path = models.file(source).await.unwrap();
        assert_eq!(path, dir.path().join("models/tiny.gguf"));
        assert_eq!(std::fs::read(&path).unwrap(), body);

        models.provide(source, Arc::new(FakeEngine::new()));
        let engine = models.load(source).await.unwrap();
        assert_eq!(engine.info().architecture, "fake");
    }
}
