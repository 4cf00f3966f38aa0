//! Limits shared by a fleet of hosts, in Redis (`[fleet] redis = ...`).
//!
//! Without a fleet each host enforces its tenants' limits alone, so a
//! tenant behind N hosts gets N times its rates. With one, every admission
//! is one atomic script in Redis (see [`lua`]) that all hosts share:
//! request and token buckets, concurrent streams and the daily quota.
//!
//! Tokens are reserve-then-reconcile, as on one host: admitting a
//! generation reserves its most tokens fleet-wide, and settling it returns
//! the unused part. Settlements go through a queue to a background task,
//! because they happen where the batcher ends a generation (not on the
//! async threads), and are sent in pipelined batches; each names its
//! reservation, and a reservation settles once however often it is sent,
//! so retries after a lost reply never count twice. An admission whose
//! answer never came (a timeout, or its request dropped meanwhile) is
//! settled as unused: nothing if it never ran. A reservation whose host
//! died stays charged in full, as an unsettled reservation does on one
//! host. Running generations hold stream *leases* the host renews; a dead
//! host's leases lapse after `stream-lease`.
//!
//! When Redis cannot be reached (a connection fails or a call takes longer
//! than `timeout`), Redis counts as down: `realm_fleet_redis_up` drops to
//! 0, a warning is logged, and until a probe (every second) gets an answer:
//! - `on-redis-error = "open"` (the default): each host enforces the
//!   tenant's limits alone, as without a fleet;
//! - `"closed"`: generations and rate-limited requests are refused with
//!   `overloaded` (503) and a retry time.
//!
//! Other Redis errors (a read-only replica, out of memory) are counted and
//! logged, and refuse or fall back for that call alone. Settlements wait in
//! memory for Redis to come back; a shutdown waits for the generations
//! still running and their settlements up to `timeout` × 20.

mod lua;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, watch};

use super::config::{FleetConfig, OnRedisError, RateConfig};
use super::rate::Refusal;
use lua::Keys;

/// Redis could not be asked (down, or too slow).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the fleet's shared limits (Redis) are unreachable")]
pub struct Unreachable;

/// A generation admitted by the fleet: its stream lease and reserved
/// tokens. Settle it with the tokens used; dropped unsettled, it settles
/// as having used all it reserved (the stream ended, the tokens stay
/// charged).
#[derive(Debug)]
pub struct FleetHold {
    fleet: Arc<Fleet>,
    held: Option<Held>,
    /// Still being admitted: dropped, it settles as unused.
    unused_if_dropped: bool,
}

/// What Redis knows a hold by.
#[derive(Debug)]
struct Held {
    tenant: Arc<str>,
    id: String,
    day: u64,
    reserved: u64,
    tokens_per_minute: u32,
}

impl FleetHold {
    /// Ends the generation having used `used` tokens.
    pub fn settle(mut self, used: u64) {
        if let Some(held) = self.held.take() {
            self.fleet.settle(held, used);
        }
    }
}

impl Drop for FleetHold {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            let used = if self.unused_if_dropped {
                0
            } else {
                held.reserved
            };
            self.fleet.settle(held, used);
        }
    }
}

/// One settlement on its way to Redis.
#[derive(Debug)]
struct Settle {
    held: Held,
    used: u64,
}

/// The metrics a fleet reports.
#[derive(Debug, Clone)]
pub struct FleetMetrics {
    /// 1 while Redis answers, 0 while it does not.
    pub up: prometheus::IntGauge,
    /// Redis calls that failed or timed out.
    pub errors: prometheus::IntCounter,
}

