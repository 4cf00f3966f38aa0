//! Per-store state: everything one guest call can reach.

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::host_llm::ModelAccess;
use super::kv_store::KvStore;
use super::limits::GuestLimiter;
use super::output::GuestOutput;

/// The data of one guest call's `Store`.
pub struct GuestState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: GuestLimiter,
    pub(crate) tenant: Arc<str>,
    pub(crate) component: Arc<str>,
    pub(crate) kv: Arc<KvStore>,
    pub(crate) models: ModelAccess,
    /// The guest's stderr, whose last lines explain a trap.
    pub(crate) stderr: GuestOutput,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}
