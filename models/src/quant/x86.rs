//! Small AVX2/F16C helpers shared by the x86-64 kernels.

use std::arch::x86_64::*;

/// Sum of the eight lanes.
///
/// # Safety
/// Only call from code compiled with AVX enabled.
#[inline(always)]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: register-only SSE and AVX intrinsics (no memory access); the
    // caller is compiled with AVX enabled (the contract).
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

/// The little-endian f16 at `b[i..i + 2]`, converted with F16C.
///
/// Only reached from kernels compiled with F16C enabled (selected after the
/// CPU reported it), into which it is always inlined.
#[inline(always)]
pub(super) fn f16c_at(b: &[u8], i: usize) -> f32 {
    let bits = u16::from_le_bytes([b[i], b[i + 1]]);
    // SAFETY: see above; callers are `#[target_feature(enable = "f16c")]` kernels.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) }
}
