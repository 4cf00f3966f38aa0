//! Realm's host: sandboxed WASI components that call shared LLMs, driven by
//! pipelines (`realm-host run`) and, later, a multi-tenant server.

pub mod home;
pub mod inference;
pub mod pipeline;
pub mod registry;
pub mod sandbox;
