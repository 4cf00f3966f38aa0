//! The control plane's state: tenants, their grants, limits and keys, admin
//! principals, the usage ledger and the audit log, in a database (SQLite in
//! `$REALM_HOME` by default, PostgreSQL for fleets).
//!
//! Without a `[database]` table none of this runs and `realm.toml` alone
//! says who the tenants are. With one, `realm.toml`'s tenants are written
//! to the database at each start and reload (the file wins for the tenants
//! it names), the admin API adds and changes others, and the server's
//! running configuration is the file plus the database.

pub mod audit;
pub mod db;
pub mod keys;
pub mod ledger;
pub mod migrate;
pub mod tenants;

use std::sync::Arc;

pub use audit::Actor;
pub use db::{Db, DbError};
pub use ledger::Ledger;

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The database and the usage not yet written to it.
#[derive(Debug)]
pub struct ControlPlane {
    /// The database.
    pub db: Db,
    /// Usage charged and not yet flushed.
    pub ledger: Arc<Ledger>,
}

impl ControlPlane {
    /// Opens the database at `url` and brings its schema up to date.
    pub async fn open(url: &str) -> Result<Self, DbError> {
        let db = Db::open(url).await?;
        let applied = migrate::migrate(&db).await?;
        if !applied.is_empty() {
            tracing::info!(?applied, database = ?db.kind(), "applied schema migrations");
        }
        Ok(ControlPlane {
            db,
            ledger: Arc::new(Ledger::default()),
        })
    }

    /// The revision counter: it moves with every change to tenants, grants,
    /// limits or keys.
    pub async fn revision(&self) -> Result<i64, DbError> {
        let rows = (self.db)
            .query("SELECT value FROM revision WHERE id = 1", vec![])
            .await?;
        Ok(rows.first().map_or(0, |r| r[0].int()))
    }

    /// Writes the pending usage (see [`Ledger::flush`]).
    pub async fn flush(&self) -> Result<usize, DbError> {
        self.ledger.flush(&self.db).await
    }

    /// Tokens `tenant` used today (UTC): written plus pending.
    pub async fn used_today(&self) -> Result<std::collections::HashMap<String, u64>, DbError> {
        let start = ledger::today_start();
        let mut used = ledger::written_since(&self.db, start).await?;
        for (key, counts) in self.ledger.pending() {
            if key.minute >= start {
                *used.entry(key.tenant).or_default() += counts.tokens().max(0) as u64;
            }
        }
        Ok(used)
    }
}

/// The statement that moves the revision counter; part of every batch that
/// changes what hosts serve.
pub fn bump_revision() -> db::Statement {
    ("UPDATE revision SET value = value + 1 WHERE id = 1", vec![])
}
