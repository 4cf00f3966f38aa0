//! The sandbox: runs tenant components under fuel, memory, table, instance and
//! wall-clock limits, with a private directory and no other ambient authority.
//!
//! One [`Sandbox`] per process owns the wasmtime engine, the linker with the
//! host's implementation of `realm:inference`, and the compiled-component
//! cache. Every call gets a fresh `Store`, so a guest that breaks a limit takes
//! down only its own call.

mod bindings;
mod cache;
mod compat;
mod engine;
mod error;
mod host_kv;
mod host_llm;
mod host_log;
mod inspect;
mod kv_store;
mod limits;
mod output;
mod state;
mod tenant;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use bindings::step::{Step, StepPre};
use bindings::tenant::{Tenant as TenantWorld, TenantPre};
use output::{GuestOutput, Stream};
use state::GuestState;

pub use cache::CacheSource;
pub use engine::{EPOCH_TICK, MAX_CONCURRENT_INSTANCES, MAX_WASM_STACK};
pub use error::SandboxError;
pub use host_llm::ModelAccess;
pub use inspect::ComponentReport;
pub use kv_store::{KvError, KvStore};
pub use limits::{ByteSize, LimitOverrides, Limits, MAX_GUEST_MEMORY};
pub use tenant::Tenant;

/// Fuel a guest burns between yields to the async executor, so a spinning
/// guest cannot starve other calls on the same thread.
const FUEL_YIELD_INTERVAL: u64 = 1_000_000;

/// Extra wall time granted beyond a guest's epoch deadline before the host
/// abandons the call outright (covers time blocked in host calls).
const DEADLINE_GRACE: Duration = Duration::from_millis(100);

/// Settings for [`Sandbox::new`].
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    /// Where compiled components are cached across runs; `None` keeps them in memory only.
    pub cache_dir: Option<PathBuf>,
}

/// The process-wide component host.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<GuestState>,
    cache: cache::ComponentCache,
    _ticker: engine::EpochTicker,
}

/// A compiled component, checked against Realm's worlds and ready to instantiate.
#[derive(Clone)]
pub struct LoadedComponent {
    name: Arc<str>,
    hash: String,
    source: CacheSource,
    step: Option<StepPre<GuestState>>,
    tenant: Option<TenantPre<GuestState>>,
}

impl LoadedComponent {
    /// The name the component is known by (for logs and errors).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// SHA-256 of the component's bytes.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Whether this load compiled the component or found it cached.
    pub fn cache_source(&self) -> CacheSource {
        self.source
    }

    /// True if the component exports the `step` world's `run`.
    pub fn is_step(&self) -> bool {
        self.step.is_some()
    }

    /// True if the component exports the `tenant` world's `handle`.
    pub fn is_tenant(&self) -> bool {
        self.tenant.is_some()
    }
}

/// What one guest call may use: whose data, which limits, which models.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The tenant the call runs for.
    pub tenant: Tenant,
    /// Limits of this call.
    pub limits: Limits,
    /// Models the guest may call.
    pub models: ModelAccess,
}

/// A finished guest call.
#[derive(Debug, Clone)]
pub struct CallResult {
    /// The JSON document the guest returned.
    pub output: String,
    /// Fuel the call consumed.
    pub fuel_used: u64,
    /// Wall time of instantiation plus the call.
    pub elapsed: Duration,
}

/// Why a guest call produced no result before its deadline.
enum CallFailure {
    /// Refused before running (the component lacks the export).
    Refused(SandboxError),
    /// Trapped while instantiating or running: out of fuel, memory, a
    /// guest panic — told apart by [`classify`].
    Trapped(wasmtime::Error),
}

/// Which export a call enters.
#[derive(Clone, Copy)]
enum Entry {
    Run,
    Handle,
}

