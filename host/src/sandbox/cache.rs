//! Compiled components, cached by the SHA-256 of their bytes: in memory for the
//! life of the process, and on disk (`*.cwasm`) across restarts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::error::SandboxError;

/// Where a compiled component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheSource {
    /// Already compiled in this process.
    Memory,
    /// Loaded from the on-disk cache.
    Disk,
    /// Compiled now.
    Compiled,
}

pub(crate) struct ComponentCache {
    memory: Mutex<HashMap<String, Component>>,
    disk: Option<PathBuf>,
}

impl ComponentCache {
    pub(crate) fn new(disk: Option<PathBuf>) -> Self {
        ComponentCache {
            memory: Mutex::new(HashMap::new()),
            disk,
        }
    }

    /// The compiled form of the component at `path`, with its content hash.
    pub(crate) async fn load(
        &self,
        engine: &Engine,
        path: &Path,
    ) -> Result<(Component, String, CacheSource), SandboxError> {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|source| SandboxError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        let hash = hex::encode(Sha256::digest(&bytes));
        if let Some(component) = self.lock().get(&hash) {
            return Ok((component.clone(), hash, CacheSource::Memory));
        }
        let cached = self
            .disk
            .as_ref()
            .map(|dir| dir.join(format!("{hash}.cwasm")));
        let engine = engine.clone();
        let source_path = path.to_path_buf();
        let (component, source) = tokio::task::spawn_blocking(move || {
            compile_or_restore(&engine, &source_path, &bytes, cached.as_deref())
        })
        .await
        .map_err(|e| SandboxError::Setup(format!("compile task failed: {e}")))??;
        self.lock().insert(hash.clone(), component.clone());
        Ok((component, hash, source))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Component>> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn compile_or_restore(
    engine: &Engine,
    path: &Path,
    bytes: &[u8],
    cached: Option<&Path>,
) -> Result<(Component, CacheSource), SandboxError> {
    if let Some(cached) = cached.filter(|p| p.exists()) {
        // SAFETY: the cache directory belongs to this host (under REALM_HOME)
        // and only ever holds files this function serialized with a compatible
        // engine; wasmtime also checks the engine and version header and we
        // recompile on any mismatch.
        match unsafe { Component::deserialize_file(engine, cached) } {
            Ok(component) => return Ok((component, CacheSource::Disk)),
            Err(e) => {
                tracing::debug!(path = %cached.display(), "stale compiled component, recompiling: {e:#}")
            }
        }
    }
    let component = Component::new(engine, bytes).map_err(|e| SandboxError::Compile {
        path: path.to_path_buf(),
        message: format!("{e:#}"),
    })?;
    if let Some(cached) = cached
        && let Err(e) = store(&component, cached)
    {
        tracing::warn!(path = %cached.display(), "cannot write compiled-component cache: {e:#}");
    }
    Ok((component, CacheSource::Compiled))
}

fn store(component: &Component, path: &Path) -> anyhow::Result<()> {
    let bytes = component
        .serialize()
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut temp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut temp, &bytes)?;
    temp.persist(path)?;
    Ok(())
}
