//! `realm.toml`: what the server listens on, which models it loads, and its
//! tenants with their key hashes, permissions and limits.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::sandbox::{ByteSize, LimitOverrides, Limits};

use super::component::TenantComponent;

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    /// The values do not fit together; every problem is listed.
    #[error("{path}: {}", problems.join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// The whole server configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerConfig {
    /// Address to listen on, e.g. `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Largest WebSocket frame or HTTP body accepted.
    #[serde(default = "default_max_frame")]
    pub max_frame: ByteSize,
    /// How long shutdown waits for in-flight streams.
    #[serde(default = "default_drain", deserialize_with = "duration")]
    pub drain_timeout: Duration,
    /// Serve `/metrics` without a key (all tenants' series). With a tenant's
    /// key, `/metrics` always shows that tenant's series only.
    #[serde(default)]
    pub public_metrics: bool,
    /// An address serving `GET /metrics` with every tenant's series and no
    /// key, for Prometheus and gateways on the operator's network (read at
    /// start); keep it off the public one.
    pub metrics_listen: Option<SocketAddr>,
    /// The operator's Unix socket (`realm-host ps`, all metrics)
    /// [default: `$REALM_HOME/run/admin.sock`] (read at start).
    pub admin_socket: Option<PathBuf>,
    /// Models to load, by the name clients use: a catalog name, stored name or path.
    #[serde(default)]
    pub models: BTreeMap<String, String>,
    /// LoRA adapters of the models, by name; tenants are granted them by
    /// name and call them as `MODEL:ADAPTER`.
    #[serde(default)]
    pub adapters: BTreeMap<String, AdapterConfig>,
    /// Tenants by id.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// How each model batches concurrent generations (read at start).
    #[serde(default)]
    pub batching: BatchingConfig,
    /// Bounds on connections and request bodies (read at start).
    #[serde(default)]
    pub connections: ConnectionConfig,
    /// Which models stay in memory, and for how long.
    #[serde(default)]
    pub loading: LoadingConfig,
    /// Where tenants, keys, usage and the audit log are kept; absent, the
    /// tenants are this file's alone and usage is not recorded (read at start).
    pub database: Option<DatabaseConfig>,
    /// The admin API and dashboard; needs `[database]` (read at start).
    pub admin: Option<AdminConfig>,
    /// Limits shared with the other hosts of a fleet, in Redis; absent,
    /// this host enforces its tenants' limits alone (read at start).
    pub fleet: Option<FleetConfig>,
}

/// The `[fleet]` table: rate limits, streams and daily quotas shared by
/// every host that names the same Redis.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FleetConfig {
    /// `redis://[USER:PASSWORD@]HOST:PORT[/DB]` (TLS, `rediss://`, is not supported).
    /// `REALM_REDIS_URL` overrides it, so a password need not be in the file.
    pub redis: String,
    /// While Redis cannot be reached: `open` (each host enforces the
    /// limits alone, counting what it served itself) or `closed` (refuse
    /// generations and rate-limited requests with `overloaded`).
    #[serde(default)]
    pub on_redis_error: OnRedisError,
    /// How long one call to Redis may take before Redis counts as down.
    #[serde(default = "default_redis_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// How long a running generation keeps its stream slot after its host
    /// stops renewing it (the host died).
    #[serde(default = "default_stream_lease", deserialize_with = "duration")]
    pub stream_lease: Duration,
    /// The prefix of the Redis keys: fleets sharing one Redis use different ones.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

impl FleetConfig {
    /// The URL to connect to: `REALM_REDIS_URL`, else `redis`.
    pub fn resolved_url(&self) -> String {
        std::env::var("REALM_REDIS_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| self.redis.clone())
    }
}

/// What shared limits do while Redis is down.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnRedisError {
    /// Each host enforces the limits alone.
    #[default]
    Open,
    /// Refuse what the limits would have to decide.
    Closed,
}

