//! What the server runs on: the current configuration turned into tenants,
//! key ring and loaded models, swapped whole on reload.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use realm_models::engine::Engine;

use crate::control::{ControlPlane, tenants as stored};
use crate::home::RealmHome;
use crate::inference::adapters::AdapterKey;
use crate::inference::{AdapterUse, ModelHub};
use crate::pipeline::{self, ComponentSource, Pipeline};
use crate::sandbox::{Limits, LoadedComponent, Sandbox, Tenant};

use super::auth::Gate;
use super::config::{ServerConfig, TenantConfig};
use super::fleet::Fleet;
use super::keys::KeyRing;
use super::metrics::Metrics;
use super::rate::RateLimiter;

/// Why a configuration could not be put into service: what was being set
/// up, and the error that stopped it.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct SetupError {
    /// What was being set up (`tenant `acme` pipeline `report``).
    pub context: String,
    /// Why it failed.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl SetupError {
    /// An error setting up `context`.
    pub(crate) fn new(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        SetupError {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// One tenant, ready to serve.
pub struct TenantRuntime {
    /// The tenant's id.
    pub id: String,
    /// Its configuration.
    pub config: TenantConfig,
    /// Its data (files and kv).
    pub data: Tenant,
    /// Limits of its guest calls.
    pub limits: Limits,
    /// Its rates; kept across reloads while its `rate` table is unchanged.
    pub limiter: Arc<RateLimiter>,
    /// Its pipelines, parsed.
    pub pipelines: BTreeMap<String, Arc<Pipeline>>,
    /// Its own component, compiled.
    pub component: Option<LoadedComponent>,
    /// Its share of the request-body memory, in KiB: the server's divided
    /// by its tenants, at least one `max-frame`.
    pub body_share: Arc<tokio::sync::Semaphore>,
}

/// A configuration in service.
pub struct Runtime {
    /// The configuration.
    pub config: ServerConfig,
    /// Whose key is whose.
    pub keys: KeyRing,
    /// Tenants by id.
    pub tenants: HashMap<String, Arc<TenantRuntime>>,
    /// Loaded models by their `[models]` name, and each adapter by
    /// `MODEL:ADAPTER`.
    pub models: BTreeMap<String, Arc<dyn Engine>>,
    /// The versions of the adapters it serves.
    pub adapters: Vec<AdapterKey>,
    /// The bytes of each adapter it serves, by `[adapters]` name.
    pub adapter_bytes: BTreeMap<String, u64>,
}

/// Everything request handlers share.
pub struct AppState {
    runtime: RwLock<Arc<Runtime>>,
    /// Models, loaded once per file and shared by every tenant.
    pub hub: Arc<ModelHub>,
    /// The component sandbox.
    pub sandbox: Arc<Sandbox>,
    /// Metrics.
    pub metrics: Metrics,
    /// Per-tenant live numbers for the admin API.
    pub live: Arc<super::live::LiveStats>,
    /// Key verification and the throttles on failed attempts.
    pub gate: Gate,
    /// Request-body memory, in KiB, shared by all requests being read.
    pub body_memory: tokio::sync::Semaphore,
    /// Counts reloads; connections watch it to re-check their keys.
    reloads: tokio::sync::watch::Sender<u64>,
    /// Throttles the log lines of refused requests.
    pub(crate) refusal_log: LogThrottle,
    home: RealmHome,
    draining: tokio::sync::watch::Sender<bool>,
    /// Open WebSocket connections (the HTTP server does not track upgraded ones).
    sockets: tokio::sync::watch::Sender<usize>,
    /// The database, when there is one.
    control: Option<Arc<ControlPlane>>,
    /// The fleet's shared limits, when there are.
    fleet: Option<Arc<Fleet>>,
    /// realm.toml as last loaded; with a database, the configuration served
    /// is it plus the database's tenants and keys.
    file: std::sync::Mutex<ServerConfig>,
    /// One reload at a time (SIGHUP, admin changes, the revision poll).
    reloading: tokio::sync::Mutex<()>,
    /// The database's revision and next key expiry as of the last reload.
    seen: std::sync::Mutex<(i64, Option<i64>)>,
}

/// Allows one log line a second per tenant.
#[derive(Debug, Default)]
pub struct LogThrottle(std::sync::Mutex<HashMap<String, std::time::Instant>>);

impl LogThrottle {
    /// True if `tenant` may log now (and then not for a second).
    pub fn allow(&self, tenant: &str) -> bool {
        let now = std::time::Instant::now();
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Configured tenants only reach here, so the map stays small; a
        // removed tenant's entry is dropped once it is stale.
        if last.len() > 4096 {
            last.retain(|_, at| now.duration_since(*at) < std::time::Duration::from_secs(1));
        }
        match last.get(tenant) {
            Some(at) if now.duration_since(*at) < std::time::Duration::from_secs(1) => false,
            _ => {
                last.insert(tenant.to_string(), now);
                true
            }
        }
    }
}

/// Counts an open WebSocket connection while alive.
pub struct SocketGuard<'a>(&'a tokio::sync::watch::Sender<usize>);

impl Drop for SocketGuard<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl AppState {
    /// Puts `config` into service: loads its models, pipelines and
    /// components. With `control`, the database's tenants are served too,
    /// and realm.toml's are written there once in service.
    pub async fn new(
        config: ServerConfig,
        home: RealmHome,
        hub: Arc<ModelHub>,
        sandbox: Arc<Sandbox>,
        control: Option<Arc<ControlPlane>>,
    ) -> Result<Self, SetupError> {
        let body_kib = (config.connections.body_memory.0 / 1024) as usize;
        let file = config.clone();
        let (serving, seen) = match &control {
            Some(c) => with_database(c, &config).await?,
            None => (config, (0, None)),
        };
        let metrics = Metrics::new();
        let fleet = match &file.fleet {
            Some(config) => Some(Arc::new(
                Fleet::new(config, metrics.fleet())
                    .map_err(|e| SetupError::new("fleet.redis", e))?,
            )),
            None => None,
        };
        let shared = Shared {
            control: control.as_deref(),
            fleet: fleet.as_ref(),
        };
        let runtime = build_runtime(serving, &home, &hub, &sandbox, None, shared).await?;
        if let Some(c) = &control {
            write_file_tenants(c, &file)
                .await
                .map_err(|e| SetupError::new("writing realm.toml's tenants to the database", e))?;
        }
        // Argon2 is memory-hard and CPU-bound: key checks get at most half
        // the cores (and two threads at most, 19 MiB each), so a flood of
        // wrong keys cannot take the CPU the tenants' generations need.
        let verifiers =
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, 2));
        let gate = Gate::new(verifiers)
            .map_err(|e| SetupError::new("cannot start the key verifiers", e))?;
        let models = hub.clone();
        metrics.watch_models(move || models.status());
        let adapters = hub.clone();
        metrics.watch_adapters(move || (adapters.adapters().len(), adapters.adapters().bytes()));
        Ok(AppState {
            runtime: RwLock::new(Arc::new(runtime)),
            hub,
            sandbox,
            metrics,
            live: Arc::default(),
            gate,
            body_memory: tokio::sync::Semaphore::new(
                body_kib.min(tokio::sync::Semaphore::MAX_PERMITS),
            ),
            reloads: tokio::sync::watch::Sender::new(0),
            refusal_log: LogThrottle::default(),
            home,
            draining: tokio::sync::watch::Sender::new(false),
            sockets: tokio::sync::watch::Sender::new(0),
            control,
            fleet,
            file: std::sync::Mutex::new(file),
            reloading: tokio::sync::Mutex::new(()),
            seen: std::sync::Mutex::new(seen),
        })
    }

    /// The database, when there is one.
    pub fn control(&self) -> Option<&Arc<ControlPlane>> {
        self.control.as_ref()
    }

    /// The fleet's shared limits, when there are.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.as_ref()
    }

    /// The metrics' text: every series, or only `tenant`'s.
    pub fn metrics_text(&self, tenant: Option<&str>) -> String {
        if tenant.is_none() {
            let runtime = self.runtime();
            let cache = self.hub.adapters();
            let running: Vec<String> = (runtime.config.adapters.iter())
                .zip(&runtime.adapters)
                .filter(|(_, key)| cache.holds(key))
                .map(|((name, adapter), _)| format!("{}:{name}", adapter.model))
                .collect();
            self.metrics.set_lora_info(runtime.adapters.len(), &running);
        }
        self.metrics.render(tenant)
    }

    /// realm.toml as last loaded.
    pub fn file_config(&self) -> ServerConfig {
        self.file.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The configuration in service now.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts draining: no new requests; running ones finish.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    /// True once draining has started.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Resolves when draining starts.
    pub async fn drained(&self) {
        let mut rx = self.draining.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Registers an open WebSocket connection until the guard drops.
    pub fn socket_opened(&self) -> SocketGuard<'_> {
        self.sockets.send_modify(|n| *n += 1);
        SocketGuard(&self.sockets)
    }

    /// Resolves when no WebSocket connection is open.
    pub async fn sockets_closed(&self) {
        let mut rx = self.sockets.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Puts a new realm.toml into service (SIGHUP); requests already
    /// running keep the old configuration. With a database, the file's
    /// tenants are written there once the new configuration is in service:
    /// a refused file changes nothing, there or here.
    pub async fn reload(&self, config: ServerConfig) -> Result<(), SetupError> {
        let _turn = self.reloading.lock().await;
        let (serving, seen) = match &self.control {
            Some(c) => with_database(c, &config).await?,
            None => (config.clone(), (0, None)),
        };
        self.install(serving).await?;
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = config.clone();
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = seen;
        if let Some(c) = &self.control
            && let Err(e) = write_file_tenants(c, &config).await
        {
            // What is served already is the file plus the database as the
            // write would leave it; the admin API lags until the next reload.
            tracing::error!(
                "serving the new realm.toml, but writing its tenants to the database failed: {e}"
            );
        }
        Ok(())
    }

    /// Serves the database's current tenants and keys (after an admin
    /// change, or when another host changed them); nothing without one.
    pub async fn refresh(&self) -> Result<(), SetupError> {
        let Some(control) = &self.control else {
            return Ok(());
        };
        let _turn = self.reloading.lock().await;
        let file = self.file_config();
        let (serving, seen) = with_database(control, &file).await?;
        self.install(serving).await?;
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = seen;
        Ok(())
    }

    /// Whether the database changed since the last reload (its revision
    /// moved, or a key in force expired), so [`Self::refresh`] is due.
    pub async fn stale(&self) -> Result<bool, crate::control::DbError> {
        let Some(control) = &self.control else {
            return Ok(false);
        };
        let revision = control.revision().await?;
        let (seen, expiry) = *self.seen.lock().unwrap_or_else(|e| e.into_inner());
        Ok(revision != seen || expiry.is_some_and(|at| at <= crate::control::now()))
    }

    /// Checks `tenants` as the tenants to serve (the admin API's changes):
    /// every problem the configuration file would report, and whether the
    /// adapter budget still holds each tenant's adapters.
    pub fn check_tenants(&self, tenants: BTreeMap<String, TenantConfig>) -> Vec<String> {
        let mut config = self.file_config();
        config.tenants = tenants;
        let mut problems = config.problems();
        if let Some(budget) = config.loading.max_adapter_bytes {
            let runtime = self.runtime();
            let sizes = (runtime.adapter_bytes.iter())
                .map(|(n, b)| (n.as_str(), *b))
                .collect();
            problems.extend(adapter_budget_problem(&config, &sizes, budget.0));
        }
        problems
    }

    /// Puts `config` (complete: file plus database) into service.
    async fn install(&self, config: ServerConfig) -> Result<(), SetupError> {
        let old = self.runtime();
        // New models are checked against the new budget; a refused
        // configuration leaves the old one's in force.
        self.hub.set_residency((&config.loading).into());
        let built = build_runtime(
            config,
            &self.home,
            &self.hub,
            &self.sandbox,
            Some(&old),
            Shared {
                control: self.control.as_deref(),
                fleet: self.fleet.as_ref(),
            },
        )
        .await;
        let runtime = built.inspect_err(|_| {
            self.hub.set_residency((&old.config.loading).into());
            (self.hub.adapters()).set_budget(old.config.loading.max_adapter_bytes.map(|b| b.0));
        })?;
        runtime.keys.carry_from(&old.keys);
        // Adapters removed (or changed on disk) leave memory once their
        // running generations end; those kept stay loaded.
        self.hub
            .adapters()
            .retain(|key| runtime.adapters.contains(key));
        // Live numbers of removed tenants go with them.
        self.live.retain(|id| runtime.tenants.contains_key(id));
        *self.runtime.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(runtime);
        self.reloads.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Changes each time the configuration is reloaded.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }
}

/// Writes realm.toml's tenants to the database (the file wins for them).
async fn write_file_tenants(
    control: &ControlPlane,
    file: &ServerConfig,
) -> Result<(), crate::control::DbError> {
    let changes = stored::sync_config(&control.db, &file.tenants).await?;
    if changes > 0 {
        tracing::info!(changes, "wrote realm.toml's tenants to the database");
    }
    Ok(())
}

/// The configuration to serve: realm.toml (`file`) with the database's
/// tenants and keys (as the file's write leaves them), checked as the file
/// is; and the database's revision and next key expiry it reflects. A
/// database tenant that fails the check is left out and logged, so one bad
/// row cannot stop every later change (a key's revocation) from being
/// served.
async fn with_database(
    control: &ControlPlane,
    file: &ServerConfig,
) -> Result<(ServerConfig, (i64, Option<i64>)), SetupError> {
    let db = &control.db;
    let failed = |e: crate::control::DbError| SetupError::new("the database", e);
    // Read the revision first: a change racing this read is seen by the
    // next poll rather than missed.
    let revision = control.revision().await.map_err(failed)?;
    let expiry = crate::control::keys::next_expiry(db)
        .await
        .map_err(failed)?;
    let mut config = file.clone();
    config.tenants = stored::serving(db, &file.tenants).await.map_err(failed)?;
    let mut problems = config.problems();
    if !problems.is_empty() {
        let bad: Vec<String> = (config.tenants.keys())
            .filter(|id| !file.tenants.contains_key(*id))
            .filter(|id| {
                let at = format!("tenants.{id}");
                problems
                    .iter()
                    .any(|p| p.starts_with(&format!("{at}.")) || p.starts_with(&format!("{at}:")))
            })
            .cloned()
            .collect();
        for id in bad {
            tracing::error!(tenant = %id, "the database's tenant is not served: {}", problems.join("; "));
            config.tenants.remove(&id);
        }
        problems = config.problems();
    }
    if !problems.is_empty() {
        return Err(SetupError::new(
            "the database's tenants",
            problems.join("\n  "),
        ));
    }
    Ok((config, (revision, expiry)))
}

/// What the tenants' limiters share beyond this configuration.
#[derive(Clone, Copy)]
struct Shared<'a> {
    /// The database: the usage ledger.
    control: Option<&'a ControlPlane>,
    /// The fleet: limits decided in Redis.
    fleet: Option<&'a Arc<Fleet>>,
}

