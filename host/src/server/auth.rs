//! Finding the tenant behind a request's API key.

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};

use super::protocol::{ApiError, ErrorCode};
use super::state::AppState;

/// The key in an `Authorization: Bearer <key>` header.
pub fn bearer_key(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// The tenant `key` belongs to (Argon2 runs off the async threads).
pub async fn authenticate(state: &AppState, key: &str) -> Option<String> {
    let runtime = state.runtime();
    let key = key.to_string();
    tokio::task::spawn_blocking(move || runtime.keys.tenant_of(&key))
        .await
        .ok()
        .flatten()
}

/// The HTTP answer to a missing or wrong key, in the OpenAI error shape.
pub fn unauthorized() -> (StatusCode, Json<serde_json::Value>) {
    super::http::error_response(&ApiError::new(
        ErrorCode::Unauthorized,
        "missing or invalid API key (send `Authorization: Bearer <key>`)",
    ))
}
