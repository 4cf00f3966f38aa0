//! What each tenant is doing now, for the admin API's live view: tokens per
//! second over the last minute and time to first token over its last
//! generations (exact percentiles, which the Prometheus histogram's buckets
//! could only approximate).
//!
//! Only configured tenants reach here (after their key is verified), and
//! each keeps a bounded window, so the memory is bounded too.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

/// Samples of time to first token kept per tenant.
const TTFT_SAMPLES: usize = 1024;
/// The window tokens per second are averaged over, in seconds.
const WINDOW_SECS: u64 = 60;

/// Per-tenant live statistics.
#[derive(Debug)]
pub struct LiveStats {
    start: Instant,
    tenants: Mutex<HashMap<String, TenantLive>>,
}

#[derive(Debug, Default)]
struct TenantLive {
    ttft: VecDeque<f64>,
    /// (second since start, tokens produced in it).
    tokens: VecDeque<(u64, u64)>,
}

/// A tenant's live numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LiveSnapshot {
    /// Tokens generated per second, over the last minute.
    pub tokens_per_second: f64,
    /// Median time to first token, in seconds, over the last generations.
    pub ttft_p50: Option<f64>,
    /// 99th percentile of the same.
    pub ttft_p99: Option<f64>,
}

impl Default for LiveStats {
    fn default() -> Self {
        LiveStats {
            start: Instant::now(),
            tenants: Mutex::default(),
        }
    }
}

impl LiveStats {
    fn with<T>(&self, tenant: &str, f: impl FnOnce(&mut TenantLive) -> T) -> T {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        // Called per token: the id is copied only the first time.
        match tenants.get_mut(tenant) {
            Some(live) => f(live),
            None => f(tenants.entry(tenant.to_string()).or_default()),
        }
    }

    /// Records a first token after `seconds`.
    pub fn first_token(&self, tenant: &str, seconds: f64) {
        self.with(tenant, |t| {
            if t.ttft.len() == TTFT_SAMPLES {
                t.ttft.pop_front();
            }
            t.ttft.push_back(seconds);
        });
    }

    /// Records one generated token.
    pub fn token(&self, tenant: &str) {
        let now = self.start.elapsed().as_secs();
        self.with(tenant, |t| {
            match t.tokens.back_mut() {
                Some((second, n)) if *second == now => *n += 1,
                _ => t.tokens.push_back((now, 1)),
            }
            while t
                .tokens
                .front()
                .is_some_and(|(s, _)| s + WINDOW_SECS <= now)
            {
                t.tokens.pop_front();
            }
        });
    }

    /// `tenant`'s numbers now.
    pub fn snapshot(&self, tenant: &str) -> LiveSnapshot {
        let now = self.start.elapsed().as_secs();
        let tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let Some(t) = tenants.get(tenant) else {
            return LiveSnapshot::default();
        };
        let tokens: u64 = (t.tokens.iter())
            .filter(|(s, _)| s + WINDOW_SECS > now)
            .map(|(_, n)| n)
            .sum();
        // Over the window, or since start when younger than it.
        let span = (now + 1).min(WINDOW_SECS) as f64;
        let mut sorted: Vec<f64> = t.ttft.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let quantile = |q: f64| {
            (!sorted.is_empty()).then(|| {
                let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
                sorted[rank - 1]
            })
        };
        LiveSnapshot {
            tokens_per_second: tokens as f64 / span,
            ttft_p50: quantile(0.5),
            ttft_p99: quantile(0.99),
        }
    }

    /// Forgets tenants not in `keep` (removed ones).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        tenants.retain(|id, _| keep(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_exact_and_windows_bounded() {
        let live = LiveStats::default();
        for i in 1..=100 {
            live.first_token("acme", i as f64 / 100.0);
        }
        for _ in 0..30 {
            live.token("acme");
        }
        let s = live.snapshot("acme");
        assert_eq!(s.ttft_p50, Some(0.5));
        assert_eq!(s.ttft_p99, Some(0.99));
        assert!(s.tokens_per_second >= 0.5, "{s:?}");
        assert_eq!(live.snapshot("other"), LiveSnapshot::default());
        for i in 0..2000 {
            live.first_token("acme", i as f64);
        }
        assert_eq!(
            live.tenants.lock().unwrap()["acme"].ttft.len(),
            TTFT_SAMPLES
        );
    }
}
