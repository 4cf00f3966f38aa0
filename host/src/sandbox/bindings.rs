//! Host-side bindings for the `realm:inference` WIT package.
//!
//! The `step` world owns the generated interface types; the `tenant` world
//! reuses them so one host implementation serves both worlds. Guests built
//! against the older `realm:inference@0.1.0` import its interfaces, which
//! [`v0_1`] binds (see `compat.rs`).

/// Bindings for the `step` world (pipeline steps).
pub mod step {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "step",
        imports: { default: async },
        exports: { default: async },
        with: {
            "realm:inference/llm.token-stream": crate::sandbox::host_llm::TokenStream,
            "realm:inference/llm.session": crate::sandbox::host_llm::Session,
        },
    });
}

/// Bindings for the `tenant` world (a tenant's request handler).
pub mod tenant {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "tenant",
        imports: { default: async },
        exports: { default: async },
        with: {
            "realm:inference": crate::sandbox::bindings::step::realm::inference,
        },
    });
}

/// Bindings for `realm:inference@0.1.0` (wit/archive/realm-0.1.0.wit): its
/// worlds import the same interfaces, so the `step` world binds them all.
pub mod v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/archive/realm-0.1.0.wit",
        world: "step",
        imports: { default: async },
        exports: { default: async },
        with: {
            "realm:inference/llm.token-stream": crate::sandbox::host_llm::TokenStream,
            "realm:inference/llm.session": crate::sandbox::host_llm::Session,
        },
    });
}

pub use step::realm::inference::{kv, llm, log, types};