impl OnRedisError {
    /// The setting as written in realm.toml.
    pub fn as_str(self) -> &'static str {
        match self {
            OnRedisError::Open => "open",
            OnRedisError::Closed => "closed",
        }
    }
}

fn default_redis_timeout() -> Duration {
    Duration::from_millis(250)
}

fn default_stream_lease() -> Duration {
    Duration::from_secs(30)
}

fn default_key_prefix() -> String {
    "realm".into()
}

/// The `[database]` table: the control plane's database.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DatabaseConfig {
    /// `postgres://USER@HOST:PORT/DB`, or a SQLite file (`sqlite:PATH` or a
    /// path, relative to this file) [default: `$REALM_HOME/realm.sqlite3`].
    /// `REALM_DATABASE_URL` overrides it, so a password need not be in the file.
    pub url: Option<String>,
    /// How often charged usage is written to the ledger: a crash loses at
    /// most this much of it.
    #[serde(deserialize_with = "duration")]
    pub flush_interval: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            flush_interval: Duration::from_secs(1),
        }
    }
}

impl DatabaseConfig {
    /// The URL to open: `REALM_DATABASE_URL`, else `url`, else the SQLite
    /// file in `home`.
    pub fn resolved_url(&self, home: &crate::home::RealmHome) -> String {
        std::env::var("REALM_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .or_else(|| self.url.clone())
            .unwrap_or_else(|| home.root().join("realm.sqlite3").display().to_string())
    }
}

/// The `[admin]` table: the admin API and dashboard's own listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct AdminConfig {
    /// Address of the admin listener [default: 127.0.0.1:9090, this machine
    /// only]; it is never the public `listen` port.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

/// The `[loading]` table: how many models stay in memory (llama-server's
/// router mode, Ollama's `keep_alive`). Without `max-loaded-bytes` and
/// `keep-alive`, every model loads at start and stays; with either, a model
/// loads on first use.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct LoadingConfig {
    /// Memory the loaded models may hold together (weights plus prefix
    /// cache each); loading one more unloads idle ones, least recently used
    /// first, and waits for busy ones to finish.
    pub max_loaded_bytes: Option<ByteSize>,
    /// How long a model stays loaded after its last use.
    #[serde(deserialize_with = "optional_duration")]
    pub keep_alive: Option<Duration>,
    /// How long a request waits for its model to load before it gets
    /// `overloaded`.
    #[serde(deserialize_with = "duration")]
    pub max_wait: Duration,
    /// Memory the LoRA adapters in memory may hold together; reading one
    /// more drops idle ones, least recently used first [default: no bound].
    pub max_adapter_bytes: Option<ByteSize>,
}

/// One `[adapters.NAME]` table: a LoRA adapter of one of the `[models]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AdapterConfig {
    /// The `[models]` name of the model it adapts.
    pub model: String,
    /// Its GGUF file: a path (relative to this file's folder) or the name
    /// of an adapter in the model store (`realm-host models pull`).
    pub source: String,
    /// How strongly it applies: 1.0 as trained, 0 not at all.
    #[serde(default = "default_scale")]
    pub scale: f32,
}

fn default_scale() -> f32 {
    1.0
}

impl Default for LoadingConfig {
    fn default() -> Self {
        let limits = crate::inference::residency::ResidencyLimits::default();
        LoadingConfig {
            max_loaded_bytes: limits.max_loaded_bytes.map(ByteSize),
            keep_alive: limits.keep_alive,
            max_wait: limits.max_wait,
            max_adapter_bytes: None,
        }
    }
}

impl From<&LoadingConfig> for crate::inference::residency::ResidencyLimits {
    fn from(c: &LoadingConfig) -> Self {
        crate::inference::residency::ResidencyLimits {
            max_loaded_bytes: c.max_loaded_bytes.map(|b| b.0),
            keep_alive: c.keep_alive,
            max_wait: c.max_wait,
        }
    }
}

