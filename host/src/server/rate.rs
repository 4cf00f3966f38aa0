//! Per-tenant rate limits: token buckets for requests and tokens per minute,
//! a cap on concurrent streams, and a daily token quota.
//!
//! Tokens are prompt tokens plus generated tokens (OpenAI's `total_tokens`):
//! a long prompt costs compute whether or not much is generated. A
//! generation reserves its most (prompt + `max_tokens`) when it is admitted,
//! so concurrent generations cannot overshoot the daily quota, and the
//! unused part is returned when it ends ([`Reservation::settle`]).
//!
//! With a database, every settled generation is also written to the usage
//! ledger (the same tokens the quota counts), and a limiter starts from
//! what the ledger says the tenant used today: a restart does not hand out
//! the daily quota again.
//!
//! In a fleet ([`super::fleet`]) the limits are decided in Redis, for all
//! hosts at once; this host's own counts then only serve while Redis is
//! down and its policy is `open`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::config::{OnRedisError, RateConfig};
use super::fleet::{Fleet, FleetHold};
use crate::control::Ledger;
use crate::control::ledger::Counts;

/// Why a request may not start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Over a per-minute rate; try again after this long.
    RateLimited {
        what: &'static str,
        retry_after: Duration,
    },
    /// The daily token quota cannot cover this request: `needed` tokens at
    /// most, `left` left today; it renews after `retry_after`.
    QuotaExceeded {
        needed: u64,
        left: u64,
        retry_after: Duration,
    },
    /// As many streams as allowed are running.
    TooManyStreams { limit: u32 },
    /// The fleet's shared limits cannot be reached and this host refuses
    /// what they would decide (`on-redis-error = "closed"`).
    LimitsUnreachable { retry_after: Duration },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::RateLimited { what, retry_after } => write!(
                f,
                "{what} rate limit reached; retry in {} ms",
                retry_after.as_millis()
            ),
            Refusal::QuotaExceeded {
                left: 0,
                retry_after,
                ..
            } => write!(
                f,
                "the daily token quota is spent; it renews in {} s",
                retry_after.as_secs()
            ),
            Refusal::QuotaExceeded {
                needed,
                left,
                retry_after,
            } => write!(
                f,
                "this request may use {needed} tokens (prompt and max_tokens) but {left} are left of today's quota; \
                 lower max_tokens, or wait {} s for the quota to renew",
                retry_after.as_secs()
            ),
            Refusal::TooManyStreams { limit } => {
                write!(
                    f,
                    "{limit} streams are already running; wait for one to finish"
                )
            }
            Refusal::LimitsUnreachable { retry_after } => write!(
                f,
                "the fleet's shared limits cannot be checked (Redis is unreachable); retry in {} ms",
                retry_after.as_millis()
            ),
        }
    }
}