async fn build_runtime(
    config: ServerConfig,
    home: &RealmHome,
    hub: &ModelHub,
    sandbox: &Sandbox,
    previous: Option<&Runtime>,
    shared: Shared<'_>,
) -> Result<Runtime, SetupError> {
    let Shared { control, fleet } = shared;
    // Today's usage by tenant, from the ledger: read once, for the tenants
    // whose limiter starts here.
    let mut used_today = None;
    let mut models = BTreeMap::new();
    for (name, source) in &config.models {
        let model = hub
            .load(source)
            .await
            .map_err(|e| SetupError::new(format!("model `{name}` ({source})"), e))?;
        models.insert(name.clone(), model);
    }
    hub.adapters()
        .set_budget(config.loading.max_adapter_bytes.map(|b| b.0));
    let mut adapters = Vec::new();
    let mut sizes = BTreeMap::new();
    for (name, adapter) in &config.adapters {
        let served = format!("{}:{name}", adapter.model);
        let (source, base) = (&config.models[&adapter.model], &models[&adapter.model]);
        let adapted = hub
            .adapted(
                AdapterUse::Served,
                &served,
                (source, base.clone()),
                &adapter.source,
                adapter.scale,
            )
            .await
            .map_err(|e| SetupError::new(format!("adapter `{name}` ({})", adapter.source), e))?;
        adapters.push(adapted.key().clone());
        sizes.insert(name.as_str(), adapted.bytes());
        models.insert(served, adapted as Arc<dyn Engine>);
    }
    if let Some(budget) = config.loading.max_adapter_bytes {
        adapter_budget_problem(&config, &sizes, budget.0).map_or(Ok(()), |p| {
            Err(SetupError::new("loading.max-adapter-bytes", p))
        })?;
    }
    let mut tenants = HashMap::new();
    let body_kib = (config.connections.body_memory.0 / 1024) as usize;
    let frame_kib = (config.max_frame.0 as usize).div_ceil(1024);
    let share_kib = (body_kib / config.tenants.len().max(1))
        .max(frame_kib)
        .min(tokio::sync::Semaphore::MAX_PERMITS);
    for (id, tenant) in &config.tenants {
        let root = tenant.data_dir.clone().unwrap_or_else(|| home.tenants());
        let data =
            Tenant::open(&root, id).map_err(|e| SetupError::new(format!("tenant `{id}`"), e))?;
        let limits = tenant
            .limits
            .apply(&Limits::default())
            .map_err(|e| SetupError::new(format!("tenant `{id}` limits"), e))?;
        let limiter = match (previous.and_then(|p| p.tenants.get(id)), control) {
            (Some(t), _) if t.config.rate == tenant.rate => t.limiter.clone(),
            (Some(t), _) => Arc::new(t.limiter.successor(tenant.rate.clone())),
            (None, Some(control)) => {
                if used_today.is_none() {
                    used_today = Some(
                        control
                            .used_today()
                            .await
                            .map_err(|e| SetupError::new("the usage ledger", e))?,
                    );
                }
                let used = used_today.as_ref().and_then(|u| u.get(id)).copied();
                let limiter = RateLimiter::metered(
                    tenant.rate.clone(),
                    id,
                    control.ledger.clone(),
                    used.unwrap_or(0),
                );
                Arc::new(limiter.in_fleet(fleet, id))
            }
            (None, None) => Arc::new(RateLimiter::new(tenant.rate.clone()).in_fleet(fleet, id)),
        };
        let mut pipelines = BTreeMap::new();
        for (name, path) in &tenant.pipelines {
            let parsed = pipeline::load(path)
                .map_err(|e| SetupError::new(format!("tenant `{id}` pipeline `{name}`"), e))?;
            // Requests run components as built; builds happen here only.
            pipeline::Runner::build_components(&parsed)
                .await
                .map_err(|e| SetupError::new(format!("tenant `{id}` pipeline `{name}`"), e))?;
            pipelines.insert(name.clone(), Arc::new(parsed));
        }
        let component = match &tenant.component {
            Some(component) => Some(load_tenant_component(sandbox, id, &component.0).await?),
            None => None,
        };
        tenants.insert(
            id.clone(),
            Arc::new(TenantRuntime {
                id: id.clone(),
                config: tenant.clone(),
                data,
                limits,
                limiter,
                pipelines,
                component,
                body_share: Arc::new(tokio::sync::Semaphore::new(share_kib)),
            }),
        );
    }
    let keys = KeyRing::new(
        config
            .tenants
            .iter()
            .map(|(id, t)| (id.clone(), t.api_keys.clone()))
            .collect(),
    );
    let adapter_bytes = (sizes.iter()).map(|(n, b)| (n.to_string(), *b)).collect();
    Ok(Runtime {
        config,
        keys,
        tenants,
        models,
        adapters,
        adapter_bytes,
    })
}

