//! Where the kernels write their products: straight into the caller's
//! buffers, one row per activation vector, so that no task copies its block
//! of results into place afterwards.

use std::marker::PhantomData;

/// A product's outputs: per activation vector, a row of as many values as
/// the matrix has rows, wherever the rows live (one token-major buffer, or
/// a buffer each). Kernels write them through [`Outputs`] views.
pub struct OutputRows<'a> {
    starts: Vec<*mut f32>,
    len: usize,
    _rows: PhantomData<&'a mut [f32]>,
}

// SAFETY: the rows are borrowed mutably for `'a`; values are written only
// through views, and `OutputRows::view`'s callers keep concurrent views
// apart, so sharing the pointers between threads races on nothing.
unsafe impl Send for OutputRows<'_> {}
// SAFETY: as above.
unsafe impl Sync for OutputRows<'_> {}

impl<'a> OutputRows<'a> {
    /// `out` as `vectors` consecutive rows (token-major: `[t, r]` at
    /// `out[t * len + r]`).
    pub fn token_major(out: &'a mut [f32], vectors: usize) -> Self {
        let len = out.len() / vectors.max(1);
        assert_eq!(len * vectors, out.len(), "whole rows");
        let start = out.as_mut_ptr();
        OutputRows {
            // `wrapping_add`: within `out` (or one past its end when empty).
            starts: (0..vectors).map(|t| start.wrapping_add(t * len)).collect(),
            len,
            _rows: PhantomData,
        }
    }

    /// Each of `rows` as one vector's row; they must be equally long.
    pub fn separate(rows: &'a mut [Vec<f32>]) -> Self {
        let len = rows.first().map_or(0, Vec::len);
        assert!(
            rows.iter().all(|row| row.len() == len),
            "rows of one length"
        );
        OutputRows {
            starts: rows.iter_mut().map(|row| row.as_mut_ptr()).collect(),
            len,
            _rows: PhantomData,
        }
    }

    /// Values per row (the matrix's rows).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the rows hold no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows (activation vectors).
    pub fn vectors(&self) -> usize {
        self.starts.len()
    }

    /// Every row's values `first..first + count`, to write.
    ///
    /// # Safety
    /// While the view lives, no other view of any of the same values may be
    /// written (tasks writing disjoint ranges of rows at once is the use).
    pub unsafe fn view(&self, first: usize, count: usize) -> Outputs<'_> {
        assert!(
            first <= self.len && count <= self.len - first,
            "within the rows"
        );
        Outputs {
            starts: &self.starts,
            first,
            count,
        }
    }

    /// All of every row, to write.
    pub fn all(&mut self) -> Outputs<'_> {
        // SAFETY: `&mut self` leaves no other view alive.
        unsafe { self.view(0, self.len) }
    }
}

/// Values `first..first + count` of every row of an [`OutputRows`]: what
/// one kernel call writes, its rows' products with each vector.
pub struct Outputs<'a> {
    starts: &'a [*mut f32],
    first: usize,
    count: usize,
}

impl Outputs<'_> {
    /// Values per row in this view (the weight rows a kernel computes).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Rows (activation vectors).
    pub fn vectors(&self) -> usize {
        self.starts.len()
    }

    /// Writes `values` at vector `t`'s values `r..` of this view.
    #[inline]
    pub fn put(&mut self, t: usize, r: usize, values: &[f32]) {
        assert!(
            r <= self.count && values.len() <= self.count - r,
            "within the view"
        );
        let at = self.starts[t].wrapping_add(self.first + r);
        // SAFETY: the view lies within every row (checked in `view`) and no
        // other live view writes these values (`view`'s contract).
        unsafe {
            // A kernel's whole tile: a fixed-size copy (two moves), where a
            // copy sized at run time is a call to libc's `memcpy` (2.6% of
            // a batched step).
            if let Ok(eight) = <&[f32; 8]>::try_from(values) {
                at.cast::<[f32; 8]>().write_unaligned(*eight);
            } else {
                std::ptr::copy_nonoverlapping(values.as_ptr(), at, values.len());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_write_token_major_and_separate_rows() {
        let mut out = vec![0f32; 2 * 5];
        let rows = OutputRows::token_major(&mut out, 2);
        // SAFETY: the two views cover different values.
        let (mut a, mut b) = unsafe { (rows.view(0, 2), rows.view(2, 3)) };
        a.put(1, 0, &[1.0, 2.0]);
        b.put(0, 1, &[3.0, 4.0]);
        assert_eq!(out, [0.0, 0.0, 0.0, 3.0, 4.0, 1.0, 2.0, 0.0, 0.0, 0.0]);

        let mut separate = vec![vec![0f32; 3]; 2];
        OutputRows::separate(&mut separate)
            .all()
            .put(1, 1, &[7.0, 8.0]);
        assert_eq!(separate, [vec![0.0; 3], vec![0.0, 7.0, 8.0]]);
    }

    #[test]
    #[should_panic(expected = "within the view")]
    fn writes_past_a_view_panic() {
        let mut out = vec![0f32; 4];
        let rows = OutputRows::token_major(&mut out, 1);
        // SAFETY: the only view.
        unsafe { rows.view(0, 2) }.put(0, 1, &[1.0, 2.0]);
    }

    #[test]
    #[should_panic(expected = "within the view")]
    fn writes_before_a_view_panic() {
        let mut out = vec![0f32; 4];
        let rows = OutputRows::token_major(&mut out, 1);
        // SAFETY: the only view.
        unsafe { rows.view(2, 2) }.put(0, usize::MAX, &[1.0]);
    }

    #[test]
    #[should_panic(expected = "within the rows")]
    fn views_past_the_rows_panic() {
        let mut out = vec![0f32; 4];
        let rows = OutputRows::token_major(&mut out, 1);
        // SAFETY: the only view.
        let _ = unsafe { rows.view(usize::MAX, 2) };
    }
}
