//! Writing GGUF files, for tests and tools that need small models.

use super::metadata::MetaValue;
use super::types::GgmlType;
use super::{DEFAULT_ALIGNMENT, MAGIC};

/// Builds a GGUF v3 file in memory.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata entry.
    pub fn meta(&mut self, key: &str, value: MetaValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor with dimensions `dims` (innermost first) and raw `data`.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, data));
        self
    }

    /// Adds an F32 tensor.
    pub fn tensor_f32(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, dims, GgmlType::F32, data)
    }

    /// The encoded file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = DEFAULT_ALIGNMENT as usize;
        let tensors = self
            .tensors
            .iter()
            .map(|(name, dims, ty, data)| (name.as_str(), dims.as_slice(), *ty, data.len()));
        let (mut out, offsets) = header(&self.metadata, tensors, align);
        let data_start = out.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off, 0);
            out.extend_from_slice(data);
        }
        out
    }
}

/// A GGUF v3 header: `metadata`, then the infos of `tensors` (name,
/// dimensions, type, bytes) with their data laid out `align` apart, padded
/// to where the data starts. Returns it and each tensor's offset in the data.
pub(crate) fn header<'a>(
    metadata: &[(String, MetaValue)],
    tensors: impl ExactSizeIterator<Item = (&'a str, &'a [u64], GgmlType, usize)>,
    align: usize,
) -> (Vec<u8>, Vec<usize>) {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_string(&mut out, key);
        out.extend_from_slice(&value.value_type().id().to_le_bytes());
        write_value(&mut out, value);
    }
    let mut offset = 0usize;
    let mut offsets = Vec::new();
    for (name, dims, ty, len) in tensors {
        write_string(&mut out, name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&ty.id().to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + len).div_ceil(align) * align;
    }
    out.resize(out.len().div_ceil(align) * align, 0);
    (out, offsets)
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, value: &MetaValue) {
    match value {
        MetaValue::U8(v) => out.push(*v),
        MetaValue::I8(v) => out.push(*v as u8),
        MetaValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Bool(v) => out.push(u8::from(*v)),
        MetaValue::String(s) => write_string(out, s),
        MetaValue::Array(ty, items) => {
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item);
            }
        }
        MetaValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufError, GgufFile, MetaValueType};

    fn sample() -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", MetaValue::String("llama".into()))
            .meta("llama.block_count", MetaValue::U32(2))
            .meta("eps", MetaValue::F32(1e-5))
            .meta("flag", MetaValue::Bool(true))
            .meta(
                "tokens",
                MetaValue::Array(
                    MetaValueType::String,
                    vec![MetaValue::String("a".into()), MetaValue::String("b".into())],
                ),
            )
            .tensor_f32("w", &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
            .tensor_f32("v", &[2], &[7.0, 8.0]);
        w.to_bytes()
    }

    #[test]
    fn round_trips_metadata_and_tensors() {
        let f = GgufFile::from_bytes(sample()).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
        assert!((f.get_f64("eps").unwrap() - 1e-5).abs() < 1e-9);
        assert_eq!(f.get_array("tokens").unwrap().len(), 2);
        let w = f.tensor("w").unwrap();
        assert_eq!(w.dims, vec![3, 2]);
        assert_eq!(w.offset % 32, 0);
        let bytes = f.tensor_bytes(w);
        assert_eq!(f32::from_le_bytes(bytes[20..24].try_into().unwrap()), 6.0);
        let v = f.tensor("v").unwrap();
        assert_eq!(
            f32::from_le_bytes(f.tensor_bytes(v)[4..8].try_into().unwrap()),
            8.0
        );
        assert!(matches!(
            f.get_str("llama.block_count"),
            Err(GgufError::WrongType { .. })
        ));
        assert!(matches!(f.tensor("nope"), Err(GgufError::MissingTensor(_))));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample();
        for len in 0..bytes.len() - 1 {
            let cut = bytes[..len].to_vec();
            assert!(
                GgufFile::from_bytes(cut).is_err(),
                "truncated to {len} bytes parsed"
            );
        }
    }

    #[test]
    fn hostile_headers_are_refused_cheaply() {
        let mut bytes = sample();
        bytes[0] = b'X';
        assert!(matches!(
            GgufFile::from_bytes(bytes),
            Err(GgufError::BadMagic(_))
        ));

        let mut bytes = sample();
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            GgufFile::from_bytes(bytes),
            Err(GgufError::UnsupportedVersion(1))
        ));

        // A metadata count of 2^60 must be refused before allocating.
        let mut bytes = sample();
        bytes[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(
            GgufFile::from_bytes(bytes),
            Err(GgufError::Truncated { .. })
        ));

        // A string length larger than the file.
        let mut bytes = sample();
        bytes[24..32].copy_from_slice(&(u64::MAX).to_le_bytes());
        assert!(GgufFile::from_bytes(bytes).is_err());

        // Flip every byte in turn: parsing may fail, but must never panic.
        let bytes = sample();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xFF;
            let _ = GgufFile::from_bytes(b);
        }
    }
}