/// Why `budget` could let one tenant keep the others' adapters out: it must
/// hold all of one tenant's adapters in use at once and still the largest
/// other one (adapters in use are never dropped).
fn adapter_budget_problem(
    config: &ServerConfig,
    sizes: &BTreeMap<&str, u64>,
    budget: u64,
) -> Option<String> {
    let largest = sizes.values().copied().max().unwrap_or(0);
    let (tenant, held) = (config.tenants.iter())
        .map(|(id, t)| {
            let held: u64 = (t.adapters.iter())
                .filter_map(|a| sizes.get(a.as_str()))
                .sum();
            (id, held)
        })
        .max_by_key(|(_, held)| *held)?;
    (held + largest > budget).then(|| {
        format!(
            "{budget} bytes cannot hold tenant `{tenant}`'s adapters ({held} bytes) and the largest adapter ({largest}) besides: \
             with its adapters in use, that tenant would keep the others' out (raise it to at least {})",
            held + largest
        )
    })
}

/// Builds tenant `id`'s component if it is stale, then compiles it.
async fn load_tenant_component(
    sandbox: &Sandbox,
    id: &str,
    source: &ComponentSource,
) -> Result<LoadedComponent, SetupError> {
    let path = pipeline::ensure_built(id, source)
        .await
        .map_err(|e| SetupError::new(format!("tenant `{id}`"), e))?;
    let component = sandbox
        .load(id, &path)
        .await
        .map_err(|e| SetupError::new(format!("tenant `{id}` component"), e))?;
    if !component.is_tenant() {
        return Err(SetupError::new(
            format!("tenant `{id}` component {}", path.display()),
            "it does not export the `tenant` world's `handle`",
        ));
    }
    Ok(component)
}
