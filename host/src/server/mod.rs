//! `realm-host serve`: the multi-tenant service. One port carries the
//! WebSocket API (`/v1/ws`), OpenAI-compatible HTTP routes, health checks and
//! Prometheus metrics. SIGHUP reloads the configuration without dropping
//! connections; SIGTERM (or Ctrl-C) drains in-flight streams, bounded by
//! `drain-timeout`.

pub mod admin;
pub mod admin_api;
mod auth;
pub mod component;
pub mod config;
mod embeddings;
mod fleet;
mod http;
pub mod keys;
mod listen;
mod live;
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
    /// The database could not be opened or migrated.
    #[error("database: {0}")]
    Database(#[from] crate::control::DbError),
}

/// Where a started server listens.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The public API.
    pub public: std::net::SocketAddr,
    /// The admin API and dashboard, when `[admin]` is configured.
    pub admin: Option<std::net::SocketAddr>,
    /// The operator's metrics, when `metrics-listen` is configured.
    pub metrics: Option<std::net::SocketAddr>,
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

/// Serves `config_path` until SIGTERM, Ctrl-C or an admin's drain; `ready`
/// receives the bound addresses once the sockets listen.
pub async fn serve(
    config_path: PathBuf,
    home: RealmHome,
    hub: Arc<ModelHub>,
    sandbox: Arc<Sandbox>,
    ready: impl FnOnce(Bound),
) -> Result<(), ServeError> {
    let config = ServerConfig::load(&config_path)?;
    let addr = config.listen;
    let drain_timeout = config.drain_timeout;
    let connections = config.connections.clone();
    hub.set_batching((&config.batching).into());
    hub.set_residency((&config.loading).into());
    let admin_path = (config.admin_socket.clone()).unwrap_or_else(|| home.admin_socket());
    let control = match &config.database {
        Some(database) => {
            let url = database.resolved_url(&home);
            Some(Arc::new(crate::control::ControlPlane::open(&url).await?))
        }
        None => None,
    };
    let flush_interval = config.database.as_ref().map(|d| d.flush_interval);
    let metrics_listen = config.metrics_listen;
    let admin_config = config.admin.clone();
    let state = Arc::new(AppState::new(config, home, hub, sandbox, control.clone()).await?);
    let admin = admin::bind(&admin_path).await?;
    let operator = tokio::spawn(axum::serve(admin, admin::router(state.clone())).into_future());
    let (listener, bound) = bind(addr).await?;
    let admin_listener = match &admin_config {
        Some(admin) => {
            let addr = admin.listen;
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "the admin API listens beyond this machine; put it behind a firewall or TLS proxy");
            }
            Some(bind(addr).await?)
        }
        None => None,
    };
    let admin_bound = admin_listener.as_ref().map(|(_, at)| *at);
    let metrics_server = match metrics_listen {
        Some(addr) => {
            let (listener, at) = bind(addr).await?;
            tracing::info!(
                "operator metrics (every tenant's series, no key) on http://{at}/metrics"
            );
            let router = Router::new()
                .route("/metrics", get(admin::metrics))
                .with_state(state.clone());
            let served = listen::serve(
                listener,
                router,
                connections.clone(),
                std::future::pending(),
            );
            Some((tokio::spawn(served), at))
        }
        None => None,
    };
    let metrics_bound = metrics_server.as_ref().map(|(_, at)| *at);
    let metrics_server = metrics_server.map(|(server, _)| server);
    let admin_server = match (admin_listener, &control) {
        (Some((listener, _)), Some(control)) => {
            let api = admin_api::AdminApi::new(state.clone(), control.clone()).await?;
            // The same bounds on connections, headers and bodies as the
            // public port: the admin port also hears unauthenticated bytes.
            let served = listen::serve(
                listener,
                admin_api::router(api),
                connections.clone(),
                std::future::pending(),
            );
            Some(tokio::spawn(served))
        }
        _ => None,
    };
    tracing::info!(%bound, tenants = state.runtime().tenants.len(), "serving");
    ready(Bound {
        public: bound,
        admin: admin_bound,
        metrics: metrics_bound,
    });

    tokio::spawn(reload_on_hangup(state.clone(), config_path));
    let (stop_upkeep, upkeep_stops) = tokio::sync::watch::channel(false);
    let upkeep = match (&control, flush_interval) {
        (Some(control), Some(every)) => Some(tokio::spawn(keep_up(
            state.clone(),
            control.clone(),
            every,
            upkeep_stops,
        ))),
        _ => None,
    };
    let fleet =
        (state.fleet().cloned()).map(|fleet| tokio::spawn(fleet.run(stop_upkeep.subscribe())));
    let drain = state.clone();
    let shutdown = async move {
        tokio::select! {
            () = terminated() => {}
            // An admin's `POST /admin/api/drain`.
            () = drain.drained() => {}
        }
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
    for server in [admin_server, metrics_server].into_iter().flatten() {
        server.abort();
    }
    // The upkeep finishes the flush it is in (aborting it could drop a
    // write half-way), then stops.
    stop_upkeep.send_replace(true);
    if let Some(upkeep) = upkeep {
        let _ = upkeep.await;
    }
    // The fleet's task applies the settlements still queued, then stops.
    if let Some(fleet) = fleet {
        let _ = fleet.await;
    }
    let _ = std::fs::remove_file(&admin_path);
    // Every generation has ended (or been cut off): write the last usage.
    if let Some(control) = &control
        && let Err(e) = control.flush().await
    {
        tracing::error!("the last usage could not be written to the ledger: {e}");
    }
    Ok(())
}

/// A listener on `addr`, and the address it got.
async fn bind(
    addr: std::net::SocketAddr,
) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), ServeError> {
    let listen = |source| ServeError::Listen { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(listen)?;
    let at = listener.local_addr().map_err(listen)?;
    Ok((listener, at))
}

/// Writes the ledger every `every`, and reloads when the database changed
/// (another host's admin change) or a key expired.
async fn keep_up(
    state: Arc<AppState>,
    control: Arc<crate::control::ControlPlane>,
    every: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut polled = std::time::Instant::now();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        match control.flush().await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("the usage ledger is written again");
            }
            Ok(_) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::error!("cannot write the usage ledger (kept in memory, retrying): {e}");
            }
            Err(_) => {}
        }
        if polled.elapsed() < std::time::Duration::from_secs(2).min(every * 2) {
            continue;
        }
        polled = std::time::Instant::now();
        match state.stale().await {
            Ok(true) => match state.refresh().await {
                Ok(()) => tracing::info!("tenants and keys reloaded from the database"),
                Err(e) => tracing::error!(
                    "cannot serve the database's tenants, keeping the running ones: {e}"
                ),
            },
            Ok(false) => {}
            Err(e) => tracing::warn!("cannot read the database's revision: {e}"),
        }
    }
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
