//! The admin API and dashboard: their own listener (`[admin] listen`,
//! 127.0.0.1:9090 by default), never the public port.
//!
//! - `/admin/api/…`: JSON, authenticated by an admin key (`Authorization:
//!   Bearer rka_…`) or the dashboard's session cookie; role `viewer` may
//!   read, `admin` may also change. Described by `/admin/openapi.json`.
//! - `/admin/`: the dashboard, a page and two files embedded in the binary
//!   (plain JavaScript: nothing to build, nothing fetched from elsewhere).
//!
//! Every change is written with its audit entry in one transaction, then the
//! server reloads from the database before answering: a change is in force
//! when its response arrives, without SIGHUP.

mod auth;
mod routes;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};

use crate::control::ControlPlane;

use super::AppState;
use super::state::SetupError;

pub use auth::Role;

/// The OpenAPI description of the admin API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The dashboard's page, script and style.
const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

/// The dashboard's content security policy: its own script and style only,
/// no inline code, no other origin, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The largest admin request body.
const MAX_BODY: usize = 64 * 1024;

/// The admin API's state.
pub struct AdminApi {
    state: Arc<AppState>,
    control: Arc<ControlPlane>,
    auth: auth::Auth,
}

impl AdminApi {
    /// The admin API over `state`, with the admin keys in `control`.
    pub async fn new(
        state: Arc<AppState>,
        control: Arc<ControlPlane>,
    ) -> Result<Arc<Self>, SetupError> {
        let auth = auth::Auth::load(&control)
            .await
            .map_err(|e| SetupError::new("the admin keys", e))?;
        let mut reloads = state.reloads();
        let api = Arc::new(AdminApi {
            state,
            control,
            auth,
        });
        // The server reloads when the database's revision moves (admin keys
        // made by the CLI or another host move it too): re-read the admin
        // keys with it.
        let weak = Arc::downgrade(&api);
        tokio::spawn(async move {
            while reloads.changed().await.is_ok() {
                let Some(api) = weak.upgrade() else { break };
                if let Err(e) = api.auth.reload(&api.control).await {
                    tracing::warn!("cannot re-read the admin keys: {e}");
                }
            }
        });
        Ok(api)
    }
}

/// The admin router.
pub fn router(api: Arc<AdminApi>) -> Router {
    Router::new()
        .route(
            "/admin",
            get(|| async { axum::response::Redirect::permanent("/admin/") }),
        )
        .route(
            "/admin/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/admin/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/admin/assets/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route(
            "/admin/openapi.json",
            get(|| async { asset("application/json", OPENAPI) }),
        )
        .route("/admin/session", post(auth::sign_in).delete(auth::sign_out))
        .route("/admin/api/whoami", get(routes::whoami))
        .route(
            "/admin/api/tenants",
            get(routes::list_tenants).post(routes::create_tenant),
        )
        .route(
            "/admin/api/tenants/{id}",
            get(routes::get_tenant)
                .put(routes::put_tenant)
                .patch(routes::patch_tenant)
                .delete(routes::delete_tenant),
        )
        .route(
            "/admin/api/tenants/{id}/keys",
            get(routes::list_keys).post(routes::create_key),
        )
        .route(
            "/admin/api/tenants/{id}/keys/{key}",
            delete(routes::revoke_key),
        )
        .route(
            "/admin/api/tenants/{id}/keys/{key}/rotate",
            post(routes::rotate_key),
        )
        .route("/admin/api/usage", get(routes::usage))
        .route("/admin/api/live", get(routes::live))
        .route("/admin/api/audit", get(routes::audit))
        .route(
            "/admin/api/admins",
            get(routes::list_admins).post(routes::create_admin),
        )
        .route(
            "/admin/api/admins/{id}/keys/{key}",
            delete(routes::revoke_admin_key),
        )
        .route("/admin/api/drain", post(routes::drain))
        .fallback(|| async {
            AdminError::new(StatusCode::NOT_FOUND, "not_found", "no such admin route")
        })
        // Admin bodies are small JSON; the sign-in's is read before any key
        // is checked, so it is bounded well below axum's 2 MB default.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(api)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Headers on every admin response: the CSP, no sniffing, no referrer, no
/// caching of answers that may hold keys.
async fn secure_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// An admin API error, answered as `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct AdminError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Seconds to wait, sent as `Retry-After`.
    retry_after: Option<u64>,
}

impl AdminError {
    /// An error with `status`, a stable `code` and a message to act on.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        AdminError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
