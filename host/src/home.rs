//! Where Realm keeps its state: `$REALM_HOME`, by default `~/.realm`.

use std::path::{Path, PathBuf};

/// The root of Realm's on-disk state.
#[derive(Debug, Clone)]
pub struct RealmHome {
    root: PathBuf,
}

impl RealmHome {
    /// `explicit` if given, else `$REALM_HOME`, else `~/.realm`.
    pub fn resolve(explicit: Option<PathBuf>) -> anyhow::Result<Self> {
        let root = match explicit.or_else(|| std::env::var_os("REALM_HOME").map(PathBuf::from)) {
            Some(root) => root,
            None => match std::env::var_os("HOME") {
                Some(home) => Path::new(&home).join(".realm"),
                None => {
                    anyhow::bail!("cannot find a home for Realm's data: set REALM_HOME or HOME")
                }
            },
        };
        Ok(RealmHome { root })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Per-tenant data (`tenants/<id>/files`, `tenants/<id>/kv`).
    pub fn tenants(&self) -> PathBuf {
        self.root.join("tenants")
    }

    /// The model store.
    pub fn models(&self) -> PathBuf {
        self.root.join("models")
    }

    /// The operator socket of `realm-host serve` (`realm-host ps` reads it).
    pub fn admin_socket(&self) -> PathBuf {
        self.root.join("run").join("admin.sock")
    }

    /// Compiled components, keyed by content hash.
    pub fn component_cache(&self) -> PathBuf {
        self.root.join("cache").join("components")
    }
}
