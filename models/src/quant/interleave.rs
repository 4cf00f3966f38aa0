//! 4-bit weights regrouped at load for the AVX2 kernels: eight rows' blocks
//! side by side, in the order the kernels' registers want them, in the same
//! number of bytes as the file's encoding.
//!
//! Per group of eight rows and per block (32 weights of each row): the eight
//! rows' f16 scales, then (Q4_1) their f16 minimums, then four 32-byte
//! registers: register `k`, 4-byte lane `j`, holds nibble bytes `4k..4k + 4`
//! of row `j`'s block (weights `4k..4k + 4` in the low nibbles, `16 + 4k..`
//! in the high ones). The batched kernel then unpacks a tile with one mask
//! and one shift per register, and the single-vector kernel reads eight rows
//! with four loads and one broadcast per activation dword, instead of
//! gathering eight rows' scattered blocks every time.

use crate::gguf::GgmlType;

/// Rows per interleaved group.
pub(crate) const GROUP_ROWS: usize = 8;

/// Bytes of a block's header (scale, and minimum for Q4_1) before its 16
/// nibble bytes, for the types that interleave.
pub(crate) fn header_bytes(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::Q4_0 => Some(2),
        GgmlType::Q4_1 => Some(4),
        _ => None,
    }
}

/// `rows` (whole rows of `row_bytes`, a multiple of [`GROUP_ROWS`] of them)
/// of `ty`, a type [`header_bytes`] knows, interleaved into `out`.
pub(crate) fn interleave(ty: GgmlType, rows: &[u8], row_bytes: usize, out: &mut Vec<u8>) {
    let header = header_bytes(ty).expect("an interleaved type");
    let block = header + 16;
    assert!(row_bytes.is_multiple_of(block) && rows.len().is_multiple_of(GROUP_ROWS * row_bytes));
    out.clear();
    out.resize(rows.len(), 0);
    for (group, src) in out
        .chunks_exact_mut(GROUP_ROWS * row_bytes)
        .zip(rows.chunks_exact(GROUP_ROWS * row_bytes))
    {
        for (i, dst) in group.chunks_exact_mut(GROUP_ROWS * block).enumerate() {
            for (j, row) in src.chunks_exact(row_bytes).enumerate() {
                let b = &row[i * block..(i + 1) * block];
                place(dst, header, j, b);
            }
        }
    }
}

/// Row `j`'s block `b` into the group's block `dst` (see the module doc).
fn place(dst: &mut [u8], header: usize, j: usize, b: &[u8]) {
    for h in (0..header).step_by(2) {
        let at = GROUP_ROWS * h + 2 * j;
        dst[at..at + 2].copy_from_slice(&b[h..h + 2]);
    }
    let nibbles = GROUP_ROWS * header;
    for k in 0..4 {
        let at = nibbles + 32 * k + 4 * j;
        dst[at..at + 4].copy_from_slice(&b[header + 4 * k..header + 4 * k + 4]);
    }
}

/// Row `r` of interleaved `data` (rows of `row_bytes`) in the file's
/// encoding, into `out` (`row_bytes` long).
pub(crate) fn deinterleave_row(
    ty: GgmlType,
    data: &[u8],
    row_bytes: usize,
    r: usize,
    out: &mut [u8],
) {
    let header = header_bytes(ty).expect("an interleaved type");
    let block = header + 16;
    let (g, j) = (r / GROUP_ROWS, r % GROUP_ROWS);
    let group = &data[g * GROUP_ROWS * row_bytes..(g + 1) * GROUP_ROWS * row_bytes];
    for (src, b) in group
        .chunks_exact(GROUP_ROWS * block)
        .zip(out.chunks_exact_mut(block))
    {
        for h in (0..header).step_by(2) {
            let at = GROUP_ROWS * h + 2 * j;
            b[h..h + 2].copy_from_slice(&src[at..at + 2]);
        }
        let nibbles = GROUP_ROWS * header;
        for k in 0..4 {
            let at = nibbles + 32 * k + 4 * j;
            b[header + 4 * k..header + 4 * k + 4].copy_from_slice(&src[at..at + 4]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_back_as_they_were() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
            let block = header_bytes(ty).unwrap() + 16;
            let row_bytes = 3 * block;
            let rows = crate::quant::test_noise(16 * row_bytes, 3);
            let mut data = Vec::new();
            interleave(ty, &rows, row_bytes, &mut data);
            assert_eq!(data.len(), rows.len());
            assert_ne!(data, rows);
            let mut row = vec![0u8; row_bytes];
            for (r, want) in rows.chunks_exact(row_bytes).enumerate() {
                deinterleave_row(ty, &data, row_bytes, r, &mut row);
                assert_eq!(row, want, "{ty} row {r}");
            }
        }
    }

    /// The layout the kernels read: scales first, then nibble dwords by lane.
    #[test]
    fn a_group_block_holds_scales_then_registers() {
        let row_bytes = 18;
        let rows: Vec<u8> = (0..8u8)
            .flat_map(|j| (0..18u8).map(move |b| j * 32 + b))
            .collect();
        let mut data = Vec::new();
        interleave(GgmlType::Q4_0, &rows, row_bytes, &mut data);
        // Row 3's scale bytes.
        assert_eq!(&data[6..8], &[96, 97]);
        // Register 1, lane 2: row 2's nibble bytes 4..8 (block bytes 6..10).
        assert_eq!(&data[16 + 32 + 8..16 + 32 + 12], &[70, 71, 72, 73]);
    }
}
