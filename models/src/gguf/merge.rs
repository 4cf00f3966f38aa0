//! Joining a split model (llama.cpp's `gguf-split`: parts that each hold
//! some of the tensors, numbered by `split.no` of `split.count`, the first
//! holding the metadata) back into one GGUF file, streaming the tensor data.

use std::io::Write;

use super::file::GgufFile;
use super::{DEFAULT_ALIGNMENT, GgufError, MetaValue};

/// Writes to `out` the one file `parts` (in order) were split from: the
/// first part's metadata without the `split.*` keys, every part's tensors.
pub fn merge_split(parts: &[GgufFile], out: &mut dyn Write) -> Result<(), GgufError> {
    let bad = |m: String| Err(GgufError::Malformed(m));
    let Some(first) = parts.first() else {
        return bad("a split model needs at least one part".into());
    };
    for (i, part) in parts.iter().enumerate() {
        let no = part.get("split.no").and_then(MetaValue::as_u64);
        let count = part.get("split.count").and_then(MetaValue::as_u64);
        if no != Some(i as u64) || count != Some(parts.len() as u64) {
            return bad(format!(
                "part {} says it is part {no:?} of {count:?}, not {i} of {}",
                i + 1,
                parts.len()
            ));
        }
    }
    let tensors: Vec<_> = parts
        .iter()
        .flat_map(|p| p.tensors().iter().map(move |t| (p, t)))
        .collect();
    if let Some(want) = first.get("split.tensors.count").and_then(MetaValue::as_u64)
        && want != tensors.len() as u64
    {
        return bad(format!(
            "the parts hold {} tensors; the first says {want}",
            tensors.len()
        ));
    }
    if let Some((_, t)) = tensors
        .iter()
        .find(|(_, t)| t.size == 0 && t.elements() > 0)
    {
        return bad(format!("tensor `{}` has a type of unknown size", t.name));
    }
    let metadata: Vec<(String, MetaValue)> = first
        .metadata()
        .iter()
        .filter(|(k, _)| !k.starts_with("split."))
        .cloned()
        .collect();
    let align = first
        .get("general.alignment")
        .and_then(MetaValue::as_u64)
        .unwrap_or(DEFAULT_ALIGNMENT) as usize;
    let infos = tensors
        .iter()
        .map(|(_, t)| (t.name.as_str(), t.dims.as_slice(), t.ggml_type, t.size));
    let (header, offsets) = super::writer::header(&metadata, infos, align);
    let io = |e: std::io::Error| GgufError::Malformed(format!("writing the merged file: {e}"));
    out.write_all(&header).map_err(io)?;
    let mut written = 0usize;
    for ((part, t), offset) in tensors.iter().zip(offsets) {
        out.write_all(&vec![0u8; offset - written]).map_err(io)?;
        out.write_all(part.bytes_at(t.offset, t.size)).map_err(io)?;
        written = offset + t.size;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufWriter;

    fn part(no: u16, count: u16, total: i32, tensors: &[(&str, f32)], meta: bool) -> GgufFile {
        let mut w = GgufWriter::new();
        if meta {
            w.meta("general.architecture", MetaValue::String("llama".into()));
        }
        w.meta("split.no", MetaValue::U16(no))
            .meta("split.count", MetaValue::U16(count))
            .meta("split.tensors.count", MetaValue::I32(total));
        for (name, v) in tensors {
            w.tensor_f32(name, &[3], &[*v, v + 1.0, v + 2.0]);
        }
        GgufFile::from_bytes(w.to_bytes()).unwrap()
    }

    #[test]
    fn parts_join_into_the_whole_file() {
        let first = || part(0, 2, 3, &[("a", 1.0)], true);
        let second = || part(1, 2, 3, &[("b", 4.0), ("c", 7.0)], false);
        let parts = [first(), second()];
        let mut merged = Vec::new();
        merge_split(&parts, &mut merged).unwrap();
        let file = GgufFile::from_bytes(merged).unwrap();
        assert_eq!(file.get_str("general.architecture").unwrap(), "llama");
        assert!(
            file.metadata()
                .iter()
                .all(|(k, _)| !k.starts_with("split."))
        );
        let names: Vec<&str> = file.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        let c = file.tensor("c").unwrap();
        assert_eq!(file.bytes_at(c.offset, c.size)[..4], 7f32.to_le_bytes());

        let mut sink = Vec::new();
        assert!(merge_split(&[second(), first()], &mut sink).is_err());
        let miscounted = [part(0, 2, 5, &[("a", 1.0)], true), second()];
        assert!(merge_split(&miscounted, &mut sink).is_err());
    }
}
