//! Tenants in the database: their grants and limits, read into the same
//! [`TenantConfig`] realm.toml gives, and `realm.toml`'s own tenants
//! written there at each start and reload.
//!
//! **Which wins.** A tenant named in realm.toml is the file's: its models,
//! adapters, pipelines, component, limits and rates are written to the
//! database as they are in the file (`source = 'config'`), replacing what
//! the database held, and the admin API refuses to change or delete it. Its
//! `api-keys` are imported as keys named `realm.toml #N`; keys made through
//! the API for it are kept. A config tenant removed from the file is deleted
//! from the database. Tenants made through the API (`source = 'api'`)
//! belong to the database; the file never touches them.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::sandbox::LimitOverrides;
use crate::server::{RateConfig, TenantConfig};

use super::audit::{self, Actor};
use super::db::{Db, DbError, Statement, Value};
use super::keys;

/// What the admin API may set of a tenant: its grants and limits.
/// Pipelines and components name files and build commands on the host, so
/// they are set in realm.toml only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TenantSpec {
    /// Models (by their `[models]` name) the tenant may use.
    #[serde(default)]
    pub models: Vec<String>,
    /// Adapters (by their `[adapters]` name) the tenant may use.
    #[serde(default)]
    pub adapters: Vec<String>,
    /// The adapter its requests use when they name none.
    #[serde(default)]
    pub default_adapter: Option<String>,
    /// Request and token rates, and the daily quota.
    #[serde(default)]
    pub rate: RateConfig,
    /// Sandbox limits of its guest calls.
    #[serde(default)]
    pub limits: LimitOverrides,
    /// Its share of a model's batch slots.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

impl Default for TenantSpec {
    fn default() -> Self {
        TenantSpec {
            models: Vec::new(),
            adapters: Vec::new(),
            default_adapter: None,
            rate: RateConfig::default(),
            limits: LimitOverrides::default(),
            weight: 1,
        }
    }
}

impl TenantSpec {
    /// The spec of a realm.toml tenant.
    pub fn of(config: &TenantConfig) -> Self {
        TenantSpec {
            models: config.models.clone(),
            adapters: config.adapters.clone(),
            default_adapter: config.default_adapter.clone(),
            rate: config.rate.clone(),
            limits: config.limits.clone(),
            weight: config.weight,
        }
    }

    /// A tenant configuration with these grants and limits and `api_keys`.
    pub fn to_config(&self, api_keys: Vec<String>) -> TenantConfig {
        TenantConfig {
            api_keys,
            models: self.models.clone(),
            adapters: self.adapters.clone(),
            default_adapter: self.default_adapter.clone(),
            pipelines: BTreeMap::new(),
            component: None,
            limits: self.limits.clone(),
            rate: self.rate.clone(),
            weight: self.weight,
            data_dir: None,
        }
    }
}

/// A tenant as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TenantRecord {
    /// Its id.
    pub id: String,
    /// `config` (realm.toml's) or `api`.
    pub source: String,
    /// Grants and limits.
    #[serde(flatten)]
    pub spec: TenantSpec,
    /// Its pipelines and the files they run (realm.toml tenants only).
    pub pipelines: BTreeMap<String, String>,
    /// Its component (realm.toml tenants only).
    pub component: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

/// Every tenant, by id.
pub async fn load_all(db: &Db) -> Result<BTreeMap<String, TenantRecord>, DbError> {
    let mut tenants: BTreeMap<String, TenantRecord> = BTreeMap::new();
    let rows = db
        .query(
            "SELECT t.id, t.source, t.weight, t.default_adapter, t.created_at, t.updated_at, \
             l.requests_per_minute, l.tokens_per_minute, l.concurrent_streams, l.tokens_per_day, l.sandbox \
             FROM tenants t LEFT JOIN limits l ON l.tenant_id = t.id ORDER BY t.id",
            vec![],
        )
        .await?;
    for r in rows {
        let rate = RateConfig {
            requests_per_minute: r[6].opt_int().map(|n| n.clamp(0, u32::MAX as i64) as u32),
            tokens_per_minute: r[7].opt_int().map(|n| n.clamp(0, u32::MAX as i64) as u32),
            concurrent_streams: r[8].opt_int().map(|n| n.clamp(0, u32::MAX as i64) as u32),
            tokens_per_day: r[9].opt_int().map(|n| n.max(0) as u64),
        };
        let limits: LimitOverrides = match r[10].opt_text() {
            Some(json) => serde_json::from_str(&json).map_err(|e| {
                DbError::Other(format!("tenant `{}` sandbox limits: {e}", r[0].text()))
            })?,
            None => LimitOverrides::default(),
        };
        let record = TenantRecord {
            id: r[0].text(),
            source: r[1].text(),
            spec: TenantSpec {
                models: Vec::new(),
                adapters: Vec::new(),
                default_adapter: r[3].opt_text(),
                rate,
                limits,
                weight: r[2].int().clamp(0, u32::MAX as i64) as u32,
            },
            pipelines: BTreeMap::new(),
            component: None,
            created_at: r[4].int(),
            updated_at: r[5].int(),
        };
        tenants.insert(record.id.clone(), record);
    }
    let grants = db
        .query(
            "SELECT tenant_id, kind, name, target FROM grants ORDER BY tenant_id, kind, name",
            vec![],
        )
        .await?;
    for g in grants {
        let Some(t) = tenants.get_mut(&g[0].text()) else {
            continue;
        };
        match g[1].text().as_str() {
            "model" => t.spec.models.push(g[2].text()),
            "adapter" => t.spec.adapters.push(g[2].text()),
            "pipeline" => {
                t.pipelines.insert(g[2].text(), g[3].text());
            }
            "component" => t.component = Some(g[3].text()),
            _ => {}
        }
    }
    Ok(tenants)
}