/// This host's link to the fleet's shared limits.
pub struct Fleet {
    redis: ConnectionManager,
    prefix: String,
    policy: OnRedisError,
    timeout: Duration,
    lease: Duration,
    /// This host, as recorded in its reservations (`HOSTNAME:PID`).
    host: String,
    /// Makes reservation ids unique across hosts and restarts.
    nonce: u64,
    next_id: AtomicU64,
    up: watch::Sender<bool>,
    metrics: FleetMetrics,
    settles: mpsc::UnboundedSender<Settle>,
    queued: Mutex<Option<mpsc::UnboundedReceiver<Settle>>>,
    /// Reservations made (or being made) and not yet settled in Redis.
    holds: AtomicU64,
    /// Settlements sent, ever; and applied (or given up), ever, in the
    /// order sent.
    sent: AtomicU64,
    applied: watch::Sender<u64>,
    /// When a Redis error that is not an outage was last logged.
    error_logged: Mutex<Option<std::time::Instant>>,
    /// The running generations' leases, by tenant.
    leases: Mutex<HashMap<Arc<str>, HashSet<String>>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("prefix", &self.prefix)
            .field("policy", &self.policy)
            .field("up", &*self.up.borrow())
            .finish_non_exhaustive()
    }
}

/// A Redis reply that is not what the scripts return.
fn unexpected(reply: &[i64]) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Client,
        "unexpected reply from a limits script",
        format!("{reply:?}"),
    ))
}

