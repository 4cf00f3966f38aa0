//! Micro-benchmarks of the integer kernels, one thread: the products every
//! linear layer runs, on SmolLM2-135M's FFN shapes: 576 → 1536 (up), and
//! 1536 → 576 (down) for the k-quants, whose 256-value blocks need it.
//!
//! `cargo bench -p realm-models --bench kernels` prints, per weight type:
//! - GMAC/s with the weights in cache, for 1, 16 and 64 activation vectors
//!   (decode of one sequence, a batched step, a prompt chunk);
//! - GB/s of weights streamed from memory for one vector, cycling through
//!   enough matrices (64 × 1 MB) that none stays in cache: decode's bound.
//!
//! Arguments: `--quick` runs each case for 0.1 s instead of 0.5 s.

use std::hint::black_box;
use std::time::{Duration, Instant};

use realm_models::gguf::GgmlType;
use realm_models::quant::{OutputRows, Q8Batch, kernels};

/// `(rows, cols)` of the matrices for `ty`.
fn shape(ty: GgmlType) -> (usize, usize) {
    let (block, _) = ty.block_layout().expect("a block type");
    if block == 256 {
        (576, 1536)
    } else {
        (1536, 576)
    }
}

/// A row-major matrix of `ty` with random quants and small fixed scales
/// (random scale bytes could be NaNs or subnormals).
fn matrix(ty: GgmlType, seed: u64) -> Vec<u8> {
    let (block, bytes) = ty.block_layout().expect("a block type");
    let (rows, cols) = shape(ty);
    let mut s = seed;
    let mut data: Vec<u8> = (0..rows * cols / block * bytes)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u8
        })
        .collect();
    // Where each block keeps its f16 scales (ggml's layouts).
    let scales: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q6K => &[208],
        _ => &[],
    };
    let one = half::f16::from_f32(0.01).to_le_bytes();
    for b in data.chunks_exact_mut(bytes) {
        for &at in scales {
            b[at..at + 2].copy_from_slice(&one);
        }
    }
    data
}

/// Runs `f` repeatedly for about `budget`; returns seconds per call.
fn time(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let (start, mut calls) = (Instant::now(), 0u32);
    while start.elapsed() < budget {
        f();
        calls += 1;
    }
    start.elapsed().as_secs_f64() / calls as f64
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = Duration::from_millis(if quick { 100 } else { 500 });
    println!(
        "{:<6} {:>12} {:>12} {:>12} {:>14}",
        "type", "1 vec GMAC/s", "16 GMAC/s", "64 GMAC/s", "memory GB/s"
    );
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ] {
        let Some(kernel) = kernels(ty).q8 else {
            continue;
        };
        let (block, bytes) = ty.block_layout().expect("a block type");
        let (rows, cols) = shape(ty);
        let row_bytes = cols / block * bytes;
        let weights = matrix(ty, 1);
        let mut cells = Vec::new();
        for vectors in [1usize, 16, 64] {
            let x: Vec<f32> = (0..vectors * cols)
                .map(|i| (i % 17) as f32 / 17.0 - 0.5)
                .collect();
            let batch = Q8Batch::quantize(&x, vectors);
            let mut out = vec![0f32; rows * vectors];
            let seconds = time(budget, || {
                let mut rows = OutputRows::token_major(&mut out, vectors);
                kernel(black_box(&weights), row_bytes, &batch, &mut rows.all());
            });
            cells.push((rows * cols * vectors) as f64 / seconds / 1e9);
        }
        // Decode from memory: 64 distinct matrices, one vector.
        let many: Vec<Vec<u8>> = (0..64).map(|i| matrix(ty, i + 2)).collect();
        let x: Vec<f32> = (0..cols).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
        let batch = Q8Batch::quantize(&x, 1);
        let mut out = vec![0f32; rows];
        let mut next = 0;
        let seconds = time(budget, || {
            let mut rows = OutputRows::token_major(&mut out, 1);
            kernel(black_box(&many[next]), row_bytes, &batch, &mut rows.all());
            next = (next + 1) % many.len();
        });
        let bandwidth = (rows * row_bytes) as f64 / seconds / 1e9;
        println!(
            "{:<6} {:>12.1} {:>12.1} {:>12.1} {:>14.1}",
            ty.to_string(),
            cells[0],
            cells[1],
            cells[2],
            bandwidth
        );
    }
}
