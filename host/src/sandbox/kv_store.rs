//! A tenant's persistent key-value store: one SQLite database
//! (`kv.sqlite3`) in the tenant's kv directory.
//!
//! SQLite gives what the store promises without hand-written file juggling:
//! every write is a transaction, durable when it returns (`synchronous =
//! FULL`); compare-and-swap is atomic against every other writer, in this
//! process or another (`realm-host run` beside a server) and across reloads;
//! counting keys for the limit is a query, not a directory scan. Keys are
//! data, never paths. The calls block (disk I/O): async callers run them on
//! blocking threads ([`super::host_kv`]).
//!
//! Stores written by earlier versions (one hex-named `.v` file per key) are
//! imported on open, then their files removed.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 120;
/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Most keys one tenant may store.
pub const MAX_KEYS: usize = 10_000;

/// The database's file name inside the kv directory.
const DATABASE: &str = "kv.sqlite3";
/// How long a write waits for another process's transaction to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// File names of the one-file-per-key format this store replaced.
const LEGACY_SUFFIX: &str = ".v";
const LEGACY_LOCK: &str = ".lock";

/// Why a kv operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The key or value is malformed or too large.
    #[error("{0}")]
    Invalid(String),
    /// The tenant has stored as many keys as it may.
    #[error("the tenant already stores {MAX_KEYS} keys, the most allowed; delete some first")]
    Full,
    /// The database failed.
    #[error("kv storage failed: {0}")]
    Storage(#[from] rusqlite::Error),
    /// The directory or a legacy file could not be read.
    #[error("kv storage failed: {0}")]
    Io(#[from] std::io::Error),
}

/// One tenant's key-value store.
#[derive(Debug)]
pub struct KvStore {
    db: Mutex<Connection>,
}

impl KvStore {
    /// Opens (creating if needed) the store kept in the directory `path`.
    pub fn open(path: &Path) -> Result<Self, KvError> {
        std::fs::create_dir_all(path)?;
        let mut db = Connection::open(path.join(DATABASE))?;
        db.busy_timeout(BUSY_TIMEOUT)?;
        // WAL: readers never wait for the writer; FULL: a write is on disk
        // when it returns.
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL) \
             WITHOUT ROWID;",
        )?;
        import_legacy(path, &mut db)?;
        Ok(KvStore { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value stored under `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        check_key(key)?;
        Ok(self
            .db()
            .query_row("SELECT value FROM kv WHERE key = ?1", [key], |row| {
                row.get(0)
            })
            .optional()?)
    }

    /// Stores `value` under `key`, replacing any previous value.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), KvError> {
        check_key(key)?;
        check_value(value)?;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        put(&tx, key, value)?;
        tx.commit()?;
        Ok(())
    }

    /// Sets `key` to `new` (removes it when `None`) if it holds `expected`
    /// now (`None`: absent); true if it did.
    pub fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, KvError> {
        check_key(key)?;
        if let Some(value) = new {
            check_value(value)?;
        }
        let mut db = self.db();
        // Immediate: the write lock is taken before the read, so no other
        // writer can slip in between the comparison and the swap.
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: Option<Vec<u8>> = tx
            .query_row("SELECT value FROM kv WHERE key = ?1", [key], |row| {
                row.get(0)
            })
            .optional()?;
        if current.as_deref() != expected {
            return Ok(false);
        }
        match new {
            Some(value) => put(&tx, key, value)?,
            None => {
                tx.execute("DELETE FROM kv WHERE key = ?1", [key])?;
            }
        }
        tx.commit()?;
        Ok(true)
    }

    /// Removes `key`; true if it was present.
    pub fn delete(&self, key: &str) -> Result<bool, KvError> {
        check_key(key)?;
        Ok(self.db().execute("DELETE FROM kv WHERE key = ?1", [key])? > 0)
    }

    /// All keys starting with `prefix`, sorted (by bytes).
    pub fn list_keys(&self, prefix: &str) -> Result<Vec<String>, KvError> {
        let db = self.db();
        // Keys sort by bytes: those with the prefix follow it, in one run.
        let mut query = db.prepare_cached("SELECT key FROM kv WHERE key >= ?1 ORDER BY key")?;
        let mut keys = Vec::new();
        for key in query.query_map([prefix], |row| row.get::<_, String>(0))? {
            let key = key?;
            if !key.starts_with(prefix) {
                break;
            }
            keys.push(key);
        }
        Ok(keys)
    }
}

/// Writes `key` inside `tx`, refusing a new key past [`MAX_KEYS`].
fn put(tx: &rusqlite::Transaction<'_>, key: &str, value: &[u8]) -> Result<(), KvError> {
    let exists = tx
        .query_row("SELECT 1 FROM kv WHERE key = ?1", [key], |_| Ok(()))
        .optional()?
        .is_some();
    if !exists {
        let count: i64 = tx.query_row("SELECT count(*) FROM kv", [], |row| row.get(0))?;
        if count as usize >= MAX_KEYS {
            return Err(KvError::Full);
        }
    }
    tx.execute(
        "INSERT INTO kv (key, value) VALUES (?1, ?2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

fn check_key(key: &str) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(KvError::Invalid("keys must not be empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KvError::Invalid(format!(
            "key of {} bytes exceeds the limit of {MAX_KEY_BYTES} bytes",
            key.len()
        )));
    }
    Ok(())
}

fn check_value(value: &[u8]) -> Result<(), KvError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(KvError::Invalid(format!(
            "value of {} bytes exceeds the limit of {MAX_VALUE_BYTES} bytes",
            value.len()
        )));
    }
    Ok(())
}

/// Moves the keys of the one-file-per-key format (hex-named `.v` files) in
/// `dir` into the database, in one transaction, then removes the files.
fn import_legacy(dir: &Path, db: &mut Connection) -> Result<(), KvError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let key = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(LEGACY_SUFFIX))
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| String::from_utf8(b).ok());
        if let Some(key) = key {
            files.push((key, path));
        }
    }
    if files.is_empty() {
        return Ok(());
    }
    let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for (key, path) in &files {
        let value = std::fs::read(path)?;
        tx.execute(
            "INSERT OR IGNORE INTO kv (key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
    }
    tx.commit()?;
    for (_, path) in &files {
        std::fs::remove_file(path)?;
    }
    let _ = std::fs::remove_file(dir.join(LEGACY_LOCK));
    tracing::info!(dir = %dir.display(), keys = files.len(), "imported a kv store into SQLite");
    Ok(())
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
        store.set("b", b"3").unwrap();
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
        assert_eq!(
            store.list_keys("").unwrap(),
            vec!["../../etc/passwd", "ab", "b"]
        );
        // Nothing but the database was written.
        for entry in std::fs::read_dir(tmp.path()).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(name.starts_with(DATABASE), "{name}");
        }
    }

    #[test]
    fn compare_and_swap_loses_no_concurrent_update() {
        let tmp = tempfile::tempdir().unwrap();
        // Two stores on one directory, as across a reload or two processes.
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
    fn rejects_bad_keys_and_values_and_too_many_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let store = KvStore::open(tmp.path()).unwrap();
        assert!(matches!(store.set("", b"x"), Err(KvError::Invalid(_))));
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(store.get(&long), Err(KvError::Invalid(_))));
        let huge = vec![0u8; MAX_VALUE_BYTES + 1];
        assert!(matches!(store.set("k", &huge), Err(KvError::Invalid(_))));
        {
            let mut db = store.db();
            let tx = db.transaction().unwrap();
            for i in 0..MAX_KEYS {
                tx.execute("INSERT INTO kv VALUES (?1, x'00')", [format!("k{i}")])
                    .unwrap();
            }
            tx.commit().unwrap();
        }
        assert!(matches!(store.set("one-more", b"x"), Err(KvError::Full)));
        let swap = store.compare_and_swap("one-more", None, Some(b"x"));
        assert!(matches!(swap, Err(KvError::Full)));
        // Replacing an existing key is no new key.
        store.set("k7", b"new").unwrap();
        assert_eq!(store.get("k7").unwrap().as_deref(), Some(&b"new"[..]));
    }

    #[test]
    fn a_store_of_one_file_per_key_is_imported() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(format!("{}.v", hex::encode("a"))), b"1").unwrap();
        std::fs::write(tmp.path().join(format!("{}.v", hex::encode("b/c"))), b"2").unwrap();
        std::fs::write(tmp.path().join(LEGACY_LOCK), b"").unwrap();
        let store = KvStore::open(tmp.path()).unwrap();
        assert_eq!(store.list_keys("").unwrap(), vec!["a", "b/c"]);
        assert_eq!(store.get("b/c").unwrap().as_deref(), Some(&b"2"[..]));
        for entry in std::fs::read_dir(tmp.path()).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(name.starts_with(DATABASE), "{name}");
        }
    }
}
