//! The admin API's handlers. Each change: check the caller's role, check
//! the result with the configuration's own validator, write the change and
//! its audit entry in one transaction, reload, answer.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::control::keys::{self as stored_keys, KeyStoreError};
use crate::control::tenants::{self as stored, Change, ChangeError, TenantRecord, TenantSpec};
use crate::control::{DbError, audit, ledger};

use super::auth::Principal;
use super::{AdminApi, AdminError};

type Answer = Result<Response, AdminError>;

fn answer(result: Answer) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

fn db_error(e: DbError) -> AdminError {
    match e {
        DbError::Conflict(m) => AdminError::new(StatusCode::CONFLICT, "conflict", m),
        e => {
            tracing::error!("admin API: {e}");
            AdminError::new(StatusCode::SERVICE_UNAVAILABLE, "database", e.to_string())
        }
    }
}

fn key_error(e: KeyStoreError) -> AdminError {
    match e {
        KeyStoreError::NotFound(m) => AdminError::new(StatusCode::NOT_FOUND, "not_found", m),
        KeyStoreError::Db(e) => db_error(e),
        KeyStoreError::Key(e) => {
            AdminError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        }
    }
}

fn bad(message: impl Into<String>) -> AdminError {
    AdminError::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, AdminError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid request body: {e}")))
}

/// Puts the database's state into service; a failure is the answer.
async fn refresh(api: &AdminApi) -> Result<(), AdminError> {
    api.state.refresh().await.map_err(|e| {
        tracing::error!("admin change saved but not served: {e}");
        AdminError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "reload_failed",
            format!("the change was saved but could not be put into service: {e}"),
        )
    })
}

async fn tenant_record(api: &AdminApi, id: &str) -> Result<TenantRecord, AdminError> {
    stored::load(&api.control.db, id)
        .await
        .map_err(db_error)?
        .ok_or_else(|| {
            AdminError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no tenant `{id}`"),
            )
        })
}