/// One tenant, if it exists.
pub async fn load(db: &Db, id: &str) -> Result<Option<TenantRecord>, DbError> {
    Ok(load_all(db).await?.remove(id))
}

/// The statements that write tenant `id` as `spec` (creating or replacing
/// it), with realm.toml's pipelines and component for a config tenant.
pub fn write(
    id: &str,
    source: &str,
    spec: &TenantSpec,
    file: Option<&TenantConfig>,
) -> Vec<Statement> {
    let mut out: Vec<Statement> = vec![(
        "INSERT INTO tenants (id, source, weight, default_adapter, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (id) DO UPDATE SET \
         source = excluded.source, weight = excluded.weight, \
         default_adapter = excluded.default_adapter, updated_at = excluded.updated_at",
        row_values(id, source, spec),
    )];
    out.extend(dependents(id, spec, file));
    out
}

fn row_values(id: &str, source: &str, spec: &TenantSpec) -> Vec<Value> {
    vec![
        id.into(),
        source.into(),
        Value::Int(spec.weight as i64),
        spec.default_adapter.clone().into(),
        super::now().into(),
    ]
}

/// The statements writing tenant `id`'s grants and limits (its row exists).
fn dependents(id: &str, spec: &TenantSpec, file: Option<&TenantConfig>) -> Vec<Statement> {
    let mut out: Vec<Statement> =
        vec![("DELETE FROM grants WHERE tenant_id = $1", vec![id.into()])];
    let grant = |kind: &str, name: &str, target: &str| -> Statement {
        (
            "INSERT INTO grants (tenant_id, kind, name, target) VALUES ($1, $2, $3, $4)",
            vec![id.into(), kind.into(), name.into(), target.into()],
        )
    };
    let models: BTreeSet<&String> = spec.models.iter().collect();
    let adapters: BTreeSet<&String> = spec.adapters.iter().collect();
    out.extend(models.into_iter().map(|m| grant("model", m, "")));
    out.extend(adapters.into_iter().map(|a| grant("adapter", a, "")));
    if let Some(file) = file {
        for (name, path) in &file.pipelines {
            out.push(grant("pipeline", name, &path.display().to_string()));
        }
        if let Some(component) = &file.component {
            let c = &component.0;
            let target = match &c.build {
                Some(_) => format!("{} (built from {})", c.wasm.display(), c.dir.display()),
                None => c.wasm.display().to_string(),
            };
            out.push(grant("component", "component", &target));
        }
    }
    let opt = |v: Option<u32>| Value::from(v.map(i64::from));
    out.push((
        "INSERT INTO limits (tenant_id, requests_per_minute, tokens_per_minute, concurrent_streams, tokens_per_day, sandbox) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id) DO UPDATE SET \
         requests_per_minute = excluded.requests_per_minute, tokens_per_minute = excluded.tokens_per_minute, \
         concurrent_streams = excluded.concurrent_streams, tokens_per_day = excluded.tokens_per_day, \
         sandbox = excluded.sandbox",
        vec![
            id.into(),
            opt(spec.rate.requests_per_minute),
            opt(spec.rate.tokens_per_minute),
            opt(spec.rate.concurrent_streams),
            Value::from(spec.rate.tokens_per_day.map(|n| n.min(i64::MAX as u64) as i64)),
            serde_json::to_string(&spec.limits)
                .unwrap_or_else(|_| "{}".into())
                .into(),
        ],
    ));
    out
}

/// The statement deleting tenant `id` (its grants, limits and keys go with
/// it; its usage stays in the ledger).
pub fn delete(id: &str) -> Statement {
    ("DELETE FROM tenants WHERE id = $1", vec![id.into()])
}