impl Fleet {
    /// A link to the Redis at `config.redis` (or `REALM_REDIS_URL`); it
    /// connects on first use and reconnects by itself. Must be called on a
    /// Tokio runtime.
    pub fn new(config: &FleetConfig, metrics: FleetMetrics) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(config.resolved_url())?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            // One try per call: the probe below retries, once a second.
            .set_number_of_retries(1)
            .set_max_delay(config.timeout);
        let redis = ConnectionManager::new_lazy_with_config(client, manager)?;
        let (settles, queued) = mpsc::unbounded_channel();
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Client, "no randomness", e.to_string()))
        })?;
        let host = format!(
            "{}:{}",
            hostname().unwrap_or_else(|| "host".into()),
            std::process::id()
        );
        metrics.up.set(1);
        Ok(Fleet {
            redis,
            prefix: config.key_prefix.clone(),
            policy: config.on_redis_error,
            timeout: config.timeout,
            lease: config.stream_lease,
            host,
            nonce: u64::from_le_bytes(nonce),
            next_id: AtomicU64::new(0),
            up: watch::Sender::new(true),
            metrics,
            settles,
            queued: Mutex::new(Some(queued)),
            holds: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            applied: watch::Sender::new(0),
            error_logged: Mutex::new(None),
            leases: Mutex::new(HashMap::new()),
        })
    }

    /// What the limits do while Redis is down.
    pub fn policy(&self) -> OnRedisError {
        self.policy
    }

    /// Whether Redis answered the last call.
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Runs one call with the timeout. A lost connection or a timeout marks
    /// Redis down; another error (a script refused, a read-only replica)
    /// fails this call alone.
    async fn call<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unreachable> {
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer in {:?}", self.timeout),
            ))),
        };
        result.map_err(|e| {
            self.metrics.errors.inc();
            if e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
            {
                self.mark_down(&e);
            } else {
                self.log_error(&e);
            }
            Unreachable
        })
    }

    /// Logs a Redis error that is not an outage, at most once a second.
    fn log_error(&self, error: &dyn std::fmt::Display) {
        let mut logged = self.error_logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            *logged = Some(std::time::Instant::now());
            tracing::error!("the fleet's Redis refused a call: {error}");
        }
    }

    /// Fails at once while Redis is down (the probe brings it back), so a
    /// dead Redis does not cost every request a timeout.
    fn check_up(&self) -> Result<(), Unreachable> {
        if self.is_up() {
            Ok(())
        } else {
            Err(Unreachable)
        }
    }

    fn mark_down(&self, error: &redis::RedisError) {
        if self.up.send_replace(false) {
            self.metrics.up.set(0);
            let meaning = match self.policy {
                OnRedisError::Open => "each host enforces its tenants' limits alone",
                OnRedisError::Closed => "generations are refused",
            };
            tracing::warn!(
                policy = self.policy.as_str(),
                "Redis (the fleet's shared limits) is unreachable, {meaning} until it answers: {error}"
            );
        }
    }

    fn mark_up(&self) {
        if !self.up.send_replace(true) {
            self.metrics.up.set(1);
            tracing::info!("Redis (the fleet's shared limits) answers again");
        }
    }

    /// Admits one of `tenant`'s requests under its fleet-wide rate of
    /// `per_minute`.
    pub async fn admit_request(
        &self,
        tenant: &str,
        per_minute: u32,
    ) -> Result<Result<(), Refusal>, Unreachable> {
        self.check_up()?;
        let keys = Keys::new(&self.prefix, tenant);
        let mut redis = self.redis.clone();
        let reply: Vec<i64> = self
            .call(async {
                lua::ADMIT_REQUEST_SCRIPT
                    .key(keys.requests())
                    .arg(per_minute)
                    .invoke_async(&mut redis)
                    .await
            })
            .await?;
        match reply[..] {
            [0] => Ok(Ok(())),
            [1, wait] => Ok(Err(Refusal::RateLimited {
                what: "request",
                retry_after: Duration::from_millis(wait.max(1) as u64),
            })),
            _ => {
                self.log_error(&unexpected(&reply));
                Err(Unreachable)
            }
        }
    }

    /// Admits one of `tenant`'s generations of at most `tokens` tokens under
    /// its fleet-wide `rate`; `used_today` is what this host knows of
    /// today's spending (from the ledger), used when Redis knows nothing.
    pub async fn admit_generation(
        self: &Arc<Self>,
        tenant: &Arc<str>,
        rate: &RateConfig,
        tokens: u64,
        day: (u64, Duration),
        used_today: u64,
    ) -> Result<Result<FleetHold, Refusal>, Unreachable> {
        self.check_up()?;
        let keys = Keys::new(&self.prefix, tenant);
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:016x}{n:x}", self.nonce);
        // Until the answer comes, the reservation is settled as unused if
        // this is dropped (its request went away) or fails: the script may
        // still run once Redis reads it, and nothing is left charged.
        self.holds.fetch_add(1, Ordering::AcqRel);
        let mut admitting = FleetHold {
            fleet: self.clone(),
            held: Some(Held {
                tenant: tenant.clone(),
                id: id.clone(),
                day: day.0,
                reserved: tokens,
                tokens_per_minute: rate.tokens_per_minute.unwrap_or(0),
            }),
            unused_if_dropped: true,
        };
        let mut redis = self.redis.clone();
        let reply: Vec<i64> = self
            .call(async {
                lua::ADMIT_GENERATION_SCRIPT
                    .key(keys.streams())
                    .key(keys.tokens())
                    .key(keys.day(day.0))
                    .key(keys.reservation(&id))
                    .arg(&id)
                    .arg(tokens)
                    .arg(rate.concurrent_streams.unwrap_or(0))
                    .arg(rate.tokens_per_minute.unwrap_or(0))
                    .arg(
                        rate.tokens_per_day
                            .map_or(-1, |q| q.min(i64::MAX as u64) as i64),
                    )
                    .arg(used_today)
                    .arg(self.lease.as_millis() as u64)
                    .arg(&self.host)
                    .arg(lua::DAY_SECS)
                    .arg(lua::RESERVATION_SECS)
                    .invoke_async(&mut redis)
                    .await
            })
            .await?;
        let refusal = match reply[..] {
            [0, _] => {
                self.lock_leases()
                    .entry(tenant.clone())
                    .or_default()
                    .insert(id);
                admitting.unused_if_dropped = false;
                return Ok(Ok(admitting));
            }
            [1, limit] => Refusal::TooManyStreams {
                limit: limit.clamp(0, u32::MAX as i64) as u32,
            },
            [2, left] => Refusal::QuotaExceeded {
                needed: tokens,
                left: left.max(0) as u64,
                retry_after: day.1,
            },
            [3, wait] => Refusal::RateLimited {
                what: "token",
                retry_after: Duration::from_millis(wait.max(1) as u64),
            },
            _ => {
                self.log_error(&unexpected(&reply));
                return Err(Unreachable);
            }
        };
        // Refused: the script changed nothing, so there is nothing to settle.
        admitting.held = None;
        self.holds.fetch_sub(1, Ordering::AcqRel);
        Ok(Err(refusal))
    }

    /// Settles `held` having used `used` tokens: its lease ends now, and
    /// the background task reconciles it in Redis (retrying until Redis
    /// answers). Never blocks.
    fn settle(&self, held: Held, used: u64) {
        if let Some(ids) = self.lock_leases().get_mut(&held.tenant) {
            ids.remove(&held.id);
        }
        // The receiver lives as long as the fleet's task; it stops once the
        // holds are settled at shutdown (or its deadline passed).
        match self.settles.send(Settle { held, used }) {
            Ok(()) => {
                self.sent.fetch_add(1, Ordering::AcqRel);
            }
            Err(_) => {
                self.holds.fetch_sub(1, Ordering::AcqRel);
                tracing::error!(
                    "a settlement came after the fleet's task stopped; it stays reserved"
                );
            }
        }
    }

    /// Waits until every settlement sent so far is applied in Redis (at
    /// most a few `timeout`s; not at all while Redis is down), so a reply
    /// sent after it finds the fleet's counts already reconciled: a tenant
    /// that reads its quota after a response sees that response in it.
    pub async fn settled(&self) {
        let target = self.sent.load(Ordering::Acquire);
        let mut applied = self.applied.subscribe();
        let mut up = self.up.subscribe();
        let _ = tokio::time::timeout(self.timeout * 4, async {
            tokio::select! {
                _ = applied.wait_for(|n| *n >= target) => {}
                _ = up.wait_for(|up| !*up) => {}
            }
        })
        .await;
    }

    /// `n` settlements applied (or given up).
    fn applied(&self, n: usize) {
        self.holds.fetch_sub(n as u64, Ordering::AcqRel);
        self.applied.send_modify(|count| *count += n as u64);
    }

    fn lock_leases(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, HashSet<String>>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `batch` in one pipeline: the settle script is loaded first
    /// (Redis may have restarted without it), then each settlement runs
    /// atomically on its own.
    async fn apply(&self, batch: &[Settle]) -> Result<(), Unreachable> {
        let invocations: Vec<_> = (batch.iter())
            .map(|settle| {
                let held = &settle.held;
                let keys = Keys::new(&self.prefix, &held.tenant);
                let mut invocation = lua::SETTLE_SCRIPT.prepare_invoke();
                invocation
                    .key(keys.reservation(&held.id))
                    .key(keys.streams())
                    .key(keys.tokens())
                    .key(keys.day(held.day))
                    .arg(&held.id)
                    .arg(settle.used)
                    .arg(held.tokens_per_minute);
                invocation
            })
            .collect();
        let mut pipe = redis::pipe();
        pipe.cmd("SCRIPT")
            .arg("LOAD")
            .arg(lua::SETTLE_CODE.as_str())
            .ignore();
        for invocation in &invocations {
            pipe.invoke_script(invocation);
        }
        let mut redis = self.redis.clone();
        let _: Vec<i64> = self
            .call(async { pipe.query_async(&mut redis).await })
            .await?;
        Ok(())
    }

    async fn renew(&self) -> Result<(), Unreachable> {
        let leases: Vec<(Arc<str>, Vec<String>)> = {
            let mut leases = self.lock_leases();
            leases.retain(|_, ids| !ids.is_empty());
            (leases.iter())
                .map(|(tenant, ids)| (tenant.clone(), ids.iter().cloned().collect()))
                .collect()
        };
        for (tenant, ids) in leases {
            let keys = Keys::new(&self.prefix, &tenant);
            let mut redis = self.redis.clone();
            let _: i64 = self
                .call(async {
                    let mut script = lua::RENEW_SCRIPT.key(keys.streams());
                    script.arg(self.lease.as_millis() as u64);
                    for id in &ids {
                        script.key(keys.reservation(id)).arg(id);
                    }
                    script.invoke_async(&mut redis).await
                })
                .await?;
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), Unreachable> {
        let mut redis = self.redis.clone();
        let _: String = self
            .call(async { redis::cmd("PING").query_async(&mut redis).await })
            .await?;
        self.mark_up();
        Ok(())
    }

    /// The fleet's upkeep, until `stop`: applies settlements in order, in
    /// batches (waiting while Redis is down), renews stream leases every
    /// third of a lease, and probes a down Redis every second. On `stop`
    /// it goes on applying until every reservation is settled (generations
    /// still running end, at the latest when the server cuts them off), for
    /// at most `timeout` × 20.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let Some(mut queued) = self.queued.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let settler = {
            let fleet = self.clone();
            let mut stop = stop.clone();
            async move {
                let mut up = fleet.up.subscribe();
                loop {
                    let first = tokio::select! {
                        biased;
                        _ = stop.wait_for(|s| *s) => break,
                        settle = queued.recv() => settle,
                    };
                    let Some(first) = first else { return };
                    let batch = fleet.batch(first, &mut queued);
                    if !fleet.settle_batch(&batch, &mut up, &mut stop).await {
                        // Stopping: the shutdown pass below retries it.
                        return fleet.shut_down(batch, queued).await;
                    }
                }
                fleet.shut_down(Vec::new(), queued).await;
            }
        };
        let keeper = async {
            let renew_every = (self.lease / 3).max(Duration::from_millis(100));
            let mut renewed = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1).min(renew_every)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                if !self.is_up() {
                    let _ = self.ping().await;
                } else if renewed.elapsed() >= renew_every && self.renew().await.is_ok() {
                    renewed = tokio::time::Instant::now();
                }
            }
        };
        tokio::join!(settler, keeper);
    }

    /// `first` and what else is queued, up to [`BATCH`].
    fn batch(&self, first: Settle, queued: &mut mpsc::UnboundedReceiver<Settle>) -> Vec<Settle> {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match queued.try_recv() {
                Ok(settle) => batch.push(settle),
                Err(_) => break,
            }
        }
        batch
    }

    /// Applies `batch`, retrying while Redis is down (woken when it is
    /// back), until it is applied (true) or the fleet stops (false). A
    /// batch Redis keeps refusing while up is given up after
    /// [`ATTEMPTS`] tries: logged, its reservations stay charged.
    async fn settle_batch(
        &self,
        batch: &[Settle],
        up: &mut watch::Receiver<bool>,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut refused = 0;
        loop {
            if self.apply(batch).await.is_ok() {
                self.applied(batch.len());
                return true;
            }
            if self.is_up() {
                refused += 1;
                if refused == ATTEMPTS {
                    tracing::error!(
                        "Redis refused {} settlements {ATTEMPTS} times; their reservations stay charged",
                        batch.len()
                    );
                    self.applied(batch.len());
                    return true;
                }
            }
            tokio::select! {
                _ = up.wait_for(|up| *up) => {}
                _ = stop.wait_for(|s| *s) => return false,
            }
            // Up again, or a refusal: not in a tight loop.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// At shutdown: applies `pending` and what comes until every
    /// reservation is settled, for at most `timeout` × 20.
    async fn shut_down(
        &self,
        mut pending: Vec<Settle>,
        mut queued: mpsc::UnboundedReceiver<Settle>,
    ) {
        let deadline = tokio::time::Instant::now() + self.timeout * 20;
        loop {
            while pending.len() < BATCH {
                match queued.try_recv() {
                    Ok(settle) => pending.push(settle),
                    Err(_) => break,
                }
            }
            if pending.is_empty() {
                if self.holds.load(Ordering::Acquire) == 0 {
                    return;
                }
                match tokio::time::timeout_at(deadline, queued.recv()).await {
                    Ok(Some(settle)) => pending.push(settle),
                    _ => break,
                }
                continue;
            }
            if self.apply(&pending).await.is_ok() {
                self.applied(pending.len());
                pending.clear();
            } else if tokio::time::Instant::now() >= deadline {
                break;
            } else {
                tokio::time::sleep(Duration::from_millis(50).min(self.timeout)).await;
            }
        }
        let left = self.holds.load(Ordering::Acquire);
        if left > 0 {
            tracing::error!(
                "shutting down with {left} reservations not settled in Redis; they stay charged"
            );
        }
    }
}

/// Most settlements sent in one pipeline.
const BATCH: usize = 256;

/// Tries of a batch that Redis refuses while it answers.
const ATTEMPTS: u32 = 20;

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}
