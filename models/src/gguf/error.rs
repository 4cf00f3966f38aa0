//! Errors from reading GGUF files.

use std::path::PathBuf;

/// Why a GGUF file could not be read. Every malformed, truncated or hostile
/// file ends in one of these, never in a panic or an outsized allocation.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file (magic bytes are {0:?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    /// A GGUF version this reader does not know.
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    /// The file ends before a structure it declares.
    #[error(
        "file is truncated: {what} at byte {offset} needs {needed} bytes, only {available} remain"
    )]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: u64,
        available: usize,
    },
    /// A value is out of the range the format allows.
    #[error("malformed GGUF: {0}")]
    Malformed(String),
    /// A metadata key is missing.
    #[error("metadata key `{0}` is missing")]
    MissingKey(String),
    /// A metadata key has a different type than expected.
    #[error("metadata key `{key}` is {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    /// A tensor is missing.
    #[error("tensor `{0}` is missing")]
    MissingTensor(String),
    /// A tensor's element type has no reader here.
    #[error("tensor `{tensor}` has ggml type {type_id}, which this engine does not support")]
    UnsupportedType { tensor: String, type_id: u32 },
}
