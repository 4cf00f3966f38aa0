//! Tenant API keys and admin keys in the database: Argon2id hashes with a
//! name, creation, last use, expiry and revocation. A key's text is shown
//! once, when it is made, and never stored or logged.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::server::keys::{ApiKey, KeyError};

use super::audit::{self, Actor};
use super::db::{Db, DbError, Statement, Value};

pub use crate::server::keys::TENANT_PREFIX;

/// The prefix of admin keys.
pub const ADMIN_PREFIX: &str = "rka_";

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The key could not be made.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// No such tenant, principal or key.
    #[error("{0}")]
    NotFound(String),
}

/// A random 16-hex-digit id.
pub fn new_id() -> String {
    let mut bytes = [0u8; 8];
    // An id needs uniqueness, not secrecy; a failing OS generator falls
    // back to the clock (the unique constraint still guards it).
    if getrandom::fill(&mut bytes).is_err() {
        bytes = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64))
        .to_le_bytes();
    }
    hex::encode(bytes)
}

/// A key as listed (never its text or hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct KeyRecord {
    /// Its id.
    pub id: String,
    /// The tenant or admin principal it belongs to.
    pub owner: String,
    /// Its name.
    pub name: String,
    /// `config` (imported from realm.toml), `api` or `admin`.
    pub source: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, if it was used.
    pub last_used_at: Option<i64>,
    /// Unix seconds, if it expires.
    pub expires_at: Option<i64>,
    /// Unix seconds, if it was revoked.
    pub revoked_at: Option<i64>,
}

/// A key just made: its record and, this once, its text.
#[derive(Debug, Serialize)]
pub struct NewKey {
    /// The record.
    #[serde(flatten)]
    pub record: KeyRecord,
    /// The key itself: shown now, never again.
    pub key: String,
}

/// The statement inserting a tenant key.
pub fn insert_tenant_key(
    id: &str,
    tenant: &str,
    name: &str,
    hash: &str,
    source: &str,
    expires_at: Option<i64>,
) -> Statement {
    (
        "INSERT INTO api_keys (id, tenant_id, name, hash, source, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (hash) DO NOTHING",
        vec![
            id.into(),
            tenant.into(),
            name.into(),
            hash.into(),
            source.into(),
            super::now().into(),
            expires_at.into(),
        ],
    )
}

/// The statement revoking the tenant key with hash `hash`.
pub fn revoke_by_hash(hash: &str) -> Statement {
    (
        "UPDATE api_keys SET revoked_at = $1 WHERE hash = $2 AND revoked_at IS NULL",
        vec![super::now().into(), hash.into()],
    )
}

/// A stored key's hash and state, for synchronising realm.toml's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// Its Argon2id hash.
    pub hash: String,
    /// Imported from realm.toml (`config`) or made through the API.
    pub from_config: bool,
    /// Revoked.
    pub revoked: bool,
}

/// Every stored tenant key, by tenant.
pub async fn stored_by_tenant(db: &Db) -> Result<HashMap<String, Vec<StoredKey>>, DbError> {
    let rows = db
        .query(
            "SELECT tenant_id, hash, source, revoked_at FROM api_keys",
            vec![],
        )
        .await?;
    let mut out: HashMap<String, Vec<StoredKey>> = HashMap::new();
    for r in rows {
        out.entry(r[0].text()).or_default().push(StoredKey {
            hash: r[1].text(),
            from_config: r[2].text() == "config",
            revoked: r[3].opt_int().is_some(),
        });
    }
    Ok(out)
}

/// Hashes of the keys in force now (not revoked, not expired), by tenant.
pub async fn active_hashes(db: &Db) -> Result<HashMap<String, Vec<String>>, DbError> {
    let rows = db
        .query(
            "SELECT tenant_id, hash FROM api_keys WHERE revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > $1) ORDER BY created_at, id",
            vec![super::now().into()],
        )
        .await?;
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for r in rows {
        out.entry(r[0].text()).or_default().push(r[1].text());
    }
    Ok(out)
}

/// When the next key in force expires (unix seconds), if any does.
pub async fn next_expiry(db: &Db) -> Result<Option<i64>, DbError> {
    let now = Value::Int(super::now());
    let rows = db
        .query(
            "SELECT MIN(expires_at) FROM (\
             SELECT expires_at FROM api_keys WHERE revoked_at IS NULL AND expires_at > $1 \
             UNION ALL \
             SELECT expires_at FROM admin_keys WHERE revoked_at IS NULL AND expires_at > $1) AS e",
            vec![now],
        )
        .await?;
    Ok(rows.first().and_then(|r| r[0].opt_int()))
}

fn record(r: &[Value]) -> KeyRecord {
    KeyRecord {
        id: r[0].text(),
        owner: r[1].text(),
        name: r[2].text(),
        source: r[3].text(),
        created_at: r[4].int(),
        last_used_at: r[5].opt_int(),
        expires_at: r[6].opt_int(),
        revoked_at: r[7].opt_int(),
    }
}