/// The `[connections]` table: what any client, with or without a key, may
/// hold of the server.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ConnectionConfig {
    /// Open connections (HTTP and WebSocket) at most; more are closed at once.
    pub max: usize,
    /// Open connections from one address at most.
    pub max_per_peer: usize,
    /// Time a client has to send a request's headers; also how long an idle
    /// keep-alive connection stays open.
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// Time a client has to send a request's body (read only once its key
    /// is verified).
    #[serde(deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// Request-body bytes held in memory at once, across all requests.
    pub body_memory: ByteSize,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            max: 4096,
            max_per_peer: 256,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            body_memory: ByteSize(64 << 20),
        }
    }
}

/// The `[batching]` table: continuous batching of each model's generations.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct BatchingConfig {
    /// Generations running together per model; more wait, admitted fairly
    /// by tenant weight.
    pub max_sequences: usize,
    /// Most tokens one batched step runs (decode tokens plus prompt chunks).
    pub step_tokens: usize,
    /// Memory for prompts' keys and values kept for reuse by later prompts
    /// of the same tenant that start the same way; 0 disables.
    pub prefix_cache: ByteSize,
    /// Prompt beginnings any tenant may share the cache of (a common system
    /// prompt): only prompts that start with a whole one share it.
    pub public_prefixes: Vec<String>,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        let engine = realm_models::engine::BatcherConfig::default();
        BatchingConfig {
            max_sequences: engine.max_sequences,
            step_tokens: engine.step_tokens,
            prefix_cache: ByteSize(engine.prefix_cache_bytes as u64),
            public_prefixes: engine.public_prefixes,
        }
    }
}

impl From<&BatchingConfig> for realm_models::engine::BatcherConfig {
    fn from(c: &BatchingConfig) -> Self {
        realm_models::engine::BatcherConfig {
            max_sequences: c.max_sequences,
            step_tokens: c.step_tokens,
            prefix_cache_bytes: usize::try_from(c.prefix_cache.0).unwrap_or(usize::MAX),
            public_prefixes: c.public_prefixes.clone(),
        }
    }
}

/// One tenant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TenantConfig {
    /// Argon2 hashes of the tenant's API keys (`realm-host keys new` makes them).
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Models (by the names in `[models]`) the tenant may use.
    #[serde(default)]
    pub models: Vec<String>,
    /// Adapters (by the names in `[adapters]`) the tenant may use, on
    /// models it may use.
    #[serde(default)]
    pub adapters: Vec<String>,
    /// The adapter the tenant's requests to its model run with when they
    /// name none (one of `adapters`).
    pub default_adapter: Option<String>,
    /// Pipelines the tenant may run, by the name it uses for them.
    #[serde(default)]
    pub pipelines: BTreeMap<String, PathBuf>,
    /// The tenant's own `tenant`-world component, run by `invoke`: a `.wasm`
    /// path, or sources built on demand (see [`TenantComponent`]).
    pub component: Option<TenantComponent>,
    /// Sandbox limits of the tenant's guest calls.
    #[serde(default)]
    pub limits: LimitOverrides,
    /// Request and token rates.
    #[serde(default)]
    pub rate: RateConfig,
    /// The tenant's share of a model when tenants wait for its batch slots:
    /// a tenant of weight 2 is admitted twice as often as one of weight 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Where the tenant's files and kv data live [default: `$REALM_HOME/tenants`].
    pub data_dir: Option<PathBuf>,
}

/// A tenant's rate limits and quota; a missing value means unlimited.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RateConfig {
    /// Requests (of any kind) per minute.
    pub requests_per_minute: Option<u32>,
    /// Generated tokens per minute.
    pub tokens_per_minute: Option<u32>,
    /// Generations streaming at once.
    pub concurrent_streams: Option<u32>,
    /// Generated tokens per UTC day.
    pub tokens_per_day: Option<u64>,
}

