//! Finding the tenant behind a request's API key, without letting requests
//! that have no valid key cost the server much.
//!
//! - A key verified before is recognised by its digest, without Argon2.
//! - Other keys are verified on the bounded [`Verifier`] pool; keys of
//!   unknown tenants are checked against a decoy hash of the same cost, so
//!   the answer's timing does not tell whether a tenant exists.
//! - Failures are counted per peer (per address; per /64 for IPv6) and per
//!   claimed tenant. Past a burst, further unverified keys from that peer or
//!   for that tenant are refused at once, until the bucket refills. Keys
//!   verified before are never throttled, so a flood of wrong keys for a
//!   tenant does not lock out its clients.
//! - Concurrent checks of one key share one verification: a fleet of
//!   clients starting at once with the same key costs one Argon2 run.
//! - Failures and refusals are logged with the peer and claimed tenant, at
//!   most once a second per peer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use sha2::Digest;

use super::keys::Verified;
use super::protocol::{ApiError, ErrorCode};
use super::state::AppState;
use super::verifier::{Busy, Verifier};

/// Failures a peer or a tenant name may have before it is throttled.
const FAILURE_BURST: f64 = 20.0;
/// Failures per minute forgiven after the burst.
const FAILURES_PER_MINUTE: f64 = 10.0;
/// Peers and tenant names remembered at most (each a few dozen bytes).
const TRACKED: usize = 16_384;
/// Verifications queued before new ones are refused.
const VERIFY_QUEUE: usize = 64;

/// The key in an `Authorization: Bearer <key>` header.
pub fn bearer_key(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// Why a key was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No key, or a key of no tenant.
    Invalid,
    /// Too many failures from this peer or for this tenant: retry after this long.
    Throttled(Duration),
    /// Too many verifications are waiting: retry shortly.
    Busy,
}

impl Denied {
    /// The error a client is shown.
    pub fn error(&self) -> ApiError {
        match self {
            Denied::Invalid => ApiError::new(
                ErrorCode::Unauthorized,
                "missing or invalid API key (send `Authorization: Bearer <key>`)",
            ),
            Denied::Throttled(wait) => ApiError {
                retry_after_ms: Some(wait.as_millis().max(1) as u64),
                ..ApiError::new(
                    ErrorCode::RateLimited,
                    "too many failed authentication attempts; retry later",
                )
            },
            Denied::Busy => ApiError {
                retry_after_ms: Some(1000),
                ..ApiError::new(
                    ErrorCode::RateLimited,
                    "too many authentication attempts at once; retry shortly",
                )
            },
        }
    }

    /// The HTTP answer, in the OpenAI error shape, with `Retry-After` when
    /// there is a wait.
    pub fn response(&self) -> axum::response::Response {
        use axum::response::IntoResponse;
        let error = self.error();
        let mut response = super::http::error_response(&error).into_response();
        if let Some(ms) = error.retry_after_ms
            && let Ok(value) = ms.div_ceil(1000).to_string().parse()
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

/// A failure bucket: full at [`FAILURE_BURST`], one failure drains one unit.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    updated: Instant,
    logged: Option<Instant>,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let minutes = now.duration_since(self.updated).as_secs_f64() / 60.0;
        self.level = (self.level + minutes * FAILURES_PER_MINUTE).min(FAILURE_BURST);
        self.updated = now;
    }

    /// How long until one more failure is allowed.
    fn wait(&self) -> Duration {
        if self.level >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.level) / FAILURES_PER_MINUTE * 60.0)
        }
    }
}

/// Failure buckets by key (a peer or a tenant name), bounded in number.
#[derive(Debug)]
struct Failures<K> {
    buckets: HashMap<K, Bucket>,
}

impl<K> Default for Failures<K> {
    fn default() -> Self {
        Failures {
            buckets: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Failures<K> {
    fn wait(&mut self, key: &K, now: Instant) -> Duration {
        match self.buckets.get_mut(key) {
            Some(bucket) => {
                bucket.refill(now);
                bucket.wait()
            }
            None => Duration::ZERO,
        }
    }

    /// Counts a failure; true when it should be logged (once a second per key).
    fn fail(&mut self, key: &K, now: Instant) -> bool {
        if !self.buckets.contains_key(key) && self.buckets.len() >= TRACKED {
            // Forget the keys whose buckets refilled; if every one is still
            // draining, forget all (the verifier pool still bounds the cost).
            self.buckets.retain(|_, b| {
                b.refill(now);
                b.level < FAILURE_BURST
            });
            if self.buckets.len() >= TRACKED {
                self.buckets.clear();
            }
        }
        let bucket = self.buckets.entry(key.clone()).or_insert(Bucket {
            level: FAILURE_BURST,
            updated: now,
            logged: None,
        });
        bucket.refill(now);
        bucket.level = (bucket.level - 1.0).max(0.0);
        let log = bucket
            .logged
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1));
        if log {
            bucket.logged = Some(now);
        }
        log
    }
}

/// The peer a throttle counts: the address, or its /64 for IPv6 (one host
/// usually holds a whole /64).
fn peer_key(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
    }
}

/// Authentication state shared by all requests: the verifier pool and the
/// failure throttles.
pub struct Gate {
    verifier: Verifier,
    peers: Mutex<Failures<IpAddr>>,
    names: Mutex<Failures<String>>,
    /// Verifications in flight, by key digest, shared by their waiters.
    inflight: Mutex<HashMap<[u8; 32], Arc<Pending>>>,
}

/// One verification's result, once known.
type Pending = tokio::sync::OnceCell<Result<Option<Arc<str>>, Busy>>;

