//! Accepting connections: caps on how many are open in total and per peer,
//! a deadline for each request's headers (which also closes idle
//! keep-alive connections), and graceful shutdown.
//!
//! `axum::serve` has none of these bounds: a thousand keyless connections
//! that never sent a byte stayed open for good. Here each connection counts
//! against its peer's share until it closes — an upgraded WebSocket too,
//! since the upgrade handler keeps the connection's [`ConnectionSlot`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_service::Service;

use super::config::ConnectionConfig;

/// Largest request head (line and headers) read, in bytes.
const MAX_HEAD: usize = 64 << 10;
/// Most headers one request may have.
const MAX_HEADERS: usize = 64;

/// The address of the client that sent a request (a request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        // Without the listener (a router served another way) the peer is unknown.
        Ok(parts
            .extensions
            .get::<Peer>()
            .copied()
            .unwrap_or(Peer(SocketAddr::from(([0, 0, 0, 0], 0)))))
    }
}

/// Open connections, in total and per peer address.
#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// One open connection's place in the caps; freed when the last clone drops.
#[derive(Debug)]
pub struct ConnectionSlot {
    open: Arc<Mutex<Open>>,
    peer: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total -= 1;
        if let Some(n) = open.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.per_peer.remove(&self.peer);
            }
        }
    }
}

/// The slot of the connection a request came on (a request extension).
#[derive(Debug, Clone)]
pub struct SlotHandle(pub Option<Arc<ConnectionSlot>>);

impl<S: Send + Sync> FromRequestParts<S> for SlotHandle {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(SlotHandle(
            parts.extensions.get::<Arc<ConnectionSlot>>().cloned(),
        ))
    }
}

/// Takes a slot for a connection from `peer`, or `None` over a cap.
fn admit(
    open: &Arc<Mutex<Open>>,
    peer: IpAddr,
    limits: &ConnectionConfig,
) -> Option<ConnectionSlot> {
    let mut state = open.lock().unwrap_or_else(|e| e.into_inner());
    let mine = state.per_peer.get(&peer).copied().unwrap_or(0);
    if state.total >= limits.max || mine >= limits.max_per_peer {
        return None;
    }
    state.total += 1;
    *state.per_peer.entry(peer).or_insert(0) += 1;
    Some(ConnectionSlot {
        open: open.clone(),
        peer,
    })
}

/// Serves `router` on `listener` until `shutdown` resolves; then stops
/// accepting, lets each connection finish its request in flight, and
/// returns once all have closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionConfig,
    shutdown: impl Future<Output = ()>,
) {
    let open = Arc::new(Mutex::new(Open::default()));
    let (stop, stopping) = watch::channel(false);
    let (alive, closed) = watch::channel(());
    let mut refused_logged: Option<std::time::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept:
                    // back off briefly instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(slot) = admit(&open, peer.ip(), &limits) else {
            if refused_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                refused_logged = Some(std::time::Instant::now());
                tracing::warn!(%peer, "connection refused: too many open connections");
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let mut stopping = stopping.clone();
        let closed = closed.clone();
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let slot = Arc::new(slot);
            let service =
                hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    request.extensions_mut().insert(Peer(peer));
                    request.extensions_mut().insert(slot.clone());
                    let mut router = router.clone();
                    async move { router.call(request).await }
                });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(MAX_HEAD)
                .max_headers(MAX_HEADERS);
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let stop = async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            };
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(closed);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    drop(closed);
    alive.closed().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_in_total_and_per_peer() {
        let limits = ConnectionConfig {
            max: 3,
            max_per_peer: 2,
            ..ConnectionConfig::default()
        };
        let open = Arc::new(Mutex::new(Open::default()));
        let a = IpAddr::from([10, 0, 0, 1]);
        let b = IpAddr::from([10, 0, 0, 2]);
        let first = admit(&open, a, &limits).unwrap();
        let _second = admit(&open, a, &limits).unwrap();
        assert!(admit(&open, a, &limits).is_none(), "per peer");
        let _third = admit(&open, b, &limits).unwrap();
        assert!(admit(&open, b, &limits).is_none(), "in total");
        drop(first);
        assert!(
            admit(&open, a, &limits).is_some(),
            "a closed slot is free again"
        );
    }
}
