//! A tenant's on-disk home: the directory its guests see, and its kv store.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::SandboxError;
use super::kv_store::KvStore;

/// Who a guest call runs for: the tenant's id, its private files directory
/// (preopened as the guest's `/`) and its key-value store.
#[derive(Debug, Clone)]
pub struct Tenant {
    id: Arc<str>,
    files: PathBuf,
    kv: Arc<KvStore>,
}

impl Tenant {
    /// Checks that `id` can name a tenant (and its directory).
    pub fn check_id(id: &str) -> Result<(), SandboxError> {
        validate_id(id)
    }

    /// Opens tenant `id` under `root` (`root/<id>/files` and `root/<id>/kv`),
    /// creating the directories on first use.
    pub fn open(root: &Path, id: &str) -> Result<Self, SandboxError> {
        validate_id(id)?;
        let home = root.join(id);
        let files = home.join("files");
        std::fs::create_dir_all(&files).map_err(|source| SandboxError::DataDir {
            path: files.clone(),
            source,
        })?;
        let kv_path = home.join("kv");
        let kv = KvStore::open(&kv_path).map_err(|source| SandboxError::KvStore {
            path: kv_path,
            source,
        })?;
        Ok(Tenant {
            id: id.into(),
            files,
            kv: Arc::new(kv),
        })
    }

    /// The tenant's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The host directory the tenant's guests see as `/`.
    pub fn files_dir(&self) -> &Path {
        &self.files
    }

    pub(crate) fn id_arc(&self) -> Arc<str> {
        self.id.clone()
    }

    pub(crate) fn kv(&self) -> Arc<KvStore> {
        self.kv.clone()
    }
}

/// Tenant ids become directory names: keep them to a safe alphabet.
fn validate_id(id: &str) -> Result<(), SandboxError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(SandboxError::Setup(format!(
            "invalid tenant id `{id}`: use 1-64 letters, digits, `-` or `_`"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_path_like_ids() {
        let tmp = tempfile::tempdir().unwrap();
        for bad in ["", "..", "a/b", "-x", "a b", &"x".repeat(65)] {
            assert!(Tenant::open(tmp.path(), bad).is_err(), "{bad:?}");
        }
        let t = Tenant::open(tmp.path(), "acme_1").unwrap();
        assert!(t.files_dir().is_dir());
        assert_eq!(t.id(), "acme_1");
    }
}
