//! Deterministic random weights for the tiny models tests write.

use half::f16;

/// A linear congruential generator: the same values on every machine.
pub struct Rng(pub u64);

impl Rng {
    /// The next value, uniform in [-1, 1).
    pub fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `n` values, uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// `values` in ggml's Q8_0 blocks (32 values, an f16 scale, 32 bytes).
pub fn q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in values.chunks(32) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max / 127.0;
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| {
            if d == 0.0 {
                0
            } else {
                (v / d).round() as i8 as u8
            }
        }));
    }
    out
}