/// Writes realm.toml's `tenants` to the database (see the module's "which
/// wins"), auditing each change as `realm.toml`. Returns the changes made.
pub async fn sync_config(
    db: &Db,
    tenants: &BTreeMap<String, TenantConfig>,
) -> Result<usize, DbError> {
    let actor = Actor::config_file();
    let held = load_all(db).await?;
    let stored_keys = keys::stored_by_tenant(db).await?;
    let mut batch: Vec<Statement> = Vec::new();
    let mut changes = 0;
    for (id, config) in tenants {
        let spec = TenantSpec::of(config);
        let pipelines: BTreeMap<String, String> = (config.pipelines.iter())
            .map(|(n, p)| (n.clone(), p.display().to_string()))
            .collect();
        let unchanged = held.get(id).is_some_and(|h| {
            let mut h_spec = h.spec.clone();
            let mut spec = spec.clone();
            for s in [&mut h_spec, &mut spec] {
                s.models.sort();
                s.models.dedup();
                s.adapters.sort();
                s.adapters.dedup();
            }
            h.source == "config"
                && h_spec == spec
                && h.pipelines == pipelines
                && h.component.is_some() == config.component.is_some()
        });
        if !unchanged {
            batch.extend(write(id, "config", &spec, Some(config)));
            let action = match held.get(id) {
                None => "tenant.create",
                Some(h) if h.source == "api" => "tenant.adopt",
                Some(_) => "tenant.update",
            };
            batch.push(audit::record(
                &actor,
                action,
                &format!("tenant/{id}"),
                serde_json::to_value(&spec).unwrap_or_default(),
            ));
            changes += 1;
        }
        let stored = stored_keys.get(id.as_str()).map_or(&[][..], Vec::as_slice);
        for (i, hash) in config.api_keys.iter().enumerate() {
            match stored.iter().find(|k| k.hash == *hash) {
                // Revoked through the API: it stays revoked (take it out of
                // realm.toml, or make a new one).
                Some(k) if k.revoked => tracing::warn!(
                    tenant = %id,
                    "realm.toml's key #{} was revoked; it stays refused",
                    i + 1
                ),
                Some(_) => {}
                None => {
                    let key_id = keys::new_id();
                    let name = format!("realm.toml #{}", i + 1);
                    batch.push(keys::insert_tenant_key(
                        &key_id, id, &name, hash, "config", None,
                    ));
                    batch.push(audit::record(
                        &actor,
                        "key.import",
                        &format!("tenant/{id}/key/{key_id}"),
                        serde_json::json!({"name": name}),
                    ));
                    changes += 1;
                }
            }
        }
        for k in stored {
            if k.from_config && !k.revoked && !config.api_keys.contains(&k.hash) {
                batch.push(keys::revoke_by_hash(&k.hash));
                batch.push(audit::record(
                    &actor,
                    "key.revoke",
                    &format!("tenant/{id}/key"),
                    serde_json::json!({"reason": "removed from realm.toml"}),
                ));
                changes += 1;
            }
        }
    }
    for (id, held) in &held {
        if held.source == "config" && !tenants.contains_key(id) {
            batch.push(delete(id));
            batch.push(audit::record(
                &actor,
                "tenant.delete",
                &format!("tenant/{id}"),
                serde_json::json!({"reason": "removed from realm.toml"}),
            ));
            changes += 1;
        }
    }
    if changes > 0 {
        batch.push(super::bump_revision());
        db.batch(batch).await?;
    }
    Ok(changes)
}

/// A change to a tenant, as the admin API and CLI ask for it.
#[derive(Debug, Clone)]
pub enum Change {
    /// Make it with this spec.
    Create(TenantSpec),
    /// Replace its grants and limits.
    Replace(TenantSpec),
    /// Replace the fields given (`models`, `rate`, …), each whole.
    Patch(serde_json::Map<String, serde_json::Value>),
    /// Delete it (its keys go; its usage stays).
    Delete,
}

