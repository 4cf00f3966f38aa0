//! The audit log: who changed what, from where. Every change is written in
//! the same transaction as the change itself, so one cannot land without the
//! other; the database refuses updates and deletes of its rows.

use serde::Serialize;

use super::db::{Db, DbError, Statement, Value};

/// Who makes a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The admin principal, or `realm.toml` / `cli` for changes made by the
    /// configuration file or the command line.
    pub name: String,
    /// Its role (`admin`, `viewer`, or `system`).
    pub role: String,
    /// Its address, or "".
    pub peer: String,
}

impl Actor {
    /// The configuration file, synchronised at start and reload.
    pub fn config_file() -> Actor {
        Actor {
            name: "realm.toml".into(),
            role: "system".into(),
            peer: String::new(),
        }
    }

    /// The command line on this machine, writing the database directly.
    pub fn cli() -> Actor {
        Actor {
            name: "cli".into(),
            role: "system".into(),
            peer: String::new(),
        }
    }
}

/// One audit entry.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    /// Its sequence number.
    pub id: i64,
    /// Unix seconds.
    pub at: i64,
    /// Who.
    pub actor: String,
    /// In which role.
    pub role: String,
    /// What (`tenant.create`, `key.revoke`, …).
    pub action: String,
    /// On what (`tenant/acme`, `tenant/acme/key/…`).
    pub target: String,
    /// The change's details (never a key or a prompt).
    pub detail: serde_json::Value,
    /// From where.
    pub peer: String,
}

/// The statement recording `action` on `target` by `actor`.
pub fn record(actor: &Actor, action: &str, target: &str, detail: serde_json::Value) -> Statement {
    (
        "INSERT INTO audit_log (at, actor, role, action, target, detail, peer) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        vec![
            super::now().into(),
            actor.name.as_str().into(),
            actor.role.as_str().into(),
            action.into(),
            target.into(),
            detail.to_string().into(),
            actor.peer.as_str().into(),
        ],
    )
}

/// Entries older than `before` (an id; `None` for the newest), newest
/// first, at most `limit`.
pub async fn list(db: &Db, before: Option<i64>, limit: i64) -> Result<Vec<AuditEntry>, DbError> {
    let rows = db
        .query(
            "SELECT id, at, actor, role, action, target, detail, peer FROM audit_log \
             WHERE id < $1 ORDER BY id DESC LIMIT $2",
            vec![
                Value::Int(before.unwrap_or(i64::MAX)),
                Value::Int(limit.clamp(1, 1000)),
            ],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| AuditEntry {
            id: r[0].int(),
            at: r[1].int(),
            actor: r[2].text(),
            role: r[3].text(),
            action: r[4].text(),
            target: r[5].text(),
            detail: serde_json::from_str(&r[6].text()).unwrap_or(serde_json::Value::Null),
            peer: r[7].text(),
        })
        .collect())
}

/// How many entries the log holds.
pub async fn count(db: &Db) -> Result<i64, DbError> {
    let rows = db.query("SELECT COUNT(*) FROM audit_log", vec![]).await?;
    Ok(rows.first().map_or(0, |r| r[0].int()))
}