fn change_error(e: ChangeError) -> AdminError {
    let (status, code) = match &e {
        ChangeError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        ChangeError::Exists(_) => (StatusCode::CONFLICT, "conflict"),
        ChangeError::ManagedByConfig(_) => (StatusCode::CONFLICT, "managed_by_config"),
        ChangeError::Malformed(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        ChangeError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
        ChangeError::Db(DbError::Conflict(_)) => (StatusCode::CONFLICT, "conflict"),
        ChangeError::Db(_) => (StatusCode::SERVICE_UNAVAILABLE, "database"),
    };
    AdminError::new(status, code, e.to_string())
}

/// Applies `change` to tenant `id`, checked against every tenant served
/// now, then serves the result.
async fn change(
    api: &AdminApi,
    who: &Principal,
    id: &str,
    change: Change,
) -> Result<Option<TenantRecord>, AdminError> {
    let served = api.state.runtime().config.tenants.clone();
    let check = |spec: Option<&TenantSpec>| {
        let mut tenants = served;
        match spec {
            Some(spec) => {
                let keys = tenants
                    .get(id)
                    .map(|t| t.api_keys.clone())
                    .unwrap_or_default();
                tenants.insert(id.to_string(), spec.to_config(keys));
            }
            None => {
                tenants.remove(id);
            }
        }
        api.state.check_tenants(tenants)
    };
    let record = stored::apply(&api.control.db, &who.actor(), id, change, check)
        .await
        .map_err(change_error)?;
    refresh(api).await?;
    Ok(record)
}

/// `GET /admin/api/whoami`.
pub async fn whoami(who: Principal) -> Response {
    Json(json!({"name": who.name, "role": who.role})).into_response()
}

fn tenant_json(api: &AdminApi, record: &TenantRecord) -> Value {
    let runtime = api.state.runtime();
    let mut value = serde_json::to_value(record).unwrap_or_default();
    let served = runtime.tenants.get(&record.id);
    value["used-today"] = json!(served.map_or(0, |t| t.limiter.used_today()));
    value["served"] = json!(served.is_some());
    value
}

/// `GET /admin/api/tenants`.
pub async fn list_tenants(State(api): State<Arc<AdminApi>>, _who: Principal) -> Response {
    answer(
        async {
            let all = stored::load_all(&api.control.db).await.map_err(db_error)?;
            let list: Vec<Value> = all.values().map(|r| tenant_json(&api, r)).collect();
            Ok(Json(json!({"tenants": list})).into_response())
        }
        .await,
    )
}

/// `GET /admin/api/tenants/{id}`.
pub async fn get_tenant(
    State(api): State<Arc<AdminApi>>,
    _who: Principal,
    Path(id): Path<String>,
) -> Response {
    answer(
        async {
            let record = tenant_record(&api, &id).await?;
            Ok(Json(tenant_json(&api, &record)).into_response())
        }
        .await,
    )
}

/// `POST /admin/api/tenants {"id", …spec}`.
pub async fn create_tenant(
    State(api): State<Arc<AdminApi>>,
    who: Principal,
    body: Bytes,
) -> Response {
    answer(
        async {
            who.require_admin()?;
            let mut fields: serde_json::Map<String, Value> = json_body(&body)?;
            let Some(Value::String(id)) = fields.remove("id") else {
                return Err(bad("`id` (a string) is required"));
            };
            let spec: TenantSpec = serde_json::from_value(Value::Object(fields))
                .map_err(|e| bad(format!("invalid tenant: {e}")))?;
            let record = change(&api, &who, &id, Change::Create(spec)).await?;
            let body = record.map(|r| tenant_json(&api, &r)).unwrap_or_default();
            Ok((StatusCode::CREATED, Json(body)).into_response())
        }
        .await,
    )
}

/// `PUT /admin/api/tenants/{id}`: replaces its grants and limits.
pub async fn put_tenant(
    State(api): State<Arc<AdminApi>>,
    who: Principal,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    answer(
        async {
            who.require_admin()?;
            let spec: TenantSpec =
                serde_json::from_slice(&body).map_err(|e| bad(format!("invalid tenant: {e}")))?;
            let record = change(&api, &who, &id, Change::Replace(spec)).await?;
            Ok(Json(record.map(|r| tenant_json(&api, &r)).unwrap_or_default()).into_response())
        }
        .await,
    )
}

/// `PATCH /admin/api/tenants/{id}`: changes the fields sent (`models`,
/// `adapters`, `default-adapter`, `rate`, `limits`, `weight`), each whole.
pub async fn patch_tenant(
    State(api): State<Arc<AdminApi>>,
    who: Principal,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    answer(
        async {
            who.require_admin()?;
            let fields: serde_json::Map<String, Value> = json_body(&body)?;
            let record = change(&api, &who, &id, Change::Patch(fields)).await?;
            Ok(Json(record.map(|r| tenant_json(&api, &r)).unwrap_or_default()).into_response())
        }
        .await,
    )
}

/// `DELETE /admin/api/tenants/{id}`: its keys go; its usage stays.
pub async fn delete_tenant(
    State(api): State<Arc<AdminApi>>,
    who: Principal,
    Path(id): Path<String>,
) -> Response {
    answer(
        async {
            who.require_admin()?;
            change(&api, &who, &id, Change::Delete).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

/// `GET /admin/api/tenants/{id}/keys`.
pub async fn list_keys(
    State(api): State<Arc<AdminApi>>,
    _who: Principal,
    Path(id): Path<String>,
) -> Response {
    answer(
        async {
            tenant_record(&api, &id).await?;
            let keys = stored_keys::list(&api.control.db, &id)
                .await
                .map_err(db_error)?;
            Ok(Json(json!({"keys": keys})).into_response())
        }
        .await,
    )
}

/// The longest `expires-in` or `grace`: 100 years.
const LONGEST: u64 = 100 * 365 * 86_400;

fn duration(text: &str, what: &str) -> Result<i64, AdminError> {
    let d = humantime::parse_duration(text).map_err(|e| {
        bad(format!(
            "`{what}`: `{text}` is not a duration ({e}); use e.g. \"30d\" or \"1h\""
        ))
    })?;
    if d.as_secs() > LONGEST {
        return Err(bad(format!("`{what}`: at most 100 years")));
    }
    Ok(d.as_secs() as i64)
}

/// `POST /admin/api/tenants/{id}/keys {"name", "expires-in"?}`: the key
/// is in the answer, once.
pub async fn create_key(
    State(api): State<Arc<AdminApi>>,
    who: Principal,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct NewKey {
        name: String,
        expires_in: Option<String>,
    }
    answer(
        async {
            who.require_admin()?;
            let request: NewKey = json_body(&body)?;
            let name = request.name.trim();
            if name.is_empty() || name.len() > 100 {
                return Err(bad("`name` must be 1 to 100 characters"));
            }
            let expires = match &request.expires_in {
                Some(text) => Some(crate::control::now() + duration(text, "expires-in")?),
                None => None,
            };
            let key = stored_keys::create(&api.control.db, &who.actor(), &id, name, expires)
                .await
                .map_err(key_error)?;
            refresh(&api).await?;
            Ok((StatusCode::CREATED, Json(key)).into_response())
        }
        .await,
    )
}

/// `DELETE /admin/api/tenants/{id}/keys/{key}`: revoked at once; its open
/// WebSocket connections close.
pub async fn revoke_key(
    State(api): State<Arc<AdminApi>>,
    who: Principal,
    Path((id, key)): Path<(String, String)>,
) -> Response {
    answer(
        async {
            who.require_admin()?;
            let revoked = stored_keys::revoke(&api.control.db, &who.actor(), &id, &key)
                .await
                .map_err(db_error)?;
            if !revoked {
                return Err(AdminError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("tenant `{id}` has no key {key} in force"),
                ));
            }
            refresh(&api).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

/// `POST /admin/api/tenants/{id}/keys/{key}/rotate {"grace"?}`: a new key
/// of the same name; the old one works for `grace` more (default 0s).
pub async fn rotate_key(
    State(api): State<Arc<AdminApi>>,
    who: Principal,
    Path((id, key)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Rotate {
        grace: Option<String>,
    }
    answer(
        async {
            who.require_admin()?;
            let request: Rotate = if body.is_empty() {
                Rotate::default()
            } else {
                json_body(&body)?
            };
            let grace = match &request.grace {
                Some(text) => duration(text, "grace")?,
                None => 0,
            };
            let new = stored_keys::rotate(&api.control.db, &who.actor(), &id, &key, grace)
                .await
                .map_err(key_error)?;
            refresh(&api).await?;
            Ok((StatusCode::CREATED, Json(new)).into_response())
        }
        .await,
    )
}

/// The usage query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    tenant: Option<String>,
    model: Option<String>,
    /// Unix seconds [default: 24 hours ago].
    from: Option<i64>,
    /// Unix seconds, exclusive [default: now].
    to: Option<i64>,
    /// `minute`, `hour` (default) or `day`.
    bucket: Option<String>,
}

/// `GET /admin/api/usage?tenant&model&from&to&bucket`: the ledger (with
/// what is not yet written), summed per tenant, model, adapter and bucket.
pub async fn usage(
    State(api): State<Arc<AdminApi>>,
    _who: Principal,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    answer(async {
        let Query(q) = query.map_err(|e| bad(e.body_text()))?;
        let minutes = match q.bucket.as_deref().unwrap_or("hour") {
            "minute" => 1,
            "hour" => 60,
            "day" => 1440,
            other => return Err(bad(format!("`bucket` {other:?}: use minute, hour or day"))),
        };
        let now = crate::control::now();
        let to = q.to.unwrap_or(now + 60);
        let from = q.from.unwrap_or(now - 86_400);
        if from >= to {
            return Err(bad("`from` must be before `to`"));
        }
        let (from_min, to_min) = (from.div_euclid(60), (to + 59).div_euclid(60));
        let tenant = q.tenant.clone().unwrap_or_default();
        let model = q.model.clone().unwrap_or_default();
        let rows = api
            .control
            .db
            .query(
                "SELECT tenant_id, model, adapter, minute, prompt_tokens, completion_tokens, requests, errors \
                 FROM usage WHERE minute >= $1 AND minute < $2 AND ($3 = '' OR tenant_id = $3) \
                 AND ($4 = '' OR model = $4)",
                vec![from_min.into(), to_min.into(), tenant.as_str().into(), model.as_str().into()],
            )
            .await
            .map_err(db_error)?;
        let mut sums: BTreeMap<(i64, String, String, String), ledger::Counts> = BTreeMap::new();
        let mut add = |t: String, m: String, a: String, minute: i64, c: ledger::Counts| {
            let bucket = minute.div_euclid(minutes) * minutes * 60;
            let s = sums.entry((bucket, t, m, a)).or_default();
            s.prompt += c.prompt;
            s.completion += c.completion;
            s.requests += c.requests;
            s.errors += c.errors;
        };
        for r in rows {
            let counts = ledger::Counts {
                prompt: r[4].int(),
                completion: r[5].int(),
                requests: r[6].int(),
                errors: r[7].int(),
            };
            add(r[0].text(), r[1].text(), r[2].text(), r[3].int(), counts);
        }
        for (k, c) in api.control.ledger.pending() {
            let wanted = (from_min..to_min).contains(&k.minute)
                && (tenant.is_empty() || k.tenant == tenant)
                && (model.is_empty() || k.model == model);
            if wanted {
                add(k.tenant, k.model, k.adapter, k.minute, c);
            }
        }
        let mut total = ledger::Counts::default();
        let list: Vec<Value> = sums
            .into_iter()
            .map(|((start, t, m, a), c)| {
                total.prompt += c.prompt;
                total.completion += c.completion;
                total.requests += c.requests;
                total.errors += c.errors;
                json!({"start": start, "tenant": t, "model": m, "adapter": a,
                       "prompt-tokens": c.prompt, "completion-tokens": c.completion,
                       "requests": c.requests, "errors": c.errors})
            })
            .collect();
        Ok(Json(json!({
            "from": from, "to": to, "bucket-seconds": minutes * 60, "rows": list,
            "total": {"prompt-tokens": total.prompt, "completion-tokens": total.completion,
                      "requests": total.requests, "errors": total.errors},
        }))
        .into_response())
    }
    .await)
}

/// `GET /admin/api/live`: per tenant and per model, now.
pub async fn live(State(api): State<Arc<AdminApi>>, _who: Principal) -> Response {
    let state = &api.state;
    let runtime = state.runtime();
    let mut tenants: Vec<Value> = runtime
        .tenants
        .values()
        .map(|t| {
            let snapshot = state.live.snapshot(&t.id);
            let in_flight = (state.metrics.queue_depth)
                .get_metric_with_label_values(&[t.id.as_str()])
                .map_or(0, |g| g.get());
            json!({
                "id": t.id,
                "tokens-per-second": snapshot.tokens_per_second,
                "ttft-p50": snapshot.ttft_p50,
                "ttft-p99": snapshot.ttft_p99,
                "streams": t.limiter.streams(),
                "in-flight": in_flight,
                "used-today": t.limiter.used_today(),
                "tokens-per-day": t.limiter.config().tokens_per_day,
            })
        })
        .collect();
    tenants.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    let adapters = state.hub.adapters();
    Json(json!({
        "tenants": tenants,
        "models": state.hub.status(),
        "adapters": {"count": adapters.len(), "bytes": adapters.bytes()},
        "draining": state.is_draining(),
    }))
    .into_response()
}

/// The audit query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    before: Option<i64>,
    limit: Option<i64>,
}

/// `GET /admin/api/audit?before&limit`: newest first.
pub async fn audit(
    State(api): State<Arc<AdminApi>>,
    _who: Principal,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    answer(
        async {
            let Query(q) = query.map_err(|e| bad(e.body_text()))?;
            let entries = audit::list(&api.control.db, q.before, q.limit.unwrap_or(100))
                .await
                .map_err(db_error)?;
            Ok(Json(json!({"entries": entries})).into_response())
        }
        .await,
    )
}

/// `GET /admin/api/admins`.
pub async fn list_admins(State(api): State<Arc<AdminApi>>, _who: Principal) -> Response {
    answer(
        async {
            let admins = stored_keys::principals(&api.control.db)
                .await
                .map_err(db_error)?;
            Ok(Json(json!({"admins": admins})).into_response())
        }
        .await,
    )
}

/// `POST /admin/api/admins {"id", "role", "key-name"?}`: a principal (made
/// if new) and a key for it, shown once.
pub async fn create_admin(
    State(api): State<Arc<AdminApi>>,
    who: Principal,
    body: Bytes,
) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct NewAdmin {
        id: String,
        role: String,
        key_name: Option<String>,
    }
    answer(
        async {
            who.require_admin()?;
            let request: NewAdmin = json_body(&body)?;
            crate::sandbox::Tenant::check_id(&request.id)
                .map_err(|_| bad("`id`: use 1-64 letters, digits, `-` or `_`"))?;
            if !matches!(request.role.as_str(), "admin" | "viewer") {
                return Err(bad("`role` must be `admin` or `viewer`"));
            }
            let name = request.key_name.as_deref().unwrap_or("api");
            let key = stored_keys::create_admin_key(
                &api.control.db,
                &who.actor(),
                &request.id,
                &request.role,
                name,
            )
            .await
            .map_err(|e| match e {
                KeyStoreError::NotFound(m) => AdminError::new(StatusCode::CONFLICT, "conflict", m),
                e => key_error(e),
            })?;
            api.auth.reload(&api.control).await.map_err(db_error)?;
            Ok((StatusCode::CREATED, Json(key)).into_response())
        }
        .await,
    )
}

/// `DELETE /admin/api/admins/{id}/keys/{key}`.
pub async fn revoke_admin_key(
    State(api): State<Arc<AdminApi>>,
    who: Principal,
    Path((id, key)): Path<(String, String)>,
) -> Response {
    answer(
        async {
            who.require_admin()?;
            let revoked = stored_keys::revoke_admin_key(&api.control.db, &who.actor(), &id, &key)
                .await
                .map_err(db_error)?;
            if !revoked {
                return Err(AdminError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("admin `{id}` has no key {key} in force"),
                ));
            }
            api.auth.reload(&api.control).await.map_err(db_error)?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

/// `POST /admin/api/drain`: stops taking requests, lets running ones
/// finish, then exits (as SIGTERM does).
pub async fn drain(State(api): State<Arc<AdminApi>>, who: Principal) -> Response {
    answer(
        async {
            who.require_admin()?;
            api.control
                .db
                .batch(vec![audit::record(
                    &who.actor(),
                    "server.drain",
                    "server",
                    json!({}),
                )])
                .await
                .map_err(db_error)?;
            api.state.drain();
            Ok((StatusCode::ACCEPTED, Json(json!({"draining": true}))).into_response())
        }
        .await,
    )
}
