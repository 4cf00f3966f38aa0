//! Weight matrices kept in their file encoding, and their products with
//! activations on the quantized blocks.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

use super::pool::SpinPool;
use crate::gguf::{GgmlType, GgufFile, TensorInfo};
use crate::quant::interleave::{GROUP_ROWS, Interleaving};
use crate::quant::{
    Kernels, OutputRows, Outputs, Q8Activations, Q8Batch, Q8DotFn, dequantize_row, dot_dequantized,
    kernels,
};

/// Bytes of a matrix interleaved before their pages in the file are let go.
const INTERLEAVE_RUN: usize = 4 << 20;

/// A weight matrix in its file encoding: `rows` outputs of `cols` inputs each,
/// row-major (ggml's `ne0 = cols`).
#[derive(Debug, Clone)]
pub struct Matrix {
    pub(crate) ty: GgmlType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) offset: usize,
    pub(crate) size: usize,
    /// The kernel table's row for this type.
    kernels: Kernels,
    /// The integer kernel reading these weights (the table's `q8`, or its
    /// `interleaved` once [`Matrix::interleave`] copied them so).
    q8: Option<Q8DotFn>,
    /// The weights interleaved eight rows at a time, when the kernels read
    /// them so ([`Matrix::interleave`]); then `q8` reads these.
    interleaved: Option<(Interleaving, Arc<Vec<u8>>)>,
}

impl Matrix {
    pub(crate) fn from_tensor(t: &TensorInfo) -> Option<Self> {
        let (&cols, rest) = t.dims.split_first()?;
        let rows: u64 = rest.iter().product();
        let (block, _) = t.ggml_type.block_layout()?;
        if !(cols as usize).is_multiple_of(block) {
            return None;
        }
        let kernels = kernels(t.ggml_type);
        Some(Matrix {
            ty: t.ggml_type,
            rows: rows as usize,
            cols: cols as usize,
            offset: t.offset,
            size: t.size,
            q8: kernels.q8,
            kernels,
            interleaved: None,
        })
    }

    /// Copies the weights out of `file` interleaved eight rows at a time,
    /// where a kernel reads them so (Q4_0, Q4_1 and Q8_0 on AVX2 CPUs), and
    /// lets the file's pages of them go: the copy takes their place in
    /// memory. A few megabytes at a time, each run's pages let go once
    /// copied, so a large matrix (an embedding of 170 MB) is never in
    /// memory twice. Does nothing for other matrices.
    pub(crate) fn interleave(&mut self, file: &GgufFile) {
        let (Some(q8), Some(layout)) = (self.kernels.interleaved, Interleaving::of(self.ty)) else {
            return;
        };
        if !self.rows.is_multiple_of(GROUP_ROWS) || self.interleaved.is_some() {
            return;
        }
        // Zeroed allocations are mapped lazily: pages count once written.
        let mut data = vec![0u8; self.size];
        let stride = self.row_bytes();
        let run = (INTERLEAVE_RUN / (GROUP_ROWS * stride)).max(1) * GROUP_ROWS * stride;
        let source = self.bytes(file);
        for (start, into) in (0..self.size).step_by(run).zip(data.chunks_mut(run)) {
            let end = start + into.len();
            layout.interleave(&source[start..end], stride, into);
            file.release(self.offset + start, end - start);
        }
        self.interleaved = Some((layout, Arc::new(data)));
        self.q8 = Some(q8);
    }

    /// Rows `start..start + count` as a matrix of their own (for fused
    /// tensors such as Phi-3's `attn_qkv`); `None` past the end or once
    /// interleaved.
    pub(crate) fn rows_slice(&self, start: usize, count: usize) -> Option<Matrix> {
        if start + count > self.rows || self.interleaved.is_some() {
            return None;
        }
        let stride = self.row_bytes();
        Some(Matrix {
            rows: count,
            offset: self.offset + start * stride,
            size: count * stride,
            ..self.clone()
        })
    }

    fn row_bytes(&self) -> usize {
        let (block, size) = self.ty.block_layout().expect("checked in from_tensor");
        self.cols / block * size
    }

    /// Lets `file`'s pages of the weights go if they were copied out
    /// ([`Matrix::interleave`]).
    pub(crate) fn release_copied(&self, file: &GgufFile) {
        if self.interleaved.is_some() {
            file.release(self.offset, self.size);
        }
    }

    /// Every value, dequantized, row-major.
    pub(crate) fn values(&self, file: &GgufFile) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.row(file, r, row);
        }
        out
    }

    /// Row `row` as f32.
    pub(crate) fn row(&self, file: &GgufFile, row: usize, out: &mut [f32]) {
        let stride = self.row_bytes();
        let mut regrouped = Vec::new();
        let bytes = match &self.interleaved {
            Some((layout, data)) => {
                regrouped.resize(stride, 0);
                layout.row(data, stride, row, &mut regrouped);
                &regrouped[..]
            }
            None => &self.bytes(file)[row * stride..(row + 1) * stride],
        };
        dequantize_row(self.ty, bytes, 0, out).expect("whole blocks");
    }

    /// The weights as the kernels read them: interleaved, or in `file`.
    pub(crate) fn bytes<'f>(&'f self, file: &'f GgufFile) -> &'f [u8] {
        match &self.interleaved {
            Some((_, data)) => data,
            None => file.bytes_at(self.offset, self.size),
        }
    }

    /// Rows `first..` of `self · x_t` for each token `t` (as many rows as
    /// `out` covers), into `out`.
    fn rows_into(
        &self,
        bytes: &[u8],
        first: usize,
        out: &mut Outputs<'_>,
        xs: &Activations,
        scratch: &mut Vec<f32>,
    ) {
        let n = xs.tokens;
        let stride = self.row_bytes();
        let rows = &bytes[first * stride..(first + out.count()) * stride];
        if let (Some(q8), Some(acts)) = (self.q8, &xs.q8) {
            q8(rows, stride, acts, out);
            return;
        }
        // Interleaved weights always have an integer kernel, so
        // `matmul_many` quantizes the activations for them.
        debug_assert!(
            self.interleaved.is_none(),
            "interleaved rows read as the file's"
        );
        for (r, row) in rows.chunks_exact(stride).enumerate() {
            for t in 0..n {
                let y = match self.kernels.dot {
                    Some(dot) => dot(row, xs.row(t)),
                    None => dot_dequantized(self.ty, row, xs.row(t), scratch),
                };
                out.put(t, r, &[y]);
            }
        }
    }
}

