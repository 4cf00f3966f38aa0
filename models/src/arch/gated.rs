//! The feed-forward gate, `act(gate) * up`, for the CPU pass.
//!
//! Both activations are `x · sigmoid(z)`: SiLU with `z = x`, and gelu's tanh
//! approximation with `z = 2·√(2/π)·(x + 0.044715·x³)` (since
//! `(1 + tanh(y)) / 2 = sigmoid(2y)`). The sigmoid's exponential is
//! [`super::exp`]'s, eight lanes at a time with a scalar twin that does the
//! same f32 operations, so a value's result never depends on where it falls
//! in a chunk (and so on what else shares its batch).

use super::config::Activation;
use super::exp::exp;
use super::pool::SpinPool;

/// Values per task (a multiple of 8).
const CHUNK: usize = 512;

/// `gate = act(gate) * up`, elementwise, across the pool.
pub(crate) fn gated(activation: Activation, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    SpinPool::global().run_chunks(gate, CHUNK, &|i, gate| {
        gated_chunk(activation, gate, &up[i * CHUNK..][..gate.len()]);
    });
}

/// [`gated`] on one piece.
fn gated_chunk(activation: Activation, gate: &mut [f32], up: &[f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::isa::isa() == crate::isa::Isa::Avx2 {
        // SAFETY: the CPU has AVX2 and FMA; `up` is as long as `gate` (asserted in `gated`).
        done = unsafe { avx2::gated(activation, gate, up) };
    }
    for (g, &u) in gate[done..].iter_mut().zip(&up[done..]) {
        *g = gate_one(activation, *g) * u;
    }
}

/// `act(x)` for one value.
fn gate_one(activation: Activation, x: f32) -> f32 {
    match activation {
        Activation::Silu => x * sigmoid(x),
        Activation::GeluTanh => x * sigmoid(GELU_2C * (x + GELU_A * x * x * x)),
    }
}

/// `2·√(2/π)`.
const GELU_2C: f32 = 1.595_769;
/// The cubic term's weight in gelu's tanh approximation.
const GELU_A: f32 = 0.044_715;

/// `1 / (1 + e^-z)`.
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp(-z))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::exp::avx2::exp;
    use super::{Activation, GELU_2C, GELU_A};

    /// [`super::gated_chunk`] on the whole eights of `gate`; returns how many
    /// values it did.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `up` is at least as long as `gate`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gated(activation: Activation, gate: &mut [f32], up: &[f32]) -> usize {
        let whole = gate.len() / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        for i in (0..whole).step_by(8) {
            // SAFETY: `i + 8 <= whole <= gate.len() <= up.len()`.
            unsafe {
                let x = _mm256_loadu_ps(gate.as_ptr().add(i));
                let z = match activation {
                    Activation::Silu => x,
                    Activation::GeluTanh => {
                        let cube = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(GELU_A), x), x);
                        let inner = _mm256_add_ps(x, _mm256_mul_ps(cube, x));
                        _mm256_mul_ps(_mm256_set1_ps(GELU_2C), inner)
                    }
                };
                let e = exp(_mm256_xor_ps(z, _mm256_set1_ps(-0.0)));
                let sigmoid = _mm256_div_ps(one, _mm256_add_ps(one, e));
                let u = _mm256_loadu_ps(up.as_ptr().add(i));
                let y = _mm256_mul_ps(_mm256_mul_ps(x, sigmoid), u);
                _mm256_storeu_ps(gate.as_mut_ptr().add(i), y);
            }
        }
        whole
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever its place in a chunk, a value gets the same result, close to
    /// the activation's definition.
    #[test]
    fn every_lane_and_the_tail_agree_with_the_definition() {
        for activation in [Activation::Silu, Activation::GeluTanh] {
            let xs: Vec<f32> = (0..1003).map(|i| (i as f32 - 501.0) * 0.031).collect();
            let up: Vec<f32> = (0..1003).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
            let mut all = xs.clone();
            gated(activation, &mut all, &up);
            for (i, (&x, &got)) in xs.iter().zip(&all).enumerate() {
                let mut one = [x];
                gated_chunk(activation, &mut one, &up[i..i + 1]);
                assert_eq!(got, one[0], "{activation:?} {x}: lane vs tail");
                let x = x as f64;
                let act = match activation {
                    Activation::Silu => x / (1.0 + (-x).exp()),
                    Activation::GeluTanh => {
                        let inner =
                            (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                        0.5 * x * (1.0 + inner.tanh())
                    }
                };
                let want = act * up[i] as f64;
                assert!(
                    (got as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "{activation:?} {x}: {got} vs {want}"
                );
            }
        }
    }
}