impl Sandbox {
    /// Creates the engine, the linker and the epoch thread.
    pub fn new(config: SandboxConfig) -> Result<Self, SandboxError> {
        let engine = engine::new_engine()?;
        let mut linker = Linker::new(&engine);
        let setup = |e: wasmtime::Error| SandboxError::Setup(format!("{e:#}"));
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(setup)?;
        Step::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state).map_err(setup)?;
        // Guests built against realm:inference@0.1.0 import its interfaces.
        bindings::v0_1::Step::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(setup)?;
        let ticker = engine::EpochTicker::start(engine.clone())?;
        Ok(Sandbox {
            cache: cache::ComponentCache::new(config.cache_dir),
            engine,
            linker,
            _ticker: ticker,
        })
    }

    /// Compiles (or fetches from cache) the component at `path` and checks which
    /// of Realm's worlds it fits.
    pub async fn load(&self, name: &str, path: &Path) -> Result<LoadedComponent, SandboxError> {
        let (component, hash, source) = self.cache.load(&self.engine, path).await?;
        let mismatch = |message: String| SandboxError::WorldMismatch {
            component: name.to_string(),
            world: "step or tenant",
            message,
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| mismatch(missing_import_hint(format!("{e:#}"))))?;
        let step = StepPre::new(pre.clone()).ok();
        let tenant = TenantPre::new(pre).ok();
        if step.is_none() && tenant.is_none() {
            return Err(mismatch(
                "it exports neither `run: func(string) -> result<string, string>` (step world) \
                 nor `handle: func(string) -> result<string, string>` (tenant world)"
                    .into(),
            ));
        }
        tracing::debug!(component = name, %hash, ?source, "component loaded");
        Ok(LoadedComponent {
            name: name.into(),
            hash,
            source,
            step,
            tenant,
        })
    }

    /// Runs a `step`-world component's `run` on `input` (a JSON document).
    pub async fn run_step(
        &self,
        component: &LoadedComponent,
        call: &CallContext,
        input: &str,
    ) -> Result<CallResult, SandboxError> {
        self.invoke(component, call, Entry::Run, input).await
    }

    /// Runs a `tenant`-world component's `handle` on `request` (a JSON document).
    pub async fn handle(
        &self,
        component: &LoadedComponent,
        call: &CallContext,
        request: &str,
    ) -> Result<CallResult, SandboxError> {
        self.invoke(component, call, Entry::Handle, request).await
    }

    async fn invoke(
        &self,
        component: &LoadedComponent,
        call: &CallContext,
        entry: Entry,
        input: &str,
    ) -> Result<CallResult, SandboxError> {
        let started = Instant::now();
        let limits = &call.limits;
        let mut store = self.new_store(component, call)?;
        let name = component.name();
        let wrong_world = |world: &'static str, export: &str| SandboxError::WorldMismatch {
            component: name.to_string(),
            world,
            message: format!("it does not export `{export}`"),
        };
        let work = async {
            match entry {
                Entry::Run => {
                    let pre = component
                        .step
                        .as_ref()
                        .ok_or_else(|| CallFailure::Refused(wrong_world("step", "run")))?;
                    let instance: Step = pre
                        .instantiate_async(&mut store)
                        .await
                        .map_err(CallFailure::Trapped)?;
                    instance
                        .call_run(&mut store, input)
                        .await
                        .map_err(CallFailure::Trapped)
                }
                Entry::Handle => {
                    let pre = component
                        .tenant
                        .as_ref()
                        .ok_or_else(|| CallFailure::Refused(wrong_world("tenant", "handle")))?;
                    let instance: TenantWorld = pre
                        .instantiate_async(&mut store)
                        .await
                        .map_err(CallFailure::Trapped)?;
                    instance
                        .call_handle(&mut store, input)
                        .await
                        .map_err(CallFailure::Trapped)
                }
            }
        };
        let outcome = tokio::time::timeout(limits.timeout + DEADLINE_GRACE, work).await;
        let result = match outcome {
            Err(_elapsed) => {
                return Err(SandboxError::Timeout {
                    component: name.to_string(),
                    limit: limits.timeout,
                });
            }
            Ok(Err(CallFailure::Refused(error))) => return Err(error),
            Ok(Err(CallFailure::Trapped(trap))) => {
                return Err(classify(trap, &store, name, limits));
            }
            Ok(Ok(result)) => result,
        };
        let fuel_used = limits.fuel - store.get_fuel().unwrap_or(0);
        let output = result.map_err(|message| SandboxError::Guest {
            component: name.to_string(),
            message,
        })?;
        if output.len() as u64 > limits.output.0 {
            return Err(SandboxError::OutputTooLarge {
                component: name.to_string(),
                limit: limits.output,
                size: output.len(),
            });
        }
        Ok(CallResult {
            output,
            fuel_used,
            elapsed: started.elapsed(),
        })
    }

    fn new_store(
        &self,
        component: &LoadedComponent,
        call: &CallContext,
    ) -> Result<Store<GuestState>, SandboxError> {
        let limits = &call.limits;
        let tenant_id = call.tenant.id_arc();
        let log_budget = limits.log.0 as usize;
        let stderr = GuestOutput::new(
            tenant_id.clone(),
            component.name.clone(),
            Stream::Stderr,
            log_budget,
        );
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(GuestOutput::new(
            tenant_id.clone(),
            component.name.clone(),
            Stream::Stdout,
            log_budget,
        ))
        .stderr(stderr.clone())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
        let files = call.tenant.files_dir();
        wasi.preopened_dir(files, "/", FsPerms::ReadWrite)
            .map_err(|e| SandboxError::DataDir {
                path: files.to_path_buf(),
                source: std::io::Error::other(format!("{e:#}")),
            })?;
        let state = GuestState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: limits::GuestLimiter::new(limits),
            tenant: tenant_id,
            component: component.name.clone(),
            kv: call.tenant.kv(),
            models: call.models.clone(),
            stderr,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        let setup = |e: wasmtime::Error| SandboxError::Setup(format!("{e:#}"));
        store.set_fuel(limits.fuel).map_err(setup)?;
        store
            .fuel_async_yield_interval(Some(FUEL_YIELD_INTERVAL))
            .map_err(setup)?;
        store.epoch_deadline_trap();
        store.set_epoch_deadline(engine::ticks_for(limits.timeout));
        Ok(store)
    }

    /// Describes the component at `path`: its imports, exports and the worlds it fits.
    pub async fn inspect(&self, path: &Path) -> Result<ComponentReport, SandboxError> {
        let (component, hash, _) = self.cache.load(&self.engine, path).await?;
        Ok(inspect::report(
            &self.engine,
            &self.linker,
            &component,
            hash,
        ))
    }
}

