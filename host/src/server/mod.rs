//! `realm-host serve`: the multi-tenant service. One port carries the
//! WebSocket API (`/v1/ws`), OpenAI-compatible HTTP routes, health checks and
//! Prometheus metrics. SIGHUP reloads the configuration without dropping
//! connections; SIGTERM (or Ctrl-C) drains in-flight streams, bounded by
//! `drain-timeout`.

pub mod admin;
mod auth;
pub mod component;
pub mod config;
mod embeddings;
mod http;
pub mod keys;
mod listen;
mod metrics;
pub mod protocol;
mod rate;
mod service;
mod state;
pub mod tools;
mod verifier;
mod ws;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

pub use config::{
    BatchingConfig, ConfigError, ConnectionConfig, RateConfig, ServerConfig, TenantConfig,
};
pub use http::OpenAiRequest;
pub use service::{Generation, Input};
pub use state::{AppState, SetupError};

use crate::home::RealmHome;
use crate::inference::ModelHub;
use crate::sandbox::Sandbox;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The configuration could not be put into service.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The operator socket could not be opened.
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
}

/// The router over `state`. Request bodies are read by the handlers, once
/// the key is verified, within `max-frame` and `connections.body-timeout`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(http::healthz))
        .route("/readyz", get(http::readyz))
        .route("/metrics", get(http::metrics))
        .route("/v1/models", get(http::list_models))
        .route("/v1/models/{id}", get(http::get_model))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/chat/completions", post(http::chat_completions))
        .route("/v1/completions", post(http::text_completions))
        .route("/v1/ws", get(ws::upgrade))
        .with_state(state)
}

/// Serves `config_path` until SIGTERM or Ctrl-C; `ready` receives the bound
/// address once the socket listens.
pub async fn serve(
    config_path: PathBuf,
    home: RealmHome,
    hub: Arc<ModelHub>,
    sandbox: Arc<Sandbox>,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), ServeError> {
    let config = ServerConfig::load(&config_path)?;
    let addr = config.listen;
    let drain_timeout = config.drain_timeout;
    let connections = config.connections.clone();
    hub.set_batching((&config.batching).into());
    hub.set_residency((&config.loading).into());
    let admin_path = (config.admin_socket.clone()).unwrap_or_else(|| home.admin_socket());
    let state = Arc::new(AppState::new(config, home, hub, sandbox).await?);
    let admin = admin::bind(&admin_path).await?;
    let operator = tokio::spawn(axum::serve(admin, admin::router(state.clone())).into_future());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::Listen { addr, source })?;
    tracing::info!(%bound, tenants = state.runtime().tenants.len(), "serving");
    ready(bound);

    tokio::spawn(reload_on_hangup(state.clone(), config_path));
    let drain = state.clone();
    let shutdown = async move {
        terminated().await;
        tracing::info!("shutting down: draining in-flight requests");
        drain.drain();
        // The listener stays open, answering 503, until the WebSocket
        // connections have drained; then it closes and HTTP requests finish.
        drain.sockets_closed().await;
    };
    let server = listen::serve(listener, router(state.clone()), connections, shutdown);
    // The HTTP server waits for its own requests (SSE streams included);
    // WebSocket connections it handed off are waited for here.
    let finished = async {
        server.await;
        state.sockets_closed().await;
    };
    let deadline = async {
        state.drained().await;
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::select! {
        () = finished => {}
        () = deadline => {
            tracing::warn!(?drain_timeout, "drain timeout reached; closing the remaining connections");
        }
    }
    operator.abort();
    let _ = std::fs::remove_file(&admin_path);
    Ok(())
}

async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

async fn reload_on_hangup(state: Arc<AppState>, path: PathBuf) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let result = match ServerConfig::load(&path) {
                Ok(config) => state.reload(config).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(()) => tracing::info!(path = %path.display(), "configuration reloaded"),
                Err(e) => tracing::error!("reload refused, keeping the running configuration: {e}"),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (state, path);
}