/// `tenant`'s keys, newest first.
pub async fn list(db: &Db, tenant: &str) -> Result<Vec<KeyRecord>, DbError> {
    let rows = db
        .query(
            "SELECT id, tenant_id, name, source, created_at, last_used_at, expires_at, revoked_at \
             FROM api_keys WHERE tenant_id = $1 ORDER BY created_at DESC, id",
            vec![tenant.into()],
        )
        .await?;
    Ok(rows.iter().map(|r| record(r)).collect())
}

/// One of `tenant`'s keys.
pub async fn get(db: &Db, tenant: &str, id: &str) -> Result<Option<KeyRecord>, DbError> {
    Ok(list(db, tenant).await?.into_iter().find(|k| k.id == id))
}

/// A key and its hash, made off the async threads (Argon2 takes the CPU).
async fn make(prefix: &'static str, owner: &str) -> Result<(ApiKey, String), KeyStoreError> {
    let owner = owner.to_string();
    let made = tokio::task::spawn_blocking(move || {
        let key = ApiKey::generate_with(prefix, &owner)?;
        let hash = key.hash()?;
        Ok::<_, KeyError>((key, hash))
    })
    .await
    .map_err(|e| DbError::Other(format!("key generation stopped: {e}")))?;
    Ok(made?)
}

/// Makes a key for `tenant` named `name`, expiring at `expires_at`.
pub async fn create(
    db: &Db,
    actor: &Actor,
    tenant: &str,
    name: &str,
    expires_at: Option<i64>,
) -> Result<NewKey, KeyStoreError> {
    let detail = serde_json::json!({"name": name, "expires-at": expires_at});
    insert(
        db,
        actor,
        tenant,
        name,
        expires_at,
        Vec::new(),
        ("key.create", detail),
    )
    .await
}

/// Makes a key; `extra` statements (a rotation's end of the old key) and
/// the audit entry `(action, detail)` go in the same transaction.
async fn insert(
    db: &Db,
    actor: &Actor,
    tenant: &str,
    name: &str,
    expires_at: Option<i64>,
    extra: Vec<Statement>,
    (action, detail): (&str, serde_json::Value),
) -> Result<NewKey, KeyStoreError> {
    let (key, hash) = make(TENANT_PREFIX, tenant).await?;
    let id = new_id();
    let exists = db
        .query("SELECT 1 FROM tenants WHERE id = $1", vec![tenant.into()])
        .await?;
    if exists.is_empty() {
        return Err(KeyStoreError::NotFound(format!("no tenant `{tenant}`")));
    }
    let mut batch = vec![insert_tenant_key(
        &id, tenant, name, &hash, "api", expires_at,
    )];
    batch.extend(extra);
    batch.push(audit::record(
        actor,
        action,
        &format!("tenant/{tenant}/key/{id}"),
        detail,
    ));
    batch.push(super::bump_revision());
    db.batch(batch).await?;
    let record = get(db, tenant, &id)
        .await?
        .ok_or_else(|| KeyStoreError::NotFound(format!("key {id} vanished")))?;
    Ok(NewKey {
        record,
        key: key.as_str().to_string(),
    })
}

/// Revokes `tenant`'s key `id` now; false if it was not in force.
pub async fn revoke(db: &Db, actor: &Actor, tenant: &str, id: &str) -> Result<bool, DbError> {
    let in_force = get(db, tenant, id)
        .await?
        .is_some_and(|k| k.revoked_at.is_none());
    if !in_force {
        return Ok(false);
    }
    db.batch(vec![
        (
            "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND tenant_id = $3",
            vec![super::now().into(), id.into(), tenant.into()],
        ),
        audit::record(
            actor,
            "key.revoke",
            &format!("tenant/{tenant}/key/{id}"),
            serde_json::json!({}),
        ),
        super::bump_revision(),
    ])
    .await?;
    Ok(true)
}

/// Replaces `tenant`'s key `id` with a new one of the same name; the old
/// one keeps working for `grace` seconds (0: revoked at once).
pub async fn rotate(
    db: &Db,
    actor: &Actor,
    tenant: &str,
    id: &str,
    grace: i64,
) -> Result<NewKey, KeyStoreError> {
    let old = get(db, tenant, id)
        .await?
        .filter(|k| k.revoked_at.is_none())
        .ok_or_else(|| {
            KeyStoreError::NotFound(format!("tenant `{tenant}` has no key {id} in force"))
        })?;
    let until = super::now() + grace.max(0);
    let expire_old: Statement = if grace <= 0 {
        (
            "UPDATE api_keys SET revoked_at = $1 WHERE id = $2",
            vec![super::now().into(), id.into()],
        )
    } else {
        (
            "UPDATE api_keys SET expires_at = $1 WHERE id = $2 AND (expires_at IS NULL OR expires_at > $1)",
            vec![until.into(), id.into()],
        )
    };
    let detail = serde_json::json!({"name": old.name, "replaces": id, "old-key-until": until});
    insert(
        db,
        actor,
        tenant,
        &old.name,
        None,
        vec![expire_old],
        ("key.rotate", detail),
    )
    .await
}