/// `message` from the linker, with advice when the missing import is one
/// Realm withholds on purpose.
fn missing_import_hint(message: String) -> String {
    if message.contains("wasi:http/") {
        format!(
            "{message} (guests get no network, so `wasi:http` is not provided; a jco \
             StarlingMonkey component must be built with `-d http fetch-event`)"
        )
    } else {
        message
    }
}

/// `message`, followed by the last lines the guest wrote to stderr (its panic
/// message or traceback), if any.
fn with_stderr_tail(message: String, store: &Store<GuestState>) -> String {
    let tail = store.data().stderr.tail();
    if tail.is_empty() {
        return message;
    }
    format!("{message}; its stderr ended with:\n  {}", tail.join("\n  "))
}

/// Turns a failed call into the error naming the limit or trap behind it.
fn classify(
    error: wasmtime::Error,
    store: &Store<GuestState>,
    name: &str,
    limits: &Limits,
) -> SandboxError {
    let component = name.to_string();
    match store.data().limiter.breach {
        Some(limits::Breach::Memory { requested }) => {
            return SandboxError::MemoryLimit {
                component,
                limit: limits.memory,
                requested,
            };
        }
        Some(limits::Breach::Table { requested }) => {
            return SandboxError::TableLimit {
                component,
                limit: limits.table_elements,
                requested,
            };
        }
        None => {}
    }
    if error
        .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
    {
        return SandboxError::Busy {
            limit: MAX_CONCURRENT_INSTANCES,
        };
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => SandboxError::OutOfFuel {
            component,
            limit: limits.fuel,
        },
        Some(Trap::Interrupt) => SandboxError::Timeout {
            component,
            limit: limits.timeout,
        },
        Some(Trap::StackOverflow) => SandboxError::StackOverflow {
            component,
            limit: MAX_WASM_STACK,
        },
        Some(trap) => SandboxError::Trap {
            component,
            message: with_stderr_tail(trap.to_string(), store),
        },
        None => SandboxError::Trap {
            component,
            message: with_stderr_tail(format!("{error:#}"), store),
        },
    }
}
