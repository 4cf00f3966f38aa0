//! Weights regrouped at load for the AVX2 kernels: eight rows' blocks side
//! by side, in the order the kernels' registers want them, in the same
//! number of bytes as the file's encoding.
//!
//! Per group of eight rows and per block (32 weights of each row): the eight
//! rows' f16 scales, then (Q4_1) their f16 minimums, then 32-byte registers:
//! register `k`, 4-byte lane `j`, holds weight bytes `4k..4k + 4` of row
//! `j`'s block. Q4_0 and Q4_1 have four (nibble bytes: weights `4k..4k + 4`
//! in the low nibbles, `16 + 4k..` in the high ones), Q8_0 eight (signed
//! bytes). The batched kernel then fills a tile with a copy, or one mask and
//! one shift per register, and the single-vector kernel reads eight rows
//! with one load per register and one broadcast per activation dword,
//! instead of gathering and transposing eight rows' scattered blocks every
//! time.

use crate::gguf::GgmlType;

/// Rows per interleaved group.
pub(crate) const GROUP_ROWS: usize = 8;

/// How one weight type interleaves: the size of a block's header (scale,
/// and minimum for Q4_1) and how many 4-byte runs of weights follow it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Interleaving {
    header: usize,
    registers: usize,
}

impl Interleaving {
    /// The interleaving of `ty`, if it has one (Q4_0, Q4_1 and Q8_0).
    pub(crate) fn of(ty: GgmlType) -> Option<Self> {
        match ty {
            GgmlType::Q4_0 => Some(Interleaving {
                header: 2,
                registers: 4,
            }),
            GgmlType::Q4_1 => Some(Interleaving {
                header: 4,
                registers: 4,
            }),
            GgmlType::Q8_0 => Some(Interleaving {
                header: 2,
                registers: 8,
            }),
            _ => None,
        }
    }

    /// Bytes per block of one row.
    fn block(self) -> usize {
        self.header + 4 * self.registers
    }

    /// `rows` (whole rows of `row_bytes`, a multiple of [`GROUP_ROWS`] of
    /// them) interleaved into `out`, as long. Groups are independent, so a
    /// matrix can be interleaved a run of groups at a time.
    pub(crate) fn interleave(self, rows: &[u8], row_bytes: usize, out: &mut [u8]) {
        let block = self.block();
        assert!(
            row_bytes.is_multiple_of(block)
                && rows.len().is_multiple_of(GROUP_ROWS * row_bytes)
                && out.len() == rows.len()
        );
        for (group, src) in out
            .chunks_exact_mut(GROUP_ROWS * row_bytes)
            .zip(rows.chunks_exact(GROUP_ROWS * row_bytes))
        {
            for (i, dst) in group.chunks_exact_mut(GROUP_ROWS * block).enumerate() {
                for (j, row) in src.chunks_exact(row_bytes).enumerate() {
                    let b = &row[i * block..(i + 1) * block];
                    for (at, to, len) in self.places(j) {
                        dst[to..to + len].copy_from_slice(&b[at..at + len]);
                    }
                }
            }
        }
    }

    /// Row `r` of interleaved `data` (rows of `row_bytes`) in the file's
    /// encoding, into `out` (`row_bytes` long).
    pub(crate) fn row(self, data: &[u8], row_bytes: usize, r: usize, out: &mut [u8]) {
        let (g, j) = (r / GROUP_ROWS, r % GROUP_ROWS);
        let group = &data[g * GROUP_ROWS * row_bytes..(g + 1) * GROUP_ROWS * row_bytes];
        for (src, b) in group
            .chunks_exact(GROUP_ROWS * self.block())
            .zip(out.chunks_exact_mut(self.block()))
        {
            for (at, from, len) in self.places(j) {
                b[at..at + len].copy_from_slice(&src[from..from + len]);
            }
        }
    }

    /// Where row `j`'s block goes in its group's block: `(offset in the
    /// row's block, offset in the group's block, length)` for each f16 of
    /// the header, then each 4-byte run of weights.
    fn places(self, j: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        let header = self.header;
        let halves = (0..header)
            .step_by(2)
            .map(move |h| (h, GROUP_ROWS * h + 2 * j, 2));
        let weights = (0..self.registers)
            .map(move |k| (header + 4 * k, GROUP_ROWS * header + 32 * k + 4 * j, 4));
        halves.chain(weights)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_back_as_they_were() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let layout = Interleaving::of(ty).unwrap();
            let row_bytes = 3 * layout.block();
            let rows = crate::quant::test_noise(16 * row_bytes, 3);
            let mut data = vec![0; rows.len()];
            layout.interleave(&rows, row_bytes, &mut data);
            assert_eq!(data.len(), rows.len());
            assert_ne!(data, rows);
            let mut row = vec![0u8; row_bytes];
            for (r, want) in rows.chunks_exact(row_bytes).enumerate() {
                layout.row(&data, row_bytes, r, &mut row);
                assert_eq!(row, want, "{ty} row {r}");
            }
        }
        assert!(Interleaving::of(GgmlType::Q5_0).is_none());
    }

    /// The layout the kernels read: scales first, then nibble dwords by lane.
    #[test]
    fn a_group_block_holds_scales_then_registers() {
        let row_bytes = 18;
        let rows: Vec<u8> = (0..8u8)
            .flat_map(|j| (0..18u8).map(move |b| j * 32 + b))
            .collect();
        let mut data = vec![0; rows.len()];
        let layout = Interleaving::of(GgmlType::Q4_0).unwrap();
        layout.interleave(&rows, row_bytes, &mut data);
        // Row 3's scale bytes.
        assert_eq!(&data[6..8], &[96, 97]);
        // Register 1, lane 2: row 2's nibble bytes 4..8 (block bytes 6..10).
        assert_eq!(&data[16 + 32 + 8..16 + 32 + 12], &[70, 71, 72, 73]);
    }
}
