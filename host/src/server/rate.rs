//! Per-tenant rate limits: token buckets for requests and generated tokens
//! per minute, a cap on concurrent streams, and a daily token quota.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::config::RateConfig;

/// Why a request may not start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Over a per-minute rate; try again after this long.
    RateLimited {
        what: &'static str,
        retry_after: Duration,
    },
    /// The daily token quota is spent; it renews after this long.
    QuotaExceeded { retry_after: Duration },
    /// As many streams as allowed are running.
    TooManyStreams { limit: u32 },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::RateLimited { what, retry_after } => write!(
                f,
                "{what} rate limit reached; retry in {} ms",
                retry_after.as_millis()
            ),
            Refusal::QuotaExceeded { retry_after } => write!(
                f,
                "the daily token quota is spent; it renews in {} s",
                retry_after.as_secs()
            ),
            Refusal::TooManyStreams { limit } => {
                write!(
                    f,
                    "{limit} streams are already running; wait for one to finish"
                )
            }
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

/// One tenant's limiter.
#[derive(Debug)]
pub struct RateLimiter {
    config: RateConfig,
    usage: Mutex<Usage>,
    streams: Arc<AtomicU32>,
}

/// Holds one of a tenant's concurrent-stream slots until dropped.
#[derive(Debug)]
pub struct StreamSlot(Arc<AtomicU32>);

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
            usage: Mutex::new(usage),
            streams: Arc::new(AtomicU32::new(0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits one request (of any kind), or says why not.
    pub fn admit_request(&self) -> Result<(), Refusal> {
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

    /// Admits a generation: tokens left this minute and today, and a free
    /// stream slot, held until the returned slot is dropped.
    pub fn admit_generation(&self) -> Result<StreamSlot, Refusal> {
        {
            let mut usage = self.lock();
            let (today, until_tomorrow) = utc_day(SystemTime::now());
            if usage.day != today {
                usage.day = today;
                usage.tokens_today = 0;
            }
            if let Some(quota) = self.config.tokens_per_day
                && usage.tokens_today >= quota
            {
                return Err(Refusal::QuotaExceeded {
                    retry_after: until_tomorrow,
                });
            }
            if let Some(bucket) = &mut usage.tokens {
                let wait = bucket.wait_for(1.0, Instant::now());
                if !wait.is_zero() {
                    return Err(Refusal::RateLimited {
                        what: "token",
                        retry_after: wait,
                    });
                }
            }
        }
        let limit = self.config.concurrent_streams.unwrap_or(u32::MAX);
        let taken = self
            .streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(StreamSlot(self.streams.clone())),
            Err(_) => Err(Refusal::TooManyStreams { limit }),
        }
    }

    /// Charges `tokens` generated tokens (the minute bucket may go into debt).
    pub fn charge_tokens(&self, tokens: u64) {
        let mut usage = self.lock();
        usage.tokens_today += tokens;
        if let Some(bucket) = &mut usage.tokens {
            bucket.refill(Instant::now());
            bucket.level -= tokens as f64;
        }
    }

    /// Streams running now.
    pub fn streams(&self) -> u32 {
        self.streams.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_beyond_the_rate_wait_for_the_bucket() {
        let limiter = RateLimiter::new(RateConfig {
            requests_per_minute: Some(2),
            ..Default::default()
        });
        limiter.admit_request().unwrap();
        limiter.admit_request().unwrap();
        match limiter.admit_request() {
            Err(Refusal::RateLimited { retry_after, .. }) => {
                assert!(
                    retry_after > Duration::from_secs(25) && retry_after <= Duration::from_secs(30)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn generated_tokens_drain_the_minute_and_the_day() {
        let limiter = RateLimiter::new(RateConfig {
            tokens_per_minute: Some(100),
            ..Default::default()
        });
        drop(limiter.admit_generation().unwrap());
        limiter.charge_tokens(150);
        match limiter.admit_generation() {
            Err(Refusal::RateLimited {
                what: "token",
                retry_after,
            }) => {
                // 51 tokens of debt at 100 a minute.
                assert!(retry_after > Duration::from_secs(29), "{retry_after:?}");
            }
            other => panic!("{other:?}"),
        }
        let daily = RateLimiter::new(RateConfig {
            tokens_per_day: Some(10),
            ..Default::default()
        });
        daily.charge_tokens(10);
        assert!(matches!(
            daily.admit_generation(),
            Err(Refusal::QuotaExceeded { .. })
        ));
    }

    #[test]
    fn stream_slots_are_returned_when_dropped() {
        let limiter = RateLimiter::new(RateConfig {
            concurrent_streams: Some(1),
            ..Default::default()
        });
        let slot = limiter.admit_generation().unwrap();
        assert_eq!(
            limiter.admit_generation().unwrap_err(),
            Refusal::TooManyStreams { limit: 1 }
        );
        drop(slot);
        assert_eq!(limiter.streams(), 0);
        limiter.admit_generation().unwrap();
    }
}
