//! The kernel table: for each weight type, every kernel this CPU runs on
//! it, for the process's [`Isa`] (probed once), as ggml's per-type traits
//! table. A matrix takes its row of the table when it is loaded; nothing
//! downstream probes the CPU or matches on types again.

use crate::gguf::GgmlType;
use crate::isa::{Isa, isa};

use super::dot::{DotFn, kernel};
use super::q8::{Q8DotFn, interleaved_kernel, q8_kernel};

/// The kernels for one weight type.
#[derive(Debug, Clone, Copy, Default)]
pub struct Kernels {
    /// Row · f32 vector, for types kept as floats (F32, F16).
    pub dot: Option<DotFn>,
    /// Rows · 8-bit activations, for quantized types (preferred when present).
    pub q8: Option<Q8DotFn>,
    /// As `q8`, on rows interleaved eight at a time where a kernel reads
    /// them so ([`super::interleave`]).
    pub interleaved: Option<Q8DotFn>,
}

/// The kernels for `ty` on this CPU (none for a type without kernels: its
/// rows are dequantized instead).
pub fn kernels(ty: GgmlType) -> Kernels {
    row(isa(), ty)
}

/// The table's row for `ty` on `isa`.
pub(super) fn row(isa: Isa, ty: GgmlType) -> Kernels {
    Kernels {
        dot: kernel(isa, ty),
        q8: q8_kernel(isa, ty),
        interleaved: interleaved_kernel(isa, ty),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_quantized_type_the_models_use_has_an_integer_kernel() {
        for ty in crate::quant::INTEGER_TYPES {
            assert!(kernels(ty).q8.is_some(), "{ty}");
            assert!(row(Isa::Portable, ty).q8.is_some(), "{ty}");
        }
        for ty in [GgmlType::F32, GgmlType::F16] {
            assert!(
                kernels(ty).dot.is_some() && kernels(ty).q8.is_none(),
                "{ty}"
            );
        }
        // Interleaved rows only where the AVX2 kernels read them.
        assert!(row(Isa::Portable, GgmlType::Q4_1).interleaved.is_none());
        assert_eq!(
            kernels(GgmlType::Q4_1).interleaved.is_some(),
            isa() == Isa::Avx2
        );
    }
}