/// `n` activation vectors, and their 8-bit quantization when a kernel wants it.
struct Activations<'a> {
    x: &'a [f32],
    tokens: usize,
    q8: Option<Q8Batch>,
}

impl Activations<'_> {
    fn row(&self, t: usize) -> &[f32] {
        let cols = self.x.len() / self.tokens;
        &self.x[t * cols..(t + 1) * cols]
    }
}

/// `out_i = m_i · x_t` for several matrices sharing the same `n` input vectors
/// (`x` is `n` rows of `cols`), in a single parallel pass on the spinning
/// pool: one dispatch instead of one per matrix, inputs quantized (for integer
/// kernels) once, and each weight row read once for all `n` vectors. Each
/// task's kernel writes its rows' products straight into the outputs (one
/// row of `m_i.rows` values per vector each).
pub(crate) fn matmul_many(
    file: &GgufFile,
    work: &[(&Matrix, OutputRows<'_>)],
    x: &[f32],
    n: usize,
) {
    matmul_many_beside(file, work, x, n, None);
}

/// Work that runs in the same pool dispatch as a product, beside its tasks:
/// `tasks` calls of `run`, which must not touch the product's outputs.
pub(crate) struct Beside<'a> {
    pub(crate) tasks: usize,
    pub(crate) run: &'a (dyn Fn(usize) + Sync),
}

/// [`matmul_many`], with `beside`'s tasks in the same dispatch (after the
/// product's own, so idle threads take them first).
pub(crate) fn matmul_many_beside(
    file: &GgufFile,
    work: &[(&Matrix, OutputRows<'_>)],
    x: &[f32],
    n: usize,
    beside: Option<Beside<'_>>,
) {
    let mut xs = Activations {
        x,
        tokens: n,
        q8: None,
    };
    if work.iter().any(|(m, _)| m.q8.is_some()) {
        xs.q8 = Some(quantize(x, n));
    }
    let threads = rayon::current_num_threads();
    let mut tasks: Vec<(usize, Range<usize>)> = Vec::new();
    for (w, (m, out)) in work.iter().enumerate() {
        assert!(x.len() == m.cols * n && out.len() == m.rows && out.vectors() == n);
        // Enough rows per task that dispatch overhead stays small, enough
        // tasks to balance. Batched products are compute-bound, so their
        // tasks are smaller (whole pairs of eight-row tiles): the last task then
        // leaves the other threads idle for less time.
        let per_task = if n >= 4 {
            (m.rows / (16 * threads)).next_multiple_of(16).max(16)
        } else {
            // Whole interleaved groups.
            (m.rows / (4 * threads))
                .next_multiple_of(GROUP_ROWS)
                .max(64)
        };
        tasks.extend(
            (0..m.rows)
                .step_by(per_task)
                .map(|first| (w, first..(first + per_task).min(m.rows))),
        );
    }
    let own = tasks.len();
    let extra = beside.as_ref().map_or(0, |b| b.tasks);
    SpinPool::global().run(own + extra, &|i| {
        if i >= own {
            if let Some(beside) = &beside {
                (beside.run)(i - own);
            }
            return;
        }
        let (w, ref rows) = tasks[i];
        let (m, out) = &work[w];
        // SAFETY: each task owns a distinct row range of its matrix, so no
        // two views write the same values.
        let mut view = unsafe { out.view(rows.start, rows.len()) };
        m.rows_into(m.bytes(file), rows.start, &mut view, &xs, &mut Vec::new());
    });
    if let Some(batch) = xs.q8 {
        SPARE_BATCH.with(|spare| *spare.borrow_mut() = batch);
    }
}

thread_local! {
    /// The last product's quantized activations, whose buffers the next
    /// product on this thread quantizes into (a batch is 3 buffers per vector).
    static SPARE_BATCH: RefCell<Q8Batch> = RefCell::new(Q8Batch::default());
}

/// The `n` rows of `x` quantized for the integer kernels, several at once
/// across the pool.
fn quantize(x: &[f32], n: usize) -> Q8Batch {
    let mut batch = SPARE_BATCH.with(|spare| std::mem::take(&mut *spare.borrow_mut()));
    let cols = x.len() / n.max(1);
    batch.vectors.resize_with(n, Q8Activations::default);
    let quantize = |t: usize, vector: &mut [Q8Activations]| {
        vector[0].quantize(&x[t * cols..(t + 1) * cols]);
    };
    if n < 2 {
        batch
            .vectors
            .chunks_mut(1)
            .enumerate()
            .for_each(|(t, v)| quantize(t, v));
    } else {
        SpinPool::global().run_chunks(&mut batch.vectors, 1, &quantize);
    }
    batch
}
