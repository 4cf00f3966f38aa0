//! `models list`: the stored models, each with the stored LoRA adapters that
//! fit it, checked from the files' headers.

use realm_models::arch::{LoraAdapter, ModelConfig};
use realm_models::gguf::GgufFile;

use super::store::{ModelStore, RegistryError, StoredModel};

/// A stored LoRA adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAdapter {
    /// Its file in the store.
    pub file: StoredModel,
    /// The architecture it adapts.
    pub architecture: String,
    /// Its largest rank.
    pub rank: usize,
}

/// What the store holds, adapters beside the models they fit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Listing {
    /// Each model, with the adapters that fit it (an adapter may fit several).
    pub models: Vec<(StoredModel, Vec<StoredAdapter>)>,
    /// Adapters that fit no stored model.
    pub unmatched: Vec<StoredAdapter>,
    /// Files that are not readable GGUF, with why.
    pub unreadable: Vec<(StoredModel, String)>,
}

impl ModelStore {
    /// Every stored file sorted into models and the adapters that fit each
    /// (same architecture, every factor's shape matching its weight).
    pub fn listing(&self) -> Result<Listing, RegistryError> {
        let mut listing = Listing::default();
        let mut bases = Vec::new();
        let mut adapters = Vec::new();
        for stored in self.list()? {
            let file = match GgufFile::open(&stored.path) {
                Ok(file) => file,
                Err(e) => {
                    listing.unreadable.push((stored, e.to_string()));
                    continue;
                }
            };
            if file.get_str("general.type").ok() == Some("adapter") {
                adapters.push((stored, file));
            } else {
                let config = ModelConfig::from_gguf(&file).ok();
                bases.push((stored, file, config));
            }
        }
        let mut fitted = vec![false; adapters.len()];
        for (stored, base, config) in bases {
            let mut fits = Vec::new();
            for (i, (adapter_file, adapter)) in adapters.iter().enumerate() {
                let Some(config) = &config else { continue };
                if let Ok(shape) = LoraAdapter::check(adapter, &base, config) {
                    fitted[i] = true;
                    fits.push(StoredAdapter {
                        file: adapter_file.clone(),
                        architecture: config.architecture.clone(),
                        rank: shape.rank,
                    });
                }
            }
            listing.models.push((stored, fits));
        }
        for ((stored, adapter), fitted) in adapters.into_iter().zip(fitted) {
            if !fitted {
                listing.unmatched.push(StoredAdapter {
                    architecture: adapter
                        .get_str("general.architecture")
                        .unwrap_or("unknown")
                        .to_string(),
                    rank: super::inspect::adapter(&adapter)
                        .and_then(|report| report.ranks.last().copied())
                        .unwrap_or(0) as usize,
                    file: stored,
                });
            }
        }
        Ok(listing)
    }
}
