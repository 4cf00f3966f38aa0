//! The Lua scripts that hold a fleet's shared limits in Redis, and the keys
//! they use.
//!
//! Each check-and-charge is one script, so it is atomic across hosts: two
//! hosts admitting the same tenant's last request cannot both win. Every
//! key of one tenant carries the hash tag `{TENANT}` and every script
//! declares the keys it touches, as a Redis Cluster would need (the client
//! talks to one Redis, though: a primary, or a proxy in front of a
//! cluster). Time comes from Redis (`TIME`), so hosts with skewed clocks
//! share one clock for the minute buckets and stream leases.
//!
//! Keys of tenant `T` under prefix `P`:
//! - `P:{T}:rpm`, `P:{T}:tpm`: the request and token buckets (hashes of
//!   `level` and `at`, the level at `at` milliseconds), expiring once they
//!   would have refilled;
//! - `P:{T}:day:N`: tokens spent or reserved on UTC day `N`, kept two days;
//! - `P:{T}:streams`: running generations, a sorted set of reservation ids
//!   scored by when their lease ends (a host that dies stops renewing them);
//! - `P:{T}:res:ID`: one admitted generation's reservation (`TOKENS HOST`),
//!   deleted when it is settled: settling twice charges once.

use std::sync::LazyLock;

use redis::Script;

/// The keys of one tenant's shared limits.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    base: String,
}

impl Keys {
    /// The keys of `tenant` under `prefix`.
    pub(super) fn new(prefix: &str, tenant: &str) -> Self {
        Keys {
            base: format!("{prefix}:{{{tenant}}}"),
        }
    }

    pub(super) fn requests(&self) -> String {
        format!("{}:rpm", self.base)
    }

    pub(super) fn tokens(&self) -> String {
        format!("{}:tpm", self.base)
    }

    pub(super) fn day(&self, day: u64) -> String {
        format!("{}:day:{day}", self.base)
    }

    pub(super) fn streams(&self) -> String {
        format!("{}:streams", self.base)
    }

    pub(super) fn reservation(&self, id: &str) -> String {
        format!("{}:res:{id}", self.base)
    }
}

/// How long a day's count is kept: past the end of the day, for late
/// settlements.
pub(super) const DAY_SECS: u64 = 2 * 86_400;

/// How long an unsettled reservation is kept (its host died): a day, then
/// it is only the day's count that remembers it.
pub(super) const RESERVATION_SECS: u64 = 25 * 3_600;

/// Shared by the scripts: the time in milliseconds, and a bucket's level
/// refilled to now. A bucket's level may be negative (tokens charged after
/// the fact); it expires once it would be full again, which is the same as
/// a missing one.
const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function level_of(key, rate, now)
  local b = redis.call('HMGET', key, 'level', 'at')
  local level = tonumber(b[1])
  local at = tonumber(b[2])
  if not level or not at then return rate end
  return math.min(rate, level + math.max(0, now - at) * rate / 60000)
end
local function store(key, level, rate, now)
  redis.call('HSET', key, 'level', tostring(level), 'at', now)
  redis.call('PEXPIRE', key, math.ceil((rate - level) * 60000 / rate) + 1000)
end
local function wait_ms(level, rate)
  return math.max(1, math.ceil((1 - level) * 60000 / rate))
end
"#;

/// Admits one request. KEYS: the request bucket. ARGV: requests a minute.
/// Returns `{0}` or `{1, WAIT_MS}`.
const ADMIT_REQUEST: &str = r#"
local rate = tonumber(ARGV[1])
local now = now_ms()
local level = level_of(KEYS[1], rate, now)
if level < 1 then return {1, wait_ms(level, rate)} end
store(KEYS[1], level - 1, rate, now)
return {0}
"#;

/// Admits a generation of at most `TOKENS` tokens.
/// KEYS: streams, token bucket, day count, reservation.
/// ARGV: id, tokens, stream limit (0: none), tokens a minute (0: none),
/// daily quota (-1: none), today's count if Redis has none (from the
/// ledger), lease in ms, host, [`DAY_SECS`], [`RESERVATION_SECS`].
/// Returns `{0, USED_TODAY}`, `{1, LIMIT}` (streams), `{2, LEFT}` (quota)
/// or `{3, WAIT_MS}` (tokens a minute). Nothing changes unless admitted.
const ADMIT_GENERATION: &str = r#"
local id, tokens = ARGV[1], tonumber(ARGV[2])
local limit, rate, quota = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local lease = tonumber(ARGV[7])
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then return {1, limit} end
local used = tonumber(redis.call('GET', KEYS[3])) or tonumber(ARGV[6])
if quota >= 0 and tokens > quota - used then return {2, math.max(0, quota - used)} end
if rate > 0 then
  local level = level_of(KEYS[2], rate, now)
  if level < 1 then return {3, wait_ms(level, rate)} end
  store(KEYS[2], level - tokens, rate, now)
end
redis.call('SET', KEYS[3], used + tokens, 'EX', ARGV[9])
redis.call('ZADD', KEYS[1], now + lease, id)
redis.call('PEXPIRE', KEYS[1], lease * 2)
redis.call('SET', KEYS[4], tokens .. ' ' .. ARGV[8], 'EX', ARGV[10])
return {0, used + tokens}
"#;

/// Settles a reservation with the tokens used: the day's count and the
/// token bucket get the unused part back (or pay the excess), the stream
/// lease ends. A reservation already settled (or lost with a Redis restart)
/// changes nothing.
/// KEYS: reservation, streams, token bucket, day count.
/// ARGV: id, tokens used, tokens a minute (0: none).
/// Returns 1 if settled now, 0 if there was nothing to settle.
const SETTLE: &str = r#"
redis.call('ZREM', KEYS[2], ARGV[1])
local held = redis.call('GET', KEYS[1])
if not held then return 0 end
redis.call('DEL', KEYS[1])
local reserved = tonumber(string.match(held, '^%d+'))
local used = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('INCRBY', KEYS[4], used - reserved)
end
local rate = tonumber(ARGV[3])
if rate > 0 and used ~= reserved then
  local now = now_ms()
  store(KEYS[3], math.min(rate, level_of(KEYS[3], rate, now) + reserved - used), rate, now)
end
return 1
"#;

/// Extends the leases of running generations whose reservations are still
/// held (put back if another host's admission removed a lapsed one: this
/// host was cut off from Redis for longer than a lease).
/// KEYS: streams, then each generation's reservation.
/// ARGV: lease in ms, then each generation's id.
const RENEW: &str = r#"
local lease = tonumber(ARGV[1])
local now = now_ms()
for i = 2, #ARGV do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], lease * 2)
return 0
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

/// [`ADMIT_REQUEST`], compiled once.
pub(super) static ADMIT_REQUEST_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(ADMIT_REQUEST));
/// [`ADMIT_GENERATION`], compiled once.
pub(super) static ADMIT_GENERATION_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(ADMIT_GENERATION));
/// [`SETTLE`]'s source, for loading it ahead of a pipeline.
pub(super) static SETTLE_CODE: LazyLock<String> = LazyLock::new(|| format!("{PRELUDE}{SETTLE}"));
/// [`SETTLE`], compiled once.
pub(super) static SETTLE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(&SETTLE_CODE));
/// [`RENEW`], compiled once.
pub(super) static RENEW_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(RENEW));