fn default_weight() -> u32 {
    1
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_max_frame() -> ByteSize {
    ByteSize(1 << 20)
}

fn default_drain() -> Duration {
    Duration::from_secs(10)
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(serde::de::Error::custom)
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

impl ServerConfig {
    /// Reads and validates `path`; relative paths in it are taken from its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: ServerConfig = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for tenant in self.tenants.values_mut() {
            tenant.pipelines.values_mut().for_each(fix);
            if let Some(component) = &mut tenant.component {
                component.resolve(base);
            }
            tenant.data_dir.as_mut().map(fix);
        }
        if let Some(socket) = &mut self.admin_socket
            && socket.is_relative()
        {
            *socket = base.join(&*socket);
        }
        if let Some(url) = self.database.as_mut().and_then(|d| d.url.as_mut())
            && !url.contains("://")
        {
            let path = url.strip_prefix("sqlite:").unwrap_or(url);
            if Path::new(path).is_relative() {
                *url = base.join(path).display().to_string();
            }
        }
        let sources =
            (self.models.values_mut()).chain(self.adapters.values_mut().map(|a| &mut a.source));
        for source in sources {
            let local = Path::new(source.as_str());
            if source.ends_with(".gguf") && local.is_relative() {
                *source = base.join(local).display().to_string();
            }
        }
    }

    /// Every inconsistency, each naming where it is (the one validator of
    /// a configuration, whether it comes from the file or the admin API).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(admin) = &self.admin {
            if self.database.is_none() {
                problems.push(
                    "admin: the admin API keeps its state in a database; add a [database] table"
                        .into(),
                );
            }
            if admin.listen == self.listen && admin.listen.port() != 0 {
                problems.push(format!(
                    "admin.listen: {} is the public listen address; the admin API needs its own",
                    admin.listen
                ));
            }
        }
        if let Some(metrics) = self.metrics_listen
            && metrics.port() != 0
        {
            let taken = std::iter::once(self.listen).chain(self.admin.as_ref().map(|a| a.listen));
            if taken.into_iter().any(|addr| addr == metrics) {
                problems.push(format!(
                    "metrics-listen: {metrics} is already the public or admin listen address"
                ));
            }
        }
        if self
            .database
            .as_ref()
            .is_some_and(|d| d.flush_interval.is_zero())
        {
            problems.push("database.flush-interval: must be above zero".into());
        }
        if let Some(fleet) = &self.fleet {
            let url = fleet.resolved_url();
            if url.starts_with("rediss://") {
                problems.push(
                    "fleet.redis: TLS to Redis (rediss://) is not supported; use redis:// on a \
                     private network, or a local TLS tunnel (stunnel) to the Redis"
                        .into(),
                );
            } else if let Err(e) = redis::Client::open(url.as_str()) {
                problems.push(format!("fleet.redis: {e}"));
            }
            if fleet.timeout.is_zero() || fleet.timeout > Duration::from_secs(10) {
                problems.push("fleet.timeout: must be above zero and at most 10s".into());
            }
            if fleet.stream_lease < Duration::from_secs(1)
                || fleet.stream_lease > Duration::from_secs(3600)
            {
                problems.push("fleet.stream-lease: must be from 1s to 1h".into());
            }
            let prefix_ok = !fleet.key_prefix.is_empty()
                && (fleet.key_prefix.chars())
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
            if !prefix_ok {
                problems.push(format!(
                    "fleet.key-prefix: `{}` must be letters, digits, `-`, `_`, `.` or `:`",
                    fleet.key_prefix
                ));
            }
        }
        if !(1..=1024).contains(&self.batching.max_sequences) {
            problems.push(format!(
                "batching.max-sequences: {} is outside 1..=1024",
                self.batching.max_sequences
            ));
        }
        if !(1..=8192).contains(&self.batching.step_tokens) {
            problems.push(format!(
                "batching.step-tokens: {} is outside 1..=8192",
                self.batching.step_tokens
            ));
        }
        let l = &self.loading;
        if l.max_loaded_bytes.is_some_and(|b| b.0 == 0) {
            problems.push("loading.max-loaded-bytes: 0 would load nothing".into());
        }
        if l.keep_alive.is_some_and(|k| k.is_zero()) || l.max_wait.is_zero() {
            problems.push(
                "loading: keep-alive and max-wait must be above zero (leave keep-alive out to keep models loaded)"
                    .into(),
            );
        }
        let c = &self.connections;
        if c.max == 0 || c.max_per_peer == 0 || c.max_per_peer > c.max {
            problems.push(format!(
                "connections: max ({}) and max-per-peer ({}) must be at least 1, max-per-peer at most max",
                c.max, c.max_per_peer
            ));
        }
        if c.header_timeout.is_zero() || c.body_timeout.is_zero() {
            problems.push("connections: header-timeout and body-timeout must be above zero".into());
        }
        if c.body_memory.0 < self.max_frame.0 {
            problems.push(format!(
                "connections.body-memory: {} is below max-frame ({}), so no body could be read",
                c.body_memory, self.max_frame
            ));
        }
        if self.max_frame.0 < 1024 {
            problems.push(format!(
                "max-frame: {} is too small (at least 1KiB)",
                self.max_frame
            ));
        }
        for name in self.models.keys() {
            if name.contains(':') || name.is_empty() {
                problems.push(format!(
                    "models.{name}: a model's name cannot be empty or contain `:` (clients write `MODEL:ADAPTER`)"
                ));
            }
        }
        for (name, adapter) in &self.adapters {
            let at = format!("adapters.{name}");
            if name.is_empty() || name.contains(':') {
                problems.push(format!(
                    "{at}: an adapter's name cannot be empty or contain `:`"
                ));
            }
            if !self.models.contains_key(&adapter.model) {
                problems.push(format!(
                    "{at}.model: `{}` is not in [models] (known: {})",
                    adapter.model,
                    names(self.models.keys())
                ));
            }
            if !adapter.scale.is_finite() || adapter.scale.abs() > 100.0 {
                problems.push(format!(
                    "{at}.scale: {} is outside -100..=100",
                    adapter.scale
                ));
            }
        }
        if self.loading.max_adapter_bytes.is_some_and(|b| b.0 == 0) {
            problems.push("loading.max-adapter-bytes: 0 would load no adapter".into());
        }
        for (id, tenant) in &self.tenants {
            let at = format!("tenants.{id}");
            for name in &tenant.adapters {
                match self.adapters.get(name) {
                    None => problems.push(format!(
                        "{at}.adapters: `{name}` is not in [adapters] (known: {})",
                        names(self.adapters.keys())
                    )),
                    Some(adapter) if !tenant.models.contains(&adapter.model) => {
                        problems.push(format!(
                            "{at}.adapters: `{name}` adapts `{}`, which is not in the tenant's models",
                            adapter.model
                        ))
                    }
                    Some(_) => {}
                }
            }
            if let Some(default) = &tenant.default_adapter
                && !tenant.adapters.contains(default)
            {
                problems.push(format!(
                    "{at}.default-adapter: `{default}` is not one of the tenant's adapters"
                ));
            }
            if crate::sandbox::Tenant::check_id(id).is_err() {
                problems.push(format!(
                    "{at}: invalid tenant id (use 1-64 letters, digits, `-` or `_`)"
                ));
            }
            if !(1..=1000).contains(&tenant.weight) {
                problems.push(format!(
                    "{at}.weight: {} is outside 1..=1000",
                    tenant.weight
                ));
            }
            // With a database, keys may come from the admin API instead.
            if tenant.api_keys.is_empty() && self.database.is_none() {
                problems.push(format!(
                    "{at}.api-keys: no keys, so nobody can use this tenant (add one with `realm-host keys new`)"
                ));
            }
            for (i, hash) in tenant.api_keys.iter().enumerate() {
                if let Err(e) = super::keys::check_hash(hash) {
                    problems.push(format!("{at}.api-keys[{i}]: {e}"));
                }
            }
            for model in &tenant.models {
                if !self.models.contains_key(model) {
                    problems.push(format!(
                        "{at}.models: `{model}` is not in [models] (known: {})",
                        names(self.models.keys())
                    ));
                }
            }
            for (name, path) in &tenant.pipelines {
                if !path.is_file() {
                    problems.push(format!(
                        "{at}.pipelines.{name}: {} does not exist",
                        path.display()
                    ));
                }
            }
            if let Some(problem) = tenant
                .component
                .as_ref()
                .and_then(|c| c.problem(&format!("{at}.component")))
            {
                problems.push(problem);
            }
            if let Err(e) = tenant.limits.apply(&Limits::default()) {
                problems.push(format!("{at}.limits: {e}"));
            }
            for (key, value) in [
                ("requests-per-minute", tenant.rate.requests_per_minute),
                ("tokens-per-minute", tenant.rate.tokens_per_minute),
                ("concurrent-streams", tenant.rate.concurrent_streams),
            ] {
                if value == Some(0) {
                    problems.push(format!(
                        "{at}.rate.{key}: 0 would refuse everything; remove the tenant instead"
                    ));
                }
            }
        }
        problems
    }
}

