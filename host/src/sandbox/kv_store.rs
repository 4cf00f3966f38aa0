//! A tenant's persistent key-value store: one file per key inside the
//! tenant's kv directory, opened through cap-std so no key can name a path
//! outside it. Writes are atomic (write a temporary file, then rename).
//!
//! Writes hold an exclusive lock on the directory's `.lock` file, so a
//! compare-and-swap is atomic against every other write, from this process
//! or another (`realm-host run` beside a server), and across reloads (which
//! open the store anew).

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use cap_std::ambient_authority;
use cap_std::fs::Dir;

/// Longest key, in bytes (keys become hex file names, which must fit 255 bytes).
pub const MAX_KEY_BYTES: usize = 120;
/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Most keys one tenant may store.
pub const MAX_KEYS: usize = 10_000;

const VALUE_SUFFIX: &str = ".v";
const LOCK_FILE: &str = ".lock";

/// Why a kv operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The key or value is malformed or too large.
    #[error("{0}")]
    Invalid(String),
    /// The tenant has stored as many keys as it may.
    #[error("the tenant already stores {MAX_KEYS} keys, the most allowed; delete some first")]
    Full,
    /// The disk failed.
    #[error("kv storage failed: {0}")]
    Io(#[from] io::Error),
}

/// One tenant's key-value store.
#[derive(Debug)]
pub struct KvStore {
    dir: Dir,
    temp_counter: AtomicU64,
}

impl KvStore {
    /// Opens (creating if needed) the store kept in `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(path)?;
        let dir = Dir::open_ambient_dir(path, ambient_authority())?;
        Ok(KvStore {
            dir,
            temp_counter: AtomicU64::new(0),
        })
    }

    /// The value stored under `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        match self.dir.read(file_name(key)?) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores `value` under `key`, replacing any previous value.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), KvError> {
        let _lock = self.lock()?;
        self.write(key, value)
    }

    /// Sets `key` to `new` (removes it when `None`) if it holds `expected`
    /// now (`None`: absent); true if it did.
    pub fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, KvError> {
        let _lock = self.lock()?;
        if self.get(key)?.as_deref() != expected {
            return Ok(false);
        }
        match new {
            Some(value) => self.write(key, value)?,
            None => {
                self.remove(key)?;
            }
        }
        Ok(true)
    }

    /// Holds the store's write lock until dropped.
    fn lock(&self) -> Result<std::fs::File, KvError> {
        let file = self
            .dir
            .open_with(
                LOCK_FILE,
                cap_std::fs::OpenOptions::new().create(true).write(true),
            )?
            .into_std();
        file.lock()?;
        Ok(file)
    }

    fn write(&self, key: &str, value: &[u8]) -> Result<(), KvError> {
        let name = file_name(key)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(KvError::Invalid(format!(
                "value of {} bytes exceeds the limit of {MAX_VALUE_BYTES} bytes",
                value.len()
            )));
        }
        if !self.dir.exists(&name) && self.count()? >= MAX_KEYS {
            return Err(KvError::Full);
        }
        let temp = format!(
            ".tmp-{}-{}",
            std::process::id(),
            self.temp_counter.fetch_add(1, Ordering::Relaxed)
        );
        self.dir.write(&temp, value)?;
        if let Err(e) = self.dir.rename(&temp, &self.dir, &name) {
            let _ = self.dir.remove_file(&temp);
            return Err(e.into());
        }
        Ok(())
    }

    /// Removes `key`; true if it was present.
    pub fn delete(&self, key: &str) -> Result<bool, KvError> {
        let _lock = self.lock()?;
        self.remove(key)
    }

    fn remove(&self, key: &str) -> Result<bool, KvError> {
        match self.dir.remove_file(file_name(key)?) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// All keys starting with `prefix`, sorted.
    pub fn list_keys(&self, prefix: &str) -> Result<Vec<String>, KvError> {
        let mut keys = Vec::new();
        for entry in self.dir.entries()? {
            let name = entry?.file_name();
            if let Some(key) = name.to_str().and_then(key_of)
                && key.starts_with(prefix)
            {
                keys.push(key);
            }
        }
        keys.sort();
        Ok(keys)
    }

    fn count(&self) -> Result<usize, KvError> {
        let mut n = 0;
        for entry in self.dir.entries()? {
            if entry?
                .file_name()
                .to_str()
                .is_some_and(|n| n.ends_with(VALUE_SUFFIX))
            {
                n += 1;
            }
        }
        Ok(n)
    }
}

