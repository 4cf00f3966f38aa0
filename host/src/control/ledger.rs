//! The usage ledger: every token a tenant is charged, by model, adapter and
//! minute, written to the database.
//!
//! Charges arrive where the rate limiter settles a generation (so the ledger
//! and the quota count exactly the same tokens) and add to rows kept in
//! memory; a flusher writes them every `flush-interval` in one transaction
//! of upserts that only ever add. A flush that fails keeps its rows for the
//! next one, so nothing is lost while the database is away; a crash loses at
//! most one interval of usage, never a committed row.

use std::collections::HashMap;
use std::sync::Mutex;

use super::db::{Db, DbError, Statement, Value};

/// A ledger row's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UsageKey {
    /// The tenant.
    pub tenant: String,
    /// The model's `[models]` name ("" for errors before a model was chosen).
    pub model: String,
    /// The adapter's name, or "".
    pub adapter: String,
    /// Unix minute.
    pub minute: i64,
}

/// A ledger row's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Prompt tokens.
    pub prompt: i64,
    /// Generated tokens.
    pub completion: i64,
    /// Requests that ran a model.
    pub requests: i64,
    /// Requests refused or failed.
    pub errors: i64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.prompt += other.prompt;
        self.completion += other.completion;
        self.requests += other.requests;
        self.errors += other.errors;
    }

    /// Prompt plus generated tokens.
    pub fn tokens(&self) -> i64 {
        self.prompt + self.completion
    }
}

/// Usage not yet written, and the key uses not yet recorded.
#[derive(Debug, Default)]
pub struct Ledger {
    pending: Mutex<HashMap<UsageKey, Counts>>,
    /// Key hash → last use (unix seconds), for `api_keys.last_used_at`.
    touched: Mutex<HashMap<std::sync::Arc<str>, i64>>,
}

/// The unix minute now.
pub fn minute_now() -> i64 {
    super::now() / 60
}

/// The first minute of today (UTC).
pub fn today_start() -> i64 {
    minute_now() / 1440 * 1440
}

