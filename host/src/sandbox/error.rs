//! Typed errors of the sandbox: one variant per way a guest call can fail.

use std::path::PathBuf;
use std::time::Duration;

use super::limits::ByteSize;

/// Why loading or calling a guest component failed.
///
/// Limit variants name the limit and its configured value so an operator can
/// tell at a glance what to raise (or which tenant to look at).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The component file could not be read.
    #[error("cannot read component {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a valid WebAssembly component.
    #[error("{path} is not a valid WebAssembly component: {message}")]
    Compile { path: PathBuf, message: String },
    /// The component needs imports the host does not provide, or lacks the export a world requires.
    #[error("component {component} does not fit the `{world}` world: {message}")]
    WorldMismatch {
        component: String,
        world: &'static str,
        message: String,
    },
    /// The engine or a store could not be set up.
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    /// The tenant's data directory could not be prepared.
    #[error("cannot prepare data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The tenant's kv store could not be opened.
    #[error("cannot open the kv store in {path}")]
    KvStore {
        path: PathBuf,
        #[source]
        source: super::kv_store::KvError,
    },
    /// The guest used up its fuel.
    #[error("component {component} ran out of fuel (limit {limit} units)")]
    OutOfFuel { component: String, limit: u64 },
    /// The guest ran past its wall-clock deadline.
    #[error("component {component} exceeded its timeout of {}", humantime::format_duration(*.limit))]
    Timeout { component: String, limit: Duration },
    /// A guest memory tried to grow past the limit.
    #[error(
        "component {component} exceeded its memory limit of {limit} (tried to grow to {requested} bytes)"
    )]
    MemoryLimit {
        component: String,
        limit: ByteSize,
        requested: u64,
    },
    /// A guest table tried to grow past the limit.
    #[error(
        "component {component} exceeded its table limit of {limit} elements (tried to grow to {requested})"
    )]
    TableLimit {
        component: String,
        limit: u32,
        requested: u64,
    },
    /// The guest recursed past the wasm stack limit.
    #[error("component {component} overflowed its stack (limit {limit})")]
    StackOverflow { component: String, limit: ByteSize },
    /// All instance slots of the engine are in use.
    #[error("too many guest instances are running at once (limit {limit}); retry shortly")]
    Busy { limit: u32 },
    /// The guest trapped (panic, unreachable, bad memory access, ...).
    #[error("component {component} trapped: {message}")]
    Trap { component: String, message: String },
    /// The guest returned a result larger than allowed.
    #[error("component {component} returned {size} bytes, more than its output limit of {limit}")]
    OutputTooLarge {
        component: String,
        limit: ByteSize,
        size: usize,
    },
    /// The guest ran to completion and returned an error of its own.
    #[error("component {component} failed: {message}")]
    Guest { component: String, message: String },
}

impl SandboxError {
    /// A short, stable name of the error kind, for metrics labels and error codes.
    pub fn code(&self) -> &'static str {
        match self {
            SandboxError::Read { .. } => "component_unreadable",
            SandboxError::Compile { .. } => "component_invalid",
            SandboxError::WorldMismatch { .. } => "world_mismatch",
            SandboxError::Setup(_) => "sandbox_setup",
            SandboxError::DataDir { .. } | SandboxError::KvStore { .. } => "data_dir",
            SandboxError::OutOfFuel { .. } => "out_of_fuel",
            SandboxError::Timeout { .. } => "timeout",
            SandboxError::MemoryLimit { .. } => "memory_limit",
            SandboxError::TableLimit { .. } => "table_limit",
            SandboxError::StackOverflow { .. } => "stack_overflow",
            SandboxError::Busy { .. } => "busy",
            SandboxError::Trap { .. } => "guest_trap",
            SandboxError::OutputTooLarge { .. } => "output_too_large",
            SandboxError::Guest { .. } => "guest_error",
        }
    }

    /// True when the error is a resource limit the guest ran into.
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            SandboxError::OutOfFuel { .. }
                | SandboxError::Timeout { .. }
                | SandboxError::MemoryLimit { .. }
                | SandboxError::TableLimit { .. }
                | SandboxError::StackOverflow { .. }
                | SandboxError::OutputTooLarge { .. }
        )
    }
}
