//! Host-side bindings for the `realm:inference` WIT package.
//!
//! The `step` world owns the generated interface types; the `tenant` world
//! reuses them so one host implementation serves both worlds.

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

pub use step::realm::inference::{kv, llm, log, types};
