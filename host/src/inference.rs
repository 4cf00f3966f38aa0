//! Models shared by every tenant: each file is loaded once and handed out to
//! pipelines and guests by name.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use realm_models::arch::ComputeDevice;
use realm_models::engine::{BatcherConfig, EngineError, LoadedModel};

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
    Task(String),
}

/// The loaded models of this process.
pub struct ModelHub {
    store: ModelStore,
    device: ComputeDevice,
    batching: std::sync::Mutex<BatcherConfig>,
    loaded: tokio::sync::Mutex<HashMap<PathBuf, Arc<LoadedModel>>>,
}

impl ModelHub {
    /// A hub that finds models in `store` and runs them on `device`.
    pub fn new(store: ModelStore, device: ComputeDevice) -> Self {
        ModelHub {
            store,
            device,
            batching: std::sync::Mutex::new(BatcherConfig::default()),
            loaded: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// How models loaded from now on batch their generations (models
    /// already loaded keep theirs).
    pub fn set_batching(&self, batching: BatcherConfig) {
        *self.batching.lock().unwrap_or_else(|e| e.into_inner()) = batching;
    }

    /// The model `source` (a catalog name, pulled on first use; a stored
    /// model's name; or a path to a `.gguf`), loaded once and shared.
    pub async fn load(&self, source: &str) -> Result<Arc<LoadedModel>, InferenceError> {
        let mut loaded = self.loaded.lock().await;
        let store = self.store.clone();
        let source_owned = source.to_string();
        let path = tokio::task::spawn_blocking(move || match store.resolve(&source_owned) {
            Ok(path) => Ok(path),
            Err(RegistryError::NotFound(_)) if catalog_entry(&source_owned).is_some() => {
                tracing::info!(model = %source_owned, "model not in the store yet; pulling it");
                store.pull(&source_owned).map(|m| m.path)
            }
            Err(e) => Err(e),
        })
        .await
        .map_err(|e| InferenceError::Task(e.to_string()))??;
        if let Some(model) = loaded.get(&path) {
            return Ok(model.clone());
        }
        let (file, device) = (path.clone(), self.device);
        let batching = self
            .batching
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let model =
            tokio::task::spawn_blocking(move || LoadedModel::open_with(&file, device, batching))
                .await
                .map_err(|e| InferenceError::Task(e.to_string()))??;
        let model = Arc::new(model);
        tracing::info!(model = %source, path = %path.display(), device = %self.device, "model loaded");
        loaded.insert(path, model.clone());
        Ok(model)
    }
}