/// An admin principal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Principal {
    /// Its name (as in its keys: `rka_<name>_…`).
    pub id: String,
    /// `admin` or `viewer`.
    pub role: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Its keys.
    pub keys: Vec<KeyRecord>,
}

/// Every admin principal with its keys.
pub async fn principals(db: &Db) -> Result<Vec<Principal>, DbError> {
    let rows = db
        .query(
            "SELECT id, role, created_at FROM admin_principals WHERE disabled_at IS NULL ORDER BY id",
            vec![],
        )
        .await?;
    let keys = db
        .query(
            "SELECT id, principal_id, name, 'admin', created_at, last_used_at, expires_at, revoked_at \
             FROM admin_keys ORDER BY created_at DESC, id",
            vec![],
        )
        .await?;
    let mut by_owner: BTreeMap<String, Vec<KeyRecord>> = BTreeMap::new();
    for k in &keys {
        let k = record(k);
        by_owner.entry(k.owner.clone()).or_default().push(k);
    }
    Ok(rows
        .into_iter()
        .map(|r| Principal {
            id: r[0].text(),
            role: r[1].text(),
            created_at: r[2].int(),
            keys: by_owner.remove(&r[0].text()).unwrap_or_default(),
        })
        .collect())
}

/// Admin key hashes in force and each principal's role.
pub async fn admin_ring(
    db: &Db,
) -> Result<(BTreeMap<String, Vec<String>>, HashMap<String, String>), DbError> {
    let rows = db
        .query(
            "SELECT p.id, p.role, k.hash FROM admin_principals p JOIN admin_keys k ON k.principal_id = p.id \
             WHERE p.disabled_at IS NULL AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > $1)",
            vec![super::now().into()],
        )
        .await?;
    let mut hashes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut roles = HashMap::new();
    for r in rows {
        hashes.entry(r[0].text()).or_default().push(r[2].text());
        roles.insert(r[0].text(), r[1].text());
    }
    Ok((hashes, roles))
}

/// Creates admin principal `id` with `role` if it does not exist (a
/// different role for an existing one is refused), and makes it a key.
pub async fn create_admin_key(
    db: &Db,
    actor: &Actor,
    id: &str,
    role: &str,
    name: &str,
) -> Result<NewKey, KeyStoreError> {
    let (key, hash) = make(ADMIN_PREFIX, id).await?;
    let existing = db
        .query(
            "SELECT role FROM admin_principals WHERE id = $1 AND disabled_at IS NULL",
            vec![id.into()],
        )
        .await?;
    if let Some(r) = existing.first()
        && r[0].text() != role
    {
        return Err(KeyStoreError::NotFound(format!(
            "admin `{id}` exists with role `{}`",
            r[0].text()
        )));
    }
    let key_id = new_id();
    let now = super::now();
    db.batch(vec![
        (
            "INSERT INTO admin_principals (id, role, created_at) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
            vec![id.into(), role.into(), now.into()],
        ),
        (
            "INSERT INTO admin_keys (id, principal_id, name, hash, created_at) VALUES ($1, $2, $3, $4, $5)",
            vec![key_id.as_str().into(), id.into(), name.into(), hash.into(), now.into()],
        ),
        audit::record(
            actor,
            "admin-key.create",
            &format!("admin/{id}/key/{key_id}"),
            serde_json::json!({"role": role, "name": name}),
        ),
        super::bump_revision(),
    ])
    .await?;
    Ok(NewKey {
        record: KeyRecord {
            id: key_id,
            owner: id.to_string(),
            name: name.to_string(),
            source: "admin".into(),
            created_at: now,
            last_used_at: None,
            expires_at: None,
            revoked_at: None,
        },
        key: key.as_str().to_string(),
    })
}

/// Revokes admin key `key_id` of `principal`; false if it was not in force.
pub async fn revoke_admin_key(
    db: &Db,
    actor: &Actor,
    principal: &str,
    key_id: &str,
) -> Result<bool, DbError> {
    let in_force = db
        .query(
            "SELECT 1 FROM admin_keys WHERE id = $1 AND principal_id = $2 AND revoked_at IS NULL",
            vec![key_id.into(), principal.into()],
        )
        .await?;
    if in_force.is_empty() {
        return Ok(false);
    }
    db.batch(vec![
        (
            "UPDATE admin_keys SET revoked_at = $1 WHERE id = $2",
            vec![super::now().into(), key_id.into()],
        ),
        audit::record(
            actor,
            "admin-key.revoke",
            &format!("admin/{principal}/key/{key_id}"),
            serde_json::json!({}),
        ),
        super::bump_revision(),
    ])
    .await?;
    Ok(true)
}