fn names<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let list: Vec<&str> = names.map(String::as_str).collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<ServerConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("realm.toml");
        std::fs::write(&path, text).unwrap();
        ServerConfig::load(&path)
    }

    fn hash() -> String {
        super::super::keys::ApiKey::generate("acme")
            .unwrap()
            .hash()
            .unwrap()
    }

    #[test]
    fn a_full_config_loads() {
        let config = load(&format!(
            r#"
listen = "127.0.0.1:9000"
max-frame = "64KiB"
drain-timeout = "3s"
[models]
small = "smollm2-135m-instruct"
[tenants.acme]
api-keys = ["{}"]
models = ["small"]
limits = {{ timeout = "2s" }}
rate = {{ requests-per-minute = 60, tokens-per-minute = 1000, concurrent-streams = 2, tokens-per-day = 100000 }}
"#,
            hash()
        ))
        .unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.max_frame, ByteSize(64 << 10));
        assert_eq!(config.drain_timeout, Duration::from_secs(3));
        let acme = &config.tenants["acme"];
        assert_eq!(acme.rate.concurrent_streams, Some(2));
        assert_eq!(acme.limits.timeout, Some(Duration::from_secs(2)));
    }

    #[test]
    fn loading_settings_are_read_and_checked() {
        let config = load("[loading]\nmax-loaded-bytes = \"2GiB\"\nkeep-alive = \"5m\"\n").unwrap();
        let limits = crate::inference::residency::ResidencyLimits::from(&config.loading);
        assert_eq!(limits.max_loaded_bytes, Some(2 << 30));
        assert_eq!(limits.keep_alive, Some(Duration::from_secs(300)));
        assert_eq!(limits.max_wait, Duration::from_secs(60));
        assert!(limits.on_demand());
        let default = load("").unwrap();
        assert!(!crate::inference::residency::ResidencyLimits::from(&default.loading).on_demand());
        let err = load("[loading]\nmax-loaded-bytes = 0\nkeep-alive = \"0s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("0 would load nothing"), "{err}");
        assert!(
            err.contains("keep-alive and max-wait must be above zero"),
            "{err}"
        );
        let err = load("[loading]\nkeep-alive = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("keep-alive"), "{err}");
    }

    #[test]
    fn a_fleet_is_checked_and_has_defaults() {
        let config = load("[fleet]\nredis = \"redis://127.0.0.1:6379\"\n").unwrap();
        let fleet = config.fleet.unwrap();
        assert_eq!(fleet.on_redis_error, OnRedisError::Open);
        assert_eq!(fleet.timeout, Duration::from_millis(250));
        assert_eq!(fleet.stream_lease, Duration::from_secs(30));
        assert_eq!(fleet.key_prefix, "realm");
        let err = load(
            "listen = \"127.0.0.1:8080\"\nmetrics-listen = \"127.0.0.1:8080\"\n\
             [fleet]\nredis = \"http://x\"\ntimeout = \"1m\"\nstream-lease = \"10ms\"\n\
             key-prefix = \"a b\"\non-redis-error = \"closed\"\n",
        )
        .unwrap_err()
        .to_string();
        for wanted in [
            "fleet.redis:",
            "fleet.timeout: must be above zero and at most 10s",
            "fleet.stream-lease: must be from 1s to 1h",
            "fleet.key-prefix: `a b`",
            "metrics-listen: 127.0.0.1:8080 is already the public or admin listen address",
        ] {
            assert!(err.contains(wanted), "{wanted} in {err}");
        }
        let err = load("[fleet]\nredis = \"rediss://x:6380\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rediss://) is not supported"), "{err}");
        let err = load("[fleet]\nredis = \"redis://x\"\non-redis-error = \"maybe\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `maybe`"), "{err}");
    }

    #[test]
    fn the_admin_api_is_local_by_default_and_needs_a_database() {
        let config = load("[database]\n[admin]\n").unwrap();
        let admin = config.admin.unwrap();
        assert!(admin.listen.ip().is_loopback(), "{}", admin.listen);
        assert_ne!(admin.listen, config.listen);
        assert_eq!(
            config.database.unwrap().flush_interval,
            Duration::from_secs(1)
        );
        let err = load("[admin]\n").unwrap_err().to_string();
        assert!(err.contains("add a [database] table"), "{err}");
        let err =
            load("listen = \"127.0.0.1:9000\"\n[database]\n[admin]\nlisten = \"127.0.0.1:9000\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("the admin API needs its own"), "{err}");
        // With a database, a tenant may start without keys (the API makes them).
        load("[database]\n[tenants.acme]\n").unwrap();
        assert!(load("[tenants.acme]\n").is_err());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_place() {
        let err = load("listen = \"127.0.0.1:1\"\nlisen = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn every_inconsistency_is_listed() {
        let err = load(
            r#"
[models]
small = "smollm2-135m-instruct"
[tenants."bad id"]
api-keys = ["plaintext-key"]
models = ["big"]
pipelines = { p = "missing.toml" }
rate = { requests-per-minute = 0 }
"#,
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "invalid tenant id",
            "api-keys[0]",
            "`big` is not in [models] (known: small)",
            "missing.toml does not exist",
            "requests-per-minute: 0",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in {err}");
        }
    }

    #[test]
    fn adapters_and_their_grants_are_checked() {
        let config = load(&format!(
            r#"
[models]
small = "smollm2-135m-instruct"
[loading]
max-adapter-bytes = "64MiB"
[adapters.support]
model = "small"
source = "adapters/support.gguf"
scale = 0.5
[tenants.acme]
api-keys = ["{}"]
models = ["small"]
adapters = ["support"]
default-adapter = "support"
"#,
            hash()
        ))
        .unwrap();
        let support = &config.adapters["support"];
        assert_eq!(support.scale, 0.5);
        assert!(
            support.source.ends_with("adapters/support.gguf") && support.source.starts_with('/'),
            "taken from the config's folder: {}",
            support.source
        );
        assert_eq!(config.loading.max_adapter_bytes, Some(ByteSize(64 << 20)));
        let err = load(
            r#"
[models]
small = "smollm2-135m-instruct"
"odd:name" = "smollm2-135m-instruct"
[loading]
max-adapter-bytes = 0
[adapters.support]
model = "big"
source = "support.gguf"
scale = 1000.0
[adapters."x:y"]
model = "small"
source = "x.gguf"
[tenants.acme]
models = []
adapters = ["support", "x:y", "missing"]
default-adapter = "other"
"#,
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "models.odd:name: a model's name cannot be empty or contain `:`",
            "adapters.support.model: `big` is not in [models]",
            "adapters.support.scale: 1000 is outside",
            "adapters.x:y: an adapter's name cannot",
            "0 would load no adapter",
            "tenants.acme.adapters: `missing` is not in [adapters]",
            "tenants.acme.adapters: `x:y` adapts `small`, which is not in the tenant's models",
            "tenants.acme.default-adapter: `other` is not one of the tenant's adapters",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in {err}");
        }
    }
}
