//! GGUF files: a memory-mapped reader that trusts nothing in the file, and a
//! writer used to make small test models.
//!
//! Layout (little-endian): magic `GGUF`, version (2 or 3), tensor count,
//! metadata count, metadata key/values, tensor infos, then tensor data at the
//! next multiple of `general.alignment` (default 32).

mod error;
mod file;
mod merge;
mod metadata;
mod types;
mod writer;

pub use error::GgufError;
pub use file::{GgufFile, TensorInfo};
pub use merge::merge_split;
pub use metadata::{MetaValue, MetaValueType};
pub use types::GgmlType;
pub use writer::GgufWriter;

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of tensor data when the file does not set `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a tensor may have.
pub const MAX_DIMS: usize = 4;
