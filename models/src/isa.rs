//! The instruction sets Realm's kernels use, probed once per process.
//!
//! Every kernel choice (the weight-type table in [`crate::quant`], attention,
//! the gated activation, `exp`, activation quantization) asks [`isa`] rather
//! than probing the CPU itself, so one place decides which copies run.

use std::sync::OnceLock;

/// The most capable kernel family this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Baseline code for any target.
    Portable,
    /// x86-64 with AVX2, FMA and F16C (Haswell and later, Zen).
    Avx2,
}

/// This CPU's kernel family (probed on first use).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(probe)
}

fn probe() -> Isa {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        return Isa::Avx2;
    }
    Isa::Portable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_is_stable() {
        assert_eq!(isa(), probe());
        #[cfg(not(target_arch = "x86_64"))]
        assert_eq!(isa(), Isa::Portable);
    }
}
