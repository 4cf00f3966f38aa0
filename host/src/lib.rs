//! Realm's host: sandboxed WASI components that call shared LLMs, driven by
//! pipelines (`realm-host run`) and a multi-tenant server (`realm-host serve`).

pub mod cancel;
pub mod control;
pub mod home;
pub mod inference;
pub mod metering;
pub mod pipeline;
pub mod registry;
pub mod sandbox;
pub mod server;