/// A waiter on an in-flight verification; the last one to leave removes it.
struct Waiter<'a> {
    gate: &'a Gate,
    digest: [u8; 32],
    pending: Arc<Pending>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut inflight = lock(&self.gate.inflight);
        // Two holders: the map and this waiter.
        if Arc::strong_count(&self.pending) <= 2 {
            inflight.remove(&self.digest);
        }
    }
}

impl Gate {
    /// A gate verifying on `threads` threads.
    pub fn new(threads: usize) -> std::io::Result<Gate> {
        Ok(Gate {
            verifier: Verifier::start(threads, VERIFY_QUEUE)?,
            peers: Mutex::default(),
            names: Mutex::default(),
            inflight: Mutex::default(),
        })
    }

    /// Verifies `key` against `hashes`, joining a verification of the same
    /// key already in flight.
    async fn verify(
        &self,
        key: &str,
        hashes: Vec<Arc<super::keys::StoredHash>>,
    ) -> Result<Option<Arc<str>>, Busy> {
        let digest: [u8; 32] = sha2::Sha256::digest(key.as_bytes()).into();
        let pending = lock(&self.inflight).entry(digest).or_default().clone();
        let waiter = Waiter {
            gate: self,
            digest,
            pending,
        };
        waiter
            .pending
            .get_or_init(|| self.verifier.verify(key, hashes))
            .await
            .clone()
    }

    /// How long `peer`, and keys claiming `name`, must wait. Names are
    /// throttled with their key's prefix (`rk_`, `rka_`): wrong tenant keys
    /// claiming `root` must not lock out the admin `root`, nor the reverse.
    fn wait(&self, peer: IpAddr, name: Option<(&str, &str)>, now: Instant) -> Duration {
        let by_peer = lock(&self.peers).wait(&peer_key(peer), now);
        let by_name = name.map_or(Duration::ZERO, |(prefix, n)| {
            lock(&self.names).wait(&format!("{prefix}{n}"), now)
        });
        by_peer.max(by_name)
    }

    fn fail(&self, peer: IpAddr, name: Option<(&str, &str)>, why: &str) {
        let now = Instant::now();
        let log_peer = lock(&self.peers).fail(&peer_key(peer), now);
        if let Some((prefix, name)) = name {
            lock(&self.names).fail(&format!("{prefix}{name}"), now);
        }
        if log_peer {
            match name {
                Some((super::keys::TENANT_PREFIX, tenant)) => {
                    tracing::warn!(%peer, tenant, "authentication failed: {why}")
                }
                Some((_, admin)) => tracing::warn!(%peer, admin, "authentication failed: {why}"),
                None => tracing::warn!(%peer, tenant = "-", "authentication failed: {why}"),
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The tenant `key` (sent by `peer`) belongs to.
pub async fn authenticate(state: &AppState, key: &str, peer: IpAddr) -> Result<Verified, Denied> {
    let runtime = state.runtime();
    let verified = verify_in(state, &runtime.keys, key, peer).await?;
    if let Some(control) = state.control() {
        control.ledger.touch(&verified.hash);
    }
    Ok(verified)
}

/// The owner of `key` among `ring`'s, through the same verifier pool,
/// throttles and decoy as tenant keys (the admin API's keys use it too).
pub async fn verify_in(
    state: &AppState,
    ring: &super::keys::KeyRing,
    key: &str,
    peer: IpAddr,
) -> Result<Verified, Denied> {
    if let Some(verified) = ring.cached(key) {
        return Ok(verified);
    }
    let gate = &state.gate;
    let claimed = ring.claimed(key).map(|name| (ring.prefix(), name));
    let wait = gate.wait(peer, claimed, Instant::now());
    if !wait.is_zero() {
        gate.fail(peer, None, "throttled after repeated failures");
        return Err(Denied::Throttled(wait));
    }
    let Some(candidates) = ring.candidates(key) else {
        gate.fail(peer, None, "malformed key");
        return Err(Denied::Invalid);
    };
    let matched = match gate.verify(key, candidates.hashes).await {
        Ok(matched) => matched,
        Err(Busy) => {
            tracing::warn!(%peer, "authentication refused: the verifier queue is full");
            return Err(Denied::Busy);
        }
    };
    match (candidates.tenant, matched) {
        (Some(tenant), Some(hash)) => {
            let verified = Verified { tenant, hash };
            ring.remember(key, verified.clone());
            Ok(verified)
        }
        _ => {
            gate.fail(peer, claimed, "wrong key");
            Err(Denied::Invalid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_throttle_after_a_burst_and_refill() {
        let mut failures = Failures::<IpAddr>::default();
        let peer = IpAddr::from([10, 0, 0, 1]);
        let start = Instant::now();
        for _ in 0..FAILURE_BURST as usize {
            assert_eq!(failures.wait(&peer, start), Duration::ZERO);
            failures.fail(&peer, start);
        }
        let wait = failures.wait(&peer, start);
        assert!(wait > Duration::from_secs(5), "{wait:?}");
        let later = start + Duration::from_secs(7);
        assert_eq!(failures.wait(&peer, later), Duration::ZERO);
        assert_eq!(
            failures.wait(&IpAddr::from([10, 0, 0, 2]), start),
            Duration::ZERO
        );
    }

    #[test]
    fn tracked_peers_are_bounded() {
        let mut failures = Failures::<u32>::default();
        let now = Instant::now();
        for i in 0..(TRACKED as u32 + 10) {
            failures.fail(&i, now);
        }
        assert!(failures.buckets.len() <= TRACKED);
    }

    #[test]
    fn ipv6_peers_are_counted_by_their_64() {
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        assert_eq!(peer_key(a), peer_key(b));
    }
}