fn file_name(key: &str) -> Result<String, KvError> {
    if key.is_empty() {
        return Err(KvError::Invalid("keys must not be empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KvError::Invalid(format!(
            "key of {} bytes exceeds the limit of {MAX_KEY_BYTES} bytes",
            key.len()
        )));
    }
    Ok(format!("{}{VALUE_SUFFIX}", hex::encode(key)))
}

fn key_of(file_name: &str) -> Option<String> {
    let hex_part = file_name.strip_suffix(VALUE_SUFFIX)?;
    String::from_utf8(hex::decode(hex_part).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let store = KvStore::open(tmp.path()).unwrap();
        assert_eq!(store.get("a").unwrap(), None);
        store.set("a", b"1").unwrap();
        store.set("../../etc/passwd", b"not a path").unwrap();
        store.set("ab", b"2").unwrap();
        assert_eq!(store.get("a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.list_keys("a").unwrap(), vec!["a", "ab"]);
        drop(store);

        let store = KvStore::open(tmp.path()).unwrap();
        assert_eq!(
            store.get("../../etc/passwd").unwrap(),
            Some(b"not a path".to_vec())
        );
        assert!(store.delete("a").unwrap());
        assert!(!store.delete("a").unwrap());
        assert_eq!(store.list_keys("").unwrap(), vec!["../../etc/passwd", "ab"]);
        // Only hex-named files inside the directory were written.
        for entry in std::fs::read_dir(tmp.path()).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(name.ends_with(VALUE_SUFFIX) || name == LOCK_FILE, "{name}");
        }
    }

    #[test]
    fn compare_and_swap_loses_no_concurrent_update() {
        let tmp = tempfile::tempdir().unwrap();
        // Two stores on one directory, as across a reload.
        let stores = [
            std::sync::Arc::new(KvStore::open(tmp.path()).unwrap()),
            std::sync::Arc::new(KvStore::open(tmp.path()).unwrap()),
        ];
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = stores[t % 2].clone();
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        loop {
                            let old = store.get("n").unwrap();
                            let n: u64 = old
                                .as_deref()
                                .map_or(0, |b| std::str::from_utf8(b).unwrap().parse().unwrap());
                            let new = (n + 1).to_string();
                            if store
                                .compare_and_swap("n", old.as_deref(), Some(new.as_bytes()))
                                .unwrap()
                            {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(stores[0].get("n").unwrap().as_deref(), Some(&b"200"[..]));
        // Expecting absence fails while the key exists; `None` deletes.
        assert!(!stores[0].compare_and_swap("n", None, Some(b"0")).unwrap());
        assert!(stores[0].compare_and_swap("n", Some(b"200"), None).unwrap());
        assert_eq!(stores[0].get("n").unwrap(), None);
    }

    #[test]
    fn rejects_bad_keys_and_values() {
        let tmp = tempfile::tempdir().unwrap();
        let store = KvStore::open(tmp.path()).unwrap();
        assert!(matches!(store.set("", b"x"), Err(KvError::Invalid(_))));
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(store.get(&long), Err(KvError::Invalid(_))));
        let huge = vec![0u8; MAX_VALUE_BYTES + 1];
        assert!(matches!(store.set("k", &huge), Err(KvError::Invalid(_))));
    }
}
