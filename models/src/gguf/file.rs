//! Parsing GGUF files into metadata and a tensor index over the mapped bytes.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Deref;
use std::path::Path;

use memmap2::{Mmap, UncheckedAdvice};

use super::error::GgufError;
use super::metadata::{MetaValue, MetaValueType};
use super::types::GgmlType;
use super::{DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS};

/// Longest metadata string or tensor name accepted (the longest real ones,
/// chat templates, are tens of KB).
const MAX_STRING: u64 = 16 << 20;
/// Deepest nesting of metadata arrays accepted.
const MAX_ARRAY_DEPTH: u32 = 2;

/// Where a tensor's bytes are and how to read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost (contiguous) first, as ggml stores them.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the file.
    pub offset: usize,
    /// Size of the data in bytes (0 when the type is unknown).
    pub size: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file. Tensor data stays in the mapped file until read.
pub struct GgufFile {
    bytes: Bytes,
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses the file at `path`.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process. Realm's
        // model store is not modified while a model is loaded; a truncation
        // by another process would fault, as with any mapped file.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(Bytes::Mapped(map))
    }

    /// Parses a GGUF file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Bytes::Owned(bytes))
    }

    fn parse(bytes: Bytes) -> Result<Self, GgufError> {
        let mut r = Reader {
            bytes: &bytes,
            pos: 0,
        };
        let magic: [u8; 4] = r.take(4, "magic")?.try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let tensor_count = r.u64("tensor count")?;
        let kv_count = r.u64("metadata count")?;
        r.check_count(kv_count, 12, "metadata entries")?;
        let mut metadata = Vec::new();
        for _ in 0..kv_count {
            let key = r.string("metadata key")?;
            let ty = r.value_type("metadata value type")?;
            let value = r.value(ty, 0)?;
            metadata.push((key, value));
        }
        let index: HashMap<String, usize> = metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        if index.len() != metadata.len() {
            return Err(GgufError::Malformed("duplicate metadata key".into()));
        }
        let alignment = match index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(GgufError::Malformed(format!(
                        "general.alignment {v} is not a power of two up to 1 MiB"
                    )));
                }
            },
        };

        r.check_count(tensor_count, 24, "tensor infos")?;
        let mut raw = Vec::new();
        for _ in 0..tensor_count {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Malformed(format!(
                    "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dimension")?);
            }
            let type_id = r.u32("tensor type")?;
            let offset = r.u64("tensor offset")?;
            raw.push((name, dims, GgmlType::from_id(type_id), offset));
        }
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ggml_type, offset) in raw {
            let elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    GgufError::Malformed(format!("tensor `{name}` has too many elements"))
                })?;
            let size = match ggml_type.block_layout() {
                None => 0,
                Some(_) => ggml_type.bytes_for(elements).ok_or_else(|| {
                    GgufError::Malformed(format!(
                        "tensor `{name}` has {elements} elements, not a whole number of {ggml_type} blocks"
                    ))
                })?,
            };
            if offset % alignment != 0 {
                return Err(GgufError::Malformed(format!(
                    "tensor `{name}` data offset {offset} is not aligned to {alignment}"
                )));
            }
            let start = data_start
                .checked_add(offset)
                .filter(|s| s.checked_add(size).is_some_and(|end| end <= file_len))
                .ok_or(GgufError::Truncated {
                    what: "tensor data",
                    offset: (data_start.saturating_add(offset)).min(usize::MAX as u64) as usize,
                    needed: size,
                    available: file_len.saturating_sub(data_start.saturating_add(offset)) as usize,
                })?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset: start as usize,
                size: size as usize,
            });
        }
        let tensor_index: HashMap<String, usize> = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        if tensor_index.len() != tensors.len() {
            return Err(GgufError::Malformed("duplicate tensor name".into()));
        }
        Ok(GgufFile {
            bytes,
            version,
            metadata,
            index,
            tensors,
            tensor_index,
            alignment,
        })
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of tensor data in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// The metadata value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// The metadata value of `key`, or an error naming it.
    pub fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    /// `key` as an unsigned integer.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| wrong_type(key, "an unsigned integer", v))
    }

    /// `key` as a float.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| wrong_type(key, "a number", v))
    }

    /// `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| wrong_type(key, "a string", v))
    }

    /// `key` as an array.
    pub fn get_array(&self, key: &str) -> Result<&[MetaValue], GgufError> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| wrong_type(key, "an array", v))
    }

    /// All tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensor_index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))
    }

    /// `len` bytes at `offset`, for tensor data located by a [`TensorInfo`] of this file.
    pub(crate) fn bytes_at(&self, offset: usize, len: usize) -> &[u8] {
        &self.bytes[offset..offset + len]
    }

    /// Lets the pages holding the `len` bytes at `offset` go from memory (a
    /// hint: they are read back from the file if touched again). For tensor
    /// data that was copied out, so the copy does not double the memory.
    pub(crate) fn release(&self, offset: usize, len: usize) {
        if let Bytes::Mapped(map) = &self.bytes {
            // SAFETY: the map is a read-only shared mapping of the file, so
            // dropping pages loses nothing: a later read faults them back in
            // from the file. (An error only means the hint was not taken.)
            let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, offset, len) };
        }
    }

    /// The raw bytes of `tensor` (checked against the file length when parsed).
    pub fn tensor_bytes(&self, tensor: &TensorInfo) -> &[u8] {
        &self.bytes[tensor.offset..tensor.offset + tensor.size]
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &MetaValue) -> GgufError {
    GgufError::WrongType {
        key: key.to_string(),
        expected,
        found: format!("{:?}", found.value_type()).to_lowercase(),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        let available = self.bytes.len() - self.pos;
        if n > available as u64 {
            return Err(GgufError::Truncated {
                what,
                offset: self.pos,
                needed: n,
                available,
            });
        }
        let slice = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(slice)
    }

    /// Refuses counts that could not fit in the rest of the file, before any allocation.
    fn check_count(&self, count: u64, min_size: u64, what: &'static str) -> Result<(), GgufError> {
        let available = self.bytes.len() - self.pos;
        if count.saturating_mul(min_size) > available as u64 {
            return Err(GgufError::Truncated {
                what,
                offset: self.pos,
                needed: count.saturating_mul(min_size),
                available,
            });
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        if len > MAX_STRING {
            return Err(GgufError::Malformed(format!(
                "{what} of {len} bytes is longer than {MAX_STRING}"
            )));
        }
        let bytes = self.take(len, what)?;
        // Some tokenizers store invalid UTF-8 pieces; keep them readable rather than failing.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value_type(&mut self, what: &'static str) -> Result<MetaValueType, GgufError> {
        let id = self.u32(what)?;
        MetaValueType::from_id(id)
            .ok_or_else(|| GgufError::Malformed(format!("unknown metadata value type {id}")))
    }

    fn value(&mut self, ty: MetaValueType, depth: u32) -> Result<MetaValue, GgufError> {
        const W: &str = "metadata value";
        Ok(match ty {
            MetaValueType::U8 => MetaValue::U8(self.array::<1>(W)?[0]),
            MetaValueType::I8 => MetaValue::I8(self.array::<1>(W)?[0] as i8),
            MetaValueType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(W)?)),
            MetaValueType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(W)?)),
            MetaValueType::U32 => MetaValue::U32(self.u32(W)?),
            MetaValueType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(W)?)),
            MetaValueType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(W)?)),
            MetaValueType::Bool => match self.array::<1>(W)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(GgufError::Malformed(format!("bool metadata value {b}"))),
            },
            MetaValueType::String => MetaValue::String(self.string(W)?),
            MetaValueType::U64 => MetaValue::U64(self.u64(W)?),
            MetaValueType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(W)?)),
            MetaValueType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(W)?)),
            MetaValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Malformed(
                        "metadata arrays nested too deeply".into(),
                    ));
                }
                let item = self.value_type("array item type")?;
                let count = self.u64("array length")?;
                self.check_count(count, item.min_size(), "array items")?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item, depth + 1)?);
                }
                MetaValue::Array(item, items)
            }
        })
    }
}
