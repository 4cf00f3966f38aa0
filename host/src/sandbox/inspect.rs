//! `realm-host component inspect`: what a component imports and exports, and
//! which of Realm's worlds it fits.

use serde::Serialize;
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use super::bindings::step::StepPre;
use super::bindings::tenant::TenantPre;
use super::state::GuestState;

/// A component's interface, as `component inspect` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentReport {
    /// SHA-256 of the component's bytes.
    pub sha256: String,
    /// Imported interfaces and functions, by name.
    pub imports: Vec<String>,
    /// Exported interfaces and functions, by name.
    pub exports: Vec<String>,
    /// Realm worlds the component can run as (`step`, `tenant`).
    pub worlds: Vec<&'static str>,
    /// Why it fits no world, when `worlds` is empty.
    pub problem: Option<String>,
}

pub(crate) fn report(
    engine: &Engine,
    linker: &Linker<GuestState>,
    component: &Component,
    sha256: String,
) -> ComponentReport {
    let ty = component.component_type();
    let imports = ty
        .imports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let exports = ty
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let mut worlds = Vec::new();
    let problem = match linker.instantiate_pre(component) {
        Ok(pre) => {
            if StepPre::new(pre.clone()).is_ok() {
                worlds.push("step");
            }
            if TenantPre::new(pre).is_ok() {
                worlds.push("tenant");
            }
            worlds.is_empty().then(|| {
                "it exports neither `run` (step world) nor `handle` (tenant world)".to_string()
            })
        }
        Err(e) => Some(format!(
            "it needs an import the host does not provide: {e:#}"
        )),
    };
    ComponentReport {
        sha256,
        imports,
        exports,
        worlds,
        problem,
    }
}