/// Why a tenant change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// No such tenant.
    #[error("no tenant `{0}`")]
    NotFound(String),
    /// It exists already.
    #[error("tenant `{0}` exists")]
    Exists(String),
    /// It is realm.toml's.
    #[error(
        "tenant `{0}` is defined in realm.toml, which wins: change it there and reload (SIGHUP); its keys may be managed here"
    )]
    ManagedByConfig(String),
    /// The spec does not parse.
    #[error("invalid tenant: {0}")]
    Malformed(String),
    /// The result would be an invalid configuration.
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Applies `change` to tenant `id` as `actor`: the result is checked with
/// `check` (the configuration's validator over every tenant served, given
/// the tenant's new spec or `None` when deleted), then written with its
/// audit entry in one transaction. Returns the tenant as it is now.
pub async fn apply(
    db: &Db,
    actor: &Actor,
    id: &str,
    change: Change,
    check: impl FnOnce(Option<&TenantSpec>) -> Vec<String>,
) -> Result<Option<TenantRecord>, ChangeError> {
    let held = load(db, id).await?;
    let (spec, action) = match (change, &held) {
        (Change::Create(_), Some(_)) => return Err(ChangeError::Exists(id.into())),
        (Change::Create(spec), None) => (Some(spec), "tenant.create"),
        (_, None) => return Err(ChangeError::NotFound(id.into())),
        (_, Some(h)) if h.source == "config" => {
            return Err(ChangeError::ManagedByConfig(id.into()));
        }
        (Change::Replace(spec), Some(_)) => (Some(spec), "tenant.update"),
        (Change::Patch(fields), Some(h)) => {
            let mut value = serde_json::to_value(&h.spec).unwrap_or_default();
            for (k, v) in fields {
                value[k] = v;
            }
            let spec =
                serde_json::from_value(value).map_err(|e| ChangeError::Malformed(e.to_string()))?;
            (Some(spec), "tenant.update")
        }
        (Change::Delete, Some(_)) => (None, "tenant.delete"),
    };
    let problems = check(spec.as_ref());
    if !problems.is_empty() {
        return Err(ChangeError::Invalid(problems));
    }
    // The row is written first and guards the rest, so a change racing
    // another (two creates, a patch and a delete, realm.toml taking the
    // tenant over) fails rather than undoing it.
    let detail = (spec.as_ref()).map_or(serde_json::json!({}), |s| {
        serde_json::to_value(s).unwrap_or_default()
    });
    let mut rest = match &spec {
        Some(spec) => dependents(id, spec, None),
        None => Vec::new(),
    };
    rest.push(audit::record(
        actor,
        action,
        &format!("tenant/{id}"),
        detail,
    ));
    rest.push(super::bump_revision());
    let guard: Statement = match (&spec, action) {
        (Some(spec), "tenant.create") => (
            "INSERT INTO tenants (id, source, weight, default_adapter, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5)",
            row_values(id, "api", spec),
        ),
        (Some(spec), _) => (
            "UPDATE tenants SET weight = $3, default_adapter = $4, updated_at = $5 \
             WHERE id = $1 AND source = $2",
            row_values(id, "api", spec),
        ),
        (None, _) => (
            "DELETE FROM tenants WHERE id = $1 AND source = 'api'",
            vec![id.into()],
        ),
    };
    let applied = db.batch_if(guard, rest).await.map_err(|e| match e {
        DbError::Conflict(_) if action == "tenant.create" => ChangeError::Exists(id.into()),
        e => ChangeError::Db(e),
    })?;
    if !applied {
        return Err(ChangeError::Db(DbError::Conflict(format!(
            "tenant `{id}` changed while this change was made; read it again and retry"
        ))));
    }
    Ok(load(db, id).await?)
}

/// The tenants to serve: realm.toml's as [`sync_config`] leaves them in the
/// database (the file's grants; its keys less those the database revoked
/// or the file dropped, plus those it does not hold yet) and the
/// database's own; the keys in force only (not revoked, not expired). It
/// reads the database without writing, so a file can be checked and put
/// into service before it is written there.
pub async fn serving(
    db: &Db,
    file: &BTreeMap<String, TenantConfig>,
) -> Result<BTreeMap<String, TenantConfig>, DbError> {
    let held = load_all(db).await?;
    let stored = keys::stored_by_tenant(db).await?;
    let mut active = keys::active_hashes(db).await?;
    let mut out = BTreeMap::new();
    for (id, config) in file {
        let known = stored.get(id).map_or(&[][..], Vec::as_slice);
        let mut hashes: Vec<String> = (active.remove(id).unwrap_or_default().into_iter())
            .filter(|h| {
                let dropped = known
                    .iter()
                    .any(|k| k.hash == *h && k.from_config && !config.api_keys.contains(h));
                !dropped
            })
            .collect();
        for hash in &config.api_keys {
            if !known.iter().any(|k| k.hash == *hash) && !hashes.contains(hash) {
                hashes.push(hash.clone());
            }
        }
        out.insert(
            id.clone(),
            TenantConfig {
                api_keys: hashes,
                ..config.clone()
            },
        );
    }
    for (id, record) in held {
        // A config tenant the file no longer names is deleted by the write.
        if file.contains_key(&id) || record.source == "config" {
            continue;
        }
        let hashes = active.remove(&id).unwrap_or_default();
        out.insert(id, record.spec.to_config(hashes));
    }
    Ok(out)
}
