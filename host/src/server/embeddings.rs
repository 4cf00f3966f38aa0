//! `POST /v1/embeddings`: OpenAI's embeddings route over the engine's
//! sentence embeddings (the mean of the final hidden states, L2-normalized).
//! An input's tokens count against the tenant's token rate and daily quota
//! like a prompt's, and the call holds one of its stream slots while it
//! computes.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::http::{fail, read_body, tenant_of};
use super::listen::Peer;
use super::protocol::{ApiError, ErrorCode};
use super::service::{Defaults, permitted_model};
use super::state::AppState;

/// Most inputs in one request.
pub const MAX_INPUTS: usize = 256;

/// The fields of OpenAI's embeddings request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingsRequest {
    model: String,
    /// One string or a list of them (token-id inputs are not taken).
    input: Value,
    /// `float` (the default); `base64` is not supported.
    encoding_format: Option<String>,
    /// Must equal the model's embedding length when given.
    dimensions: Option<usize>,
    /// The end user, for the caller's own tracking: accepted, not used.
    #[serde(default, rename = "user")]
    _user: Option<serde::de::IgnoredAny>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidInput, message)
}

/// The request's texts, checked.
fn inputs(input: Value) -> Result<Vec<String>, ApiError> {
    let texts = match input {
        Value::String(text) => vec![text],
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(text) => Ok(text),
                _ => Err(invalid(
                    "`input` must be a string or a list of strings (token ids are not taken)",
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(invalid("`input` must be a string or a list of strings")),
    };
    if texts.is_empty() || texts.len() > MAX_INPUTS {
        return Err(invalid(format!(
            "`input` has {} texts; send 1 to {MAX_INPUTS}",
            texts.len()
        )));
    }
    if texts.iter().any(String::is_empty) {
        return Err(invalid("`input` holds an empty string"));
    }
    Ok(texts)
}

/// `POST /v1/embeddings`.
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let tenant = match tenant_of(&state, &headers, peer).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    match embed(&state, &tenant, body).await {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => fail(&state, &tenant.id, e),
    }
}

async fn embed(
    state: &AppState,
    tenant: &super::state::TenantRuntime,
    body: axum::body::Body,
) -> Result<Value, ApiError> {
    state.accepting()?;
    let body = read_body(state, tenant, body).await?;
    let request: EmbeddingsRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("invalid request body: {e}")))?;
    let named = (request.model.as_str(), None);
    let (served, model) = permitted_model(&state.runtime(), tenant, named, Defaults::Ignore)?;
    if let Some(format) = request.encoding_format.filter(|f| f != "float") {
        return Err(invalid(format!(
            "`encoding_format` {format:?} is not supported; use \"float\""
        )));
    }
    let length = model.info().embedding_length;
    if let Some(dimensions) = request.dimensions.filter(|&d| d != length) {
        return Err(invalid(format!(
            "this model's embeddings have {length} dimensions, not {dimensions}"
        )));
    }
    let texts = inputs(request.input)?;
    state.admit(tenant, "embeddings").await?;
    let context = model.info().context_length;
    let most = model.max_prompt_bytes();
    if let Some(long) = texts.iter().find(|t| t.len() > most) {
        return Err(invalid(format!(
            "an input has {} bytes, more than the model's context of {context} tokens can hold",
            long.len()
        )));
    }
    let counter = model.clone();
    let counted = texts.clone();
    let tokens: Vec<usize> = tokio::task::spawn_blocking(move || {
        counted
            .iter()
            .map(|t| counter.prompt_tokens(t).len())
            .collect()
    })
    .await
    .map_err(|e| ApiError::new(ErrorCode::Internal, format!("tokenizing failed: {e}")))?;
    if let Some(n) = tokens.iter().find(|&&n| n > context) {
        return Err(invalid(format!(
            "an input has {n} tokens; the model's context holds {context}"
        )));
    }
    let total: usize = tokens.iter().sum();
    let reservation = (tenant.limiter)
        .admit_generation(&served, total as u64)
        .await?;
    let vectors = tokio::task::spawn_blocking(move || {
        texts
            .iter()
            .map(|t| model.embed(t))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError::new(ErrorCode::Internal, format!("embedding failed: {e}")))?;
    reservation.settle(total as u64, 0);
    if let Some(fleet) = state.fleet() {
        fleet.settled().await;
    }
    let vectors = vectors.map_err(|e| invalid(e.to_string()))?;
    let data: Vec<Value> = (vectors.into_iter().enumerate())
        .map(|(index, embedding)| json!({"object": "embedding", "index": index, "embedding": embedding}))
        .collect();
    Ok(json!({
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }))
}
