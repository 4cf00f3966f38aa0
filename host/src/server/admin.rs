//! The operator's endpoint: a Unix socket, not a port, so only local users
//! the file system lets in can reach it (its folder is the owner's alone).
//! It answers `GET /ps` (the models in memory, for `realm-host ps`) and
//! `GET /metrics` (every series, whatever `public-metrics` says). No tenant
//! key opens it, and nothing on it is per tenant.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::inference::residency::ModelStatus;

use super::AppState;

/// What `GET /ps` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PsReport {
    /// Bytes the loaded models may hold together, if limited.
    pub max_loaded_bytes: Option<u64>,
    /// Seconds an idle model stays loaded, if limited.
    pub keep_alive_seconds: Option<f64>,
    /// Every model the server has been asked for.
    pub models: Vec<ModelStatus>,
}

/// Why the operator socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Another server answers on the socket.
    #[error(
        "another realm-host serve answers on {0}; stop it, or give this server its own `admin-socket` in realm.toml"
    )]
    InUse(PathBuf),
    /// The socket or its folder could not be made.
    #[error("cannot open the operator socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds the operator socket at `path`: its folder is made private to this
/// user, and a stale socket of a server that is gone is replaced.
pub async fn bind(path: &Path) -> Result<tokio::net::UnixListener, AdminError> {
    let io = |source| AdminError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(AdminError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    tokio::net::UnixListener::bind(path).map_err(io)
}

/// The operator routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ps", get(ps))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn ps(State(state): State<Arc<AppState>>) -> Json<PsReport> {
    let limits = &state.runtime().config.loading;
    Json(PsReport {
        max_loaded_bytes: limits.max_loaded_bytes.map(|b| b.0),
        keep_alive_seconds: limits.keep_alive.map(|k| k.as_secs_f64()),
        models: state.hub.status(),
    })
}

/// `GET /metrics`: every series, no key (the operator's socket, and
/// `metrics-listen`).
pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics_text(None),
    )
}

/// Asks the server on `socket` for `path` (`/ps`, `/metrics`); returns the
/// body. Blocking: for the command line.
pub fn get_blocking(socket: &Path, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("the server's answer has no body"))?;
    if !head.starts_with("HTTP/1.1 200") {
        let status = head.lines().next().unwrap_or_default();
        return Err(std::io::Error::other(format!(
            "the server answered {status}"
        )));
    }
    Ok(body.to_string())
}
