//! Rotary position angles, computed in one place for both backends, in f32
//! as llama.cpp computes them so that positions rotate identically.

use super::config::ModelConfig;

/// How a model's positions turn into rotation angles.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rope<'a> {
    /// Dimensions of each head that rotate (pairs: half as many).
    dims: usize,
    base: f32,
    /// Positions are multiplied by this (linear scaling).
    freq_scale: f32,
    /// Cosines and sines are multiplied by this.
    attn_factor: f32,
    /// Per pair, a divisor of its frequency (Llama 3, LongRoPE).
    factors: Option<&'a [f32]>,
}

impl<'a> Rope<'a> {
    /// The rotation of model `c` with frequency base `base` and the file's
    /// per-pair `factors`, if any.
    pub(crate) fn new(c: &ModelConfig, base: f32, factors: Option<&'a [f32]>) -> Self {
        Rope {
            dims: c.rope_dims,
            base,
            freq_scale: c.rope_freq_scale,
            attn_factor: c.rope_attn_factor,
            factors,
        }
    }

    /// Plain rotation of `dims` dimensions with base `base` (tests).
    #[cfg(test)]
    pub(crate) fn plain(dims: usize, base: f32) -> Self {
        Rope {
            dims,
            base,
            freq_scale: 1.0,
            attn_factor: 1.0,
            factors: None,
        }
    }

    /// Rotated pairs per head.
    pub(crate) fn pairs(&self) -> usize {
        self.dims / 2
    }

    /// Fills `cos` and `sin` with, per position, the cosine and sine of
    /// each pair's angle.
    pub(crate) fn angles(
        &self,
        positions: impl Iterator<Item = usize>,
        cos: &mut Vec<f32>,
        sin: &mut Vec<f32>,
    ) {
        cos.clear();
        sin.clear();
        let half = self.dims / 2;
        for pos in positions {
            for i in 0..half {
                let divisor = self.factors.map_or(1.0, |f| f[i]);
                let theta = self.freq_scale
                    * pos as f32
                    * self.base.powf(-2.0 * i as f32 / self.dims as f32)
                    / divisor;
                let (s, c) = theta.sin_cos();
                cos.push(c * self.attn_factor);
                sin.push(s * self.attn_factor);
            }
        }
    }
}