/// `MODEL:ADAPTER` (or `MODEL`) as its two parts.
fn split_served(served: &str) -> (&str, &str) {
    served.split_once(':').unwrap_or((served, ""))
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UsageKey, Counts>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `counts` to `tenant`'s row for `served` (`MODEL` or
    /// `MODEL:ADAPTER`) this minute.
    pub fn record(&self, tenant: &str, served: &str, counts: Counts) {
        let (model, adapter) = split_served(served);
        let key = UsageKey {
            tenant: tenant.to_string(),
            model: model.to_string(),
            adapter: adapter.to_string(),
            minute: minute_now(),
        };
        self.lock().entry(key).or_default().add(counts);
    }

    /// Notes that the key with hash `phc` was used now.
    pub fn touch(&self, phc: &std::sync::Arc<str>) {
        let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        touched.insert(phc.clone(), super::now());
    }

    /// Rows recorded but not yet written.
    pub fn pending(&self) -> HashMap<UsageKey, Counts> {
        self.lock().clone()
    }

    /// Tokens `tenant` used since `minute` that are not yet written.
    pub fn pending_tokens(&self, tenant: &str, since: i64) -> u64 {
        (self.lock().iter())
            .filter(|(k, _)| k.tenant == tenant && k.minute >= since)
            .map(|(_, c)| c.tokens().max(0) as u64)
            .sum()
    }

    /// Writes the recorded rows; on failure they stay for the next flush.
    /// Returns the rows written.
    ///
    /// The rows are copied, not taken: until the write commits they are
    /// still pending, so readers ([`Ledger::pending`]) never miss them, and
    /// a flush abandoned half-way (its future dropped) loses nothing. Once
    /// committed, exactly the written counts are taken off (counters only
    /// grow, so what was recorded meanwhile stays).
    pub async fn flush(&self, db: &Db) -> Result<usize, DbError> {
        let rows = self.lock().clone();
        let touched = self
            .touched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if rows.is_empty() && touched.is_empty() {
            return Ok(0);
        }
        let mut batch: Vec<Statement> = Vec::with_capacity(rows.len() + 2 * touched.len());
        for (k, c) in &rows {
            batch.push((
                "INSERT INTO usage (tenant_id, model, adapter, minute, prompt_tokens, completion_tokens, requests, errors) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (tenant_id, model, adapter, minute) DO UPDATE SET \
                 prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens, \
                 completion_tokens = usage.completion_tokens + excluded.completion_tokens, \
                 requests = usage.requests + excluded.requests, \
                 errors = usage.errors + excluded.errors",
                vec![
                    k.tenant.as_str().into(),
                    k.model.as_str().into(),
                    k.adapter.as_str().into(),
                    k.minute.into(),
                    c.prompt.into(),
                    c.completion.into(),
                    c.requests.into(),
                    c.errors.into(),
                ],
            ));
        }
        for (phc, at) in &touched {
            batch.push((
                "UPDATE api_keys SET last_used_at = $1 WHERE hash = $2",
                vec![Value::Int(*at), Value::Text(phc.to_string())],
            ));
            batch.push((
                "UPDATE admin_keys SET last_used_at = $1 WHERE hash = $2",
                vec![Value::Int(*at), Value::Text(phc.to_string())],
            ));
        }
        db.batch(batch).await?;
        let mut pending = self.lock();
        for (k, written) in &rows {
            if let Some(c) = pending.get_mut(k) {
                c.prompt -= written.prompt;
                c.completion -= written.completion;
                c.requests -= written.requests;
                c.errors -= written.errors;
                if *c == Counts::default() {
                    pending.remove(k);
                }
            }
        }
        drop(pending);
        let mut t = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        for (phc, at) in touched {
            if t.get(&phc) == Some(&at) {
                t.remove(&phc);
            }
        }
        Ok(rows.len())
    }
}

/// Tokens each tenant used since `minute`, as written in the database.
pub async fn written_since(db: &Db, minute: i64) -> Result<HashMap<String, u64>, DbError> {
    let rows = db
        .query(
            "SELECT tenant_id, CAST(SUM(prompt_tokens + completion_tokens) AS BIGINT) \
             FROM usage WHERE minute >= $1 GROUP BY tenant_id",
            vec![minute.into()],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r[0].text(), r[1].int().max(0) as u64))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn flushes_add_and_a_failed_flush_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path().join("c.db").to_str().unwrap())
            .await
            .unwrap();
        let ledger = Ledger::default();
        let c = Counts {
            prompt: 3,
            completion: 4,
            requests: 1,
            errors: 0,
        };
        ledger.record("acme", "small:support", c);
        // No schema yet: the flush fails and keeps the row.
        assert!(ledger.flush(&db).await.is_err());
        assert_eq!(ledger.pending_tokens("acme", 0), 7);
        super::super::migrate::migrate(&db).await.unwrap();
        ledger.record("acme", "small:support", c);
        assert_eq!(ledger.flush(&db).await.unwrap(), 1);
        ledger.record("acme", "small:support", c);
        ledger.flush(&db).await.unwrap();
        assert_eq!(ledger.pending_tokens("acme", 0), 0);
        let written = written_since(&db, 0).await.unwrap();
        assert_eq!(written["acme"], 21);
        let row = db
            .query(
                "SELECT model, adapter, requests FROM usage WHERE tenant_id = $1",
                vec!["acme".into()],
            )
            .await
            .unwrap();
        assert_eq!(row[0][0].text(), "small");
        assert_eq!(row[0][1].text(), "support");
        // The ledger is append-only: the database refuses to shrink it.
        let err = db
            .batch(vec![("UPDATE usage SET prompt_tokens = 0", vec![])])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("only grow"), "{err}");
        assert!(db.batch(vec![("DELETE FROM usage", vec![])]).await.is_err());
    }
}