/// A bucket refilling `per_minute` units per minute up to `per_minute`; it may
/// go into debt when charged after the fact (tokens generated).
#[derive(Debug)]
struct Bucket {
    per_minute: f64,
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn new(per_minute: u32) -> Self {
        Bucket {
            per_minute: per_minute as f64,
            level: per_minute as f64,
            updated: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let minutes = now.duration_since(self.updated).as_secs_f64() / 60.0;
        self.level = (self.level + minutes * self.per_minute).min(self.per_minute);
        self.updated = now;
    }

    /// Time until the level reaches `needed`, or zero.
    fn wait_for(&mut self, needed: f64, now: Instant) -> Duration {
        self.refill(now);
        if self.level >= needed {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((needed - self.level) / self.per_minute * 60.0)
                .max(Duration::from_millis(1))
        }
    }
}

#[derive(Debug)]
struct Usage {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    day: u64,
    tokens_today: u64,
}

impl Usage {
    /// Starts counting `day` at zero if the count is of an earlier day.
    fn roll_to(&mut self, day: u64) {
        if self.day != day {
            self.day = day;
            self.tokens_today = 0;
        }
    }
}

/// One tenant's limiter.
#[derive(Debug)]
pub struct RateLimiter {
    config: RateConfig,
    /// Shared with its successors (see [`RateLimiter::successor`]), so a
    /// reservation made before a limit change settles into the count the
    /// new limits read.
    usage: Arc<Mutex<Usage>>,
    streams: Arc<AtomicU32>,
    ledger: Option<(Arc<Ledger>, String)>,
    /// The fleet that decides the limits, and the tenant's id there.
    fleet: Option<(Arc<Fleet>, Arc<str>)>,
}

/// Holds one of a tenant's concurrent-stream slots until dropped.
#[derive(Debug)]
struct StreamSlot(Arc<AtomicU32>);

/// An admitted generation's stream slot and reserved tokens. Settle it with
/// the tokens used when the generation ends; dropped unsettled, the whole
/// reservation stays charged.
#[derive(Debug)]
pub struct Reservation {
    limiter: Arc<RateLimiter>,
    served: String,
    reserved: u64,
    day: u64,
    /// Where the fleet admitted it; `None` when this host did.
    fleet: Option<FleetHold>,
    _slot: StreamSlot,
}

impl Reservation {
    /// Tokens reserved.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Ends the generation having used `prompt` + `completion` tokens: the
    /// unused part of the reservation is returned (more than reserved is
    /// charged), the ledger records them, and the stream slot is freed.
    pub fn settle(self, prompt: u64, completion: u64) {
        let used = prompt + completion;
        if let Some((ledger, tenant)) = &self.limiter.ledger {
            let counts = Counts {
                prompt: prompt.min(i64::MAX as u64) as i64,
                completion: completion.min(i64::MAX as u64) as i64,
                requests: 1,
                errors: 0,
            };
            ledger.record(tenant, &self.served, counts);
        }
        let mut usage = self.limiter.lock();
        let unused = self.reserved as f64 - used as f64;
        if usage.day == self.day {
            usage.tokens_today = (usage.tokens_today + used).saturating_sub(self.reserved);
        }
        match self.fleet {
            // The fleet's bucket was charged, not this host's.
            Some(hold) => {
                drop(usage);
                hold.settle(used);
            }
            None => {
                if let Some(bucket) = &mut usage.tokens {
                    bucket.refill(Instant::now());
                    bucket.level = (bucket.level + unused).min(bucket.per_minute);
                }
            }
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn utc_day(now: SystemTime) -> (u64, Duration) {
    let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    (secs / 86_400, Duration::from_secs(86_400 - secs % 86_400))
}

impl RateLimiter {
    /// A limiter for `config`, with full buckets.
    pub fn new(config: RateConfig) -> Self {
        let usage = Usage {
            requests: config.requests_per_minute.map(Bucket::new),
            tokens: config.tokens_per_minute.map(Bucket::new),
            day: utc_day(SystemTime::now()).0,
            tokens_today: 0,
        };
        RateLimiter {
            config,
            usage: Arc::new(Mutex::new(usage)),
            streams: Arc::new(AtomicU32::new(0)),
            ledger: None,
            fleet: None,
        }
    }

    /// The same limiter, deciding `tenant`'s limits in `fleet` (if there
    /// is one) while it answers.
    pub fn in_fleet(mut self, fleet: Option<&Arc<Fleet>>, tenant: &str) -> Self {
        self.fleet = fleet.map(|fleet| (fleet.clone(), Arc::from(tenant)));
        self
    }

    /// A limiter for `tenant` that writes what it settles to `ledger`, and
    /// has `used_today` tokens of today's quota spent already.
    pub fn metered(config: RateConfig, tenant: &str, ledger: Arc<Ledger>, used_today: u64) -> Self {
        let mut limiter = RateLimiter::new(config);
        limiter.lock().tokens_today = used_today;
        limiter.ledger = Some((ledger, tenant.to_string()));
        limiter
    }

    /// A limiter for new rates that carries on from `self`: the same
    /// day's count (reservations made under the old limits settle into it),
    /// running streams and ledger, and minute buckets at their levels (within
    /// the new rates). A limit changed in the middle of the day must not
    /// hand out the quota again.
    pub fn successor(&self, config: RateConfig) -> Self {
        {
            let mut usage = self.lock();
            let now = Instant::now();
            let carry = |old: Option<Bucket>, rate: Option<u32>| {
                rate.map(|rate| {
                    let mut bucket = Bucket::new(rate);
                    if let Some(mut old) = old {
                        old.refill(now);
                        bucket.level = old.level.min(bucket.per_minute);
                    }
                    bucket
                })
            };
            usage.requests = carry(usage.requests.take(), config.requests_per_minute);
            usage.tokens = carry(usage.tokens.take(), config.tokens_per_minute);
        }
        RateLimiter {
            config,
            usage: self.usage.clone(),
            streams: self.streams.clone(),
            ledger: self.ledger.clone(),
            fleet: self.fleet.clone(),
        }
    }

    /// Records a refused or failed request in the ledger.
    pub fn record_error(&self) {
        if let Some((ledger, tenant)) = &self.ledger {
            let counts = Counts {
                errors: 1,
                ..Counts::default()
            };
            ledger.record(tenant, "", counts);
        }
    }

    /// The rates it enforces.
    pub fn config(&self) -> &RateConfig {
        &self.config
    }

    /// Tokens spent (or reserved) today.
    pub fn used_today(&self) -> u64 {
        let usage = self.lock();
        if usage.day == utc_day(SystemTime::now()).0 {
            usage.tokens_today
        } else {
            0
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// While the fleet's Redis is down: `Ok` to decide here (`open`), or
    /// the refusal (`closed`).
    fn fleet_down(fleet: &Fleet) -> Result<(), Refusal> {
        match fleet.policy() {
            OnRedisError::Open => Ok(()),
            OnRedisError::Closed => Err(Refusal::LimitsUnreachable {
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// Admits one request (of any kind), or says why not.
    pub async fn admit_request(&self) -> Result<(), Refusal> {
        if let (Some((fleet, tenant)), Some(rate)) = (&self.fleet, self.config.requests_per_minute)
        {
            match fleet.admit_request(tenant, rate).await {
                Ok(verdict) => return verdict,
                Err(_) => Self::fleet_down(fleet)?,
            }
        }
        let mut usage = self.lock();
        if let Some(bucket) = &mut usage.requests {
            let wait = bucket.wait_for(1.0, Instant::now());
            if !wait.is_zero() {
                return Err(Refusal::RateLimited {
                    what: "request",
                    retry_after: wait,
                });
            }
            bucket.level -= 1.0;
        }
        Ok(())
    }

    /// Admits a generation that may use up to `tokens` tokens (prompt plus
    /// `max_tokens`): a free stream slot, tokens left this minute, and room
    /// for all of them in today's quota. The tokens are reserved until the
    /// returned reservation is settled. `served` (`MODEL` or
    /// `MODEL:ADAPTER`) names the ledger row it is charged to.
    pub async fn admit_generation(
        self: &Arc<Self>,
        served: &str,
        tokens: u64,
    ) -> Result<Reservation, Refusal> {
        if let Some((fleet, tenant)) = &self.fleet {
            let now = utc_day(SystemTime::now());
            // The fleet decides the stream limit; the slot here counts
            // this host's streams.
            self.streams.fetch_add(1, Ordering::AcqRel);
            let slot = StreamSlot(self.streams.clone());
            match (fleet.admit_generation(tenant, &self.config, tokens, now, self.used_today()))
                .await
            {
                Ok(Ok(hold)) => {
                    let mut usage = self.lock();
                    usage.roll_to(now.0);
                    usage.tokens_today += tokens;
                    return Ok(Reservation {
                        limiter: self.clone(),
                        served: served.to_string(),
                        reserved: tokens,
                        day: usage.day,
                        fleet: Some(hold),
                        _slot: slot,
                    });
                }
                Ok(Err(refusal)) => return Err(refusal),
                Err(_) => Self::fleet_down(fleet)?,
            }
        }
        self.admit_generation_here(served, tokens)
    }

    /// [`RateLimiter::admit_generation`] by this host's own counts.
    fn admit_generation_here(
        self: &Arc<Self>,
        served: &str,
        tokens: u64,
    ) -> Result<Reservation, Refusal> {
        let limit = self.config.concurrent_streams.unwrap_or(u32::MAX);
        let taken = self
            .streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            });
        if taken.is_err() {
            return Err(Refusal::TooManyStreams { limit });
        }
        let slot = StreamSlot(self.streams.clone());
        let mut usage = self.lock();
        let (today, until_tomorrow) = utc_day(SystemTime::now());
        usage.roll_to(today);
        if let Some(quota) = self.config.tokens_per_day {
            let left = quota.saturating_sub(usage.tokens_today);
            if tokens > left {
                return Err(Refusal::QuotaExceeded {
                    needed: tokens,
                    left,
                    retry_after: until_tomorrow,
                });
            }
        }
        if let Some(bucket) = &mut usage.tokens {
            // The minute bucket may go into debt: a request larger than a
            // minute's tokens is admitted when the bucket is full, and the
            // next ones wait for it to refill.
            let wait = bucket.wait_for(1.0, Instant::now());
            if !wait.is_zero() {
                return Err(Refusal::RateLimited {
                    what: "token",
                    retry_after: wait,
                });
            }
            bucket.level -= tokens as f64;
        }
        usage.tokens_today += tokens;
        Ok(Reservation {
            limiter: self.clone(),
            served: served.to_string(),
            reserved: tokens,
            day: usage.day,
            fleet: None,
            _slot: slot,
        })
    }

    /// Streams running now.
    pub fn streams(&self) -> u32 {
        self.streams.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_beyond_the_rate_wait_for_the_bucket() {
        let limiter = RateLimiter::new(RateConfig {
            requests_per_minute: Some(2),
            ..Default::default()
        });
        limiter.admit_request().await.unwrap();
        limiter.admit_request().await.unwrap();
        match limiter.admit_request().await {
            Err(Refusal::RateLimited { retry_after, .. }) => {
                assert!(
                    retry_after > Duration::from_secs(25) && retry_after <= Duration::from_secs(30)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn tokens_drain_the_minute_and_the_day() {
        let limiter = Arc::new(RateLimiter::new(RateConfig {
            tokens_per_minute: Some(100),
            ..Default::default()
        }));
        limiter
            .admit_generation("m", 150)
            .await
            .unwrap()
            .settle(150, 0);
        match limiter.admit_generation("m", 1).await {
            Err(Refusal::RateLimited {
                what: "token",
                retry_after,
            }) => {
                // 51 tokens of debt at 100 a minute.
                assert!(retry_after > Duration::from_secs(29), "{retry_after:?}");
            }
            other => panic!("{other:?}"),
        }
        let daily = Arc::new(RateLimiter::new(RateConfig {
            tokens_per_day: Some(10),
            ..Default::default()
        }));
        daily.admit_generation("m", 10).await.unwrap().settle(10, 0);
        assert!(matches!(
            daily.admit_generation("m", 1).await,
            Err(Refusal::QuotaExceeded { left: 0, .. })
        ));
    }

    #[tokio::test]
    async fn concurrent_generations_cannot_overshoot_the_quota() {
        let limiter = Arc::new(RateLimiter::new(RateConfig {
            tokens_per_day: Some(300),
            ..Default::default()
        }));
        let first = limiter.admit_generation("m", 200).await.unwrap();
        match limiter.admit_generation("m", 200).await {
            Err(Refusal::QuotaExceeded {
                needed: 200,
                left: 100,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // The unused part comes back when the generation ends.
        first.settle(50, 0);
        let second = limiter.admit_generation("m", 250).await.unwrap();
        drop(second);
        assert!(
            matches!(
                limiter.admit_generation("m", 1).await,
                Err(Refusal::QuotaExceeded { left: 0, .. })
            ),
            "an unsettled reservation stays charged"
        );
    }

    #[tokio::test]
    async fn a_metered_limiter_starts_from_the_ledger_and_carries_over() {
        let ledger = Arc::new(Ledger::default());
        let rate = RateConfig {
            tokens_per_day: Some(100),
            ..Default::default()
        };
        // 90 tokens were spent before a restart.
        let limiter = Arc::new(RateLimiter::metered(
            rate.clone(),
            "acme",
            ledger.clone(),
            90,
        ));
        assert!(matches!(
            limiter.admit_generation("small", 20).await,
            Err(Refusal::QuotaExceeded { left: 10, .. })
        ));
        limiter
            .admit_generation("small:support", 10)
            .await
            .unwrap()
            .settle(4, 3);
        assert_eq!(
            ledger.pending_tokens("acme", 0),
            7,
            "settled tokens reach the ledger"
        );
        let key = ledger.pending().into_keys().next().unwrap();
        assert_eq!(
            (key.model.as_str(), key.adapter.as_str()),
            ("small", "support")
        );
        // A new rate table keeps today's spending.
        let next = Arc::new(limiter.successor(RateConfig {
            tokens_per_day: Some(98),
            ..rate
        }));
        assert_eq!(next.used_today(), 97);
        assert!(matches!(
            next.admit_generation("small", 2).await,
            Err(Refusal::QuotaExceeded { left: 1, .. })
        ));
        // A reservation made under the old limits settles into the new count.
        let before = Arc::new(RateLimiter::new(RateConfig {
            tokens_per_day: Some(100),
            ..Default::default()
        }));
        let running = before.admit_generation("small", 80).await.unwrap();
        let after = before.successor(RateConfig {
            tokens_per_day: Some(120),
            ..Default::default()
        });
        assert_eq!(after.used_today(), 80);
        running.settle(5, 5);
        assert_eq!(after.used_today(), 10, "the unused reservation came back");
    }

    #[tokio::test]
    async fn stream_slots_are_returned_when_dropped() {
        let limiter = Arc::new(RateLimiter::new(RateConfig {
            concurrent_streams: Some(1),
            ..Default::default()
        }));
        let slot = limiter.admit_generation("m", 1).await.unwrap();
        assert_eq!(
            limiter.admit_generation("m", 1).await.unwrap_err(),
            Refusal::TooManyStreams { limit: 1 }
        );
        slot.settle(1, 0);
        assert_eq!(limiter.streams(), 0);
        limiter.admit_generation("m", 1).await.unwrap();
    }
}
