//! `e^x` as a polynomial (Cephes' `expf`), in scalar code and eight lanes
//! at a time with AVX2: the two do the same f32 operations, so they agree to
//! the bit. The activations and the softmax use it instead of libm's `expf`,
//! which cannot be vectorized.

/// Bounds of [`exp`]'s argument: `2^n` stays a normal f32 throughout.
const EXP_MIN: f32 = -87.0;
const EXP_MAX: f32 = 88.0;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two, so `x - n·ln 2` loses nothing for |n| ≤ 127.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// The exponential on `[-ln2/2, ln2/2]`, after the constant and linear terms (Cephes' `expf`).
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    5e-1,
];

/// `e^x` (within 2 ulp) for `x` clamped to `[EXP_MIN, EXP_MAX]`: `2^n · p(r)`
/// with `x = n·ln 2 + r`. Each step is one f32 operation that the AVX2 twin
/// performs identically.
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let n = (x * LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = p.mul_add(r, c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::{EXP_MAX, EXP_MIN, EXP_POLY, LN2_HI, LN2_LO, LOG2_E};

    /// [`super::exp`], eight lanes at a time.
    ///
    /// # Safety
    /// Only call from code compiled with AVX2 and FMA enabled.
    #[inline(always)]
    pub(crate) unsafe fn exp(x: __m256) -> __m256 {
        // SAFETY: register-only AVX, AVX2 and FMA intrinsics (no memory
        // access); the caller is compiled with AVX2 and FMA (the contract).
        unsafe {
            // NaN passes through: max/min return their second operand for it.
            let x = _mm256_min_ps(
                _mm256_set1_ps(EXP_MAX),
                _mm256_max_ps(_mm256_set1_ps(EXP_MIN), x),
            );
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x, _mm256_set1_ps(LOG2_E)),
            );
            let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
            let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
            let mut p = _mm256_set1_ps(EXP_POLY[0]);
            for &c in &EXP_POLY[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let y = _mm256_add_ps(
                _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
                _mm256_set1_ps(1.0),
            );
            let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            ));
            _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_over_its_range() {
        let mut x = EXP_MIN;
        while x <= EXP_MAX {
            let (got, want) = (exp(x), (x as f64).exp());
            let err = ((got as f64 - want) / want).abs();
            assert!(err < 2.5e-7, "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
        assert_eq!(exp(-1000.0), exp(EXP_MIN));
        assert_eq!(exp(1000.0), exp(EXP_MAX));
        assert_eq!(exp(f32::NEG_INFINITY), exp(EXP_MIN));
        assert_eq!(exp(f32::INFINITY), exp(EXP_MAX));
        assert_eq!((exp(0.0), exp(-0.0)), (1.0, 1.0));
        assert!(exp(f32::NAN).is_nan());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_lanes_agree_with_the_scalar_code() {
        if crate::isa::isa() != crate::isa::Isa::Avx2 {
            return;
        }
        let special = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
            -87.0,
            88.0,
            1e3,
        ];
        let ranges = [-100.0f32, -20.0, -1.0, 0.0, 3.0, 80.0]
            .map(|start| std::array::from_fn(|i| start + i as f32 * 0.377));
        for xs in ranges.iter().chain([&special]) {
            let mut got = [0f32; 8];
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe { lanes(xs, &mut got) };
            for (x, y) in xs.iter().zip(got) {
                let want = exp(*x);
                assert!(
                    y == want || (y.is_nan() && want.is_nan()),
                    "exp({x}): {y} vs {want}"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lanes(xs: &[f32; 8], out: &mut [f32; 8]) {
        use std::arch::x86_64::*;
        // SAFETY: both hold eight floats; AVX2 and FMA are enabled here.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), avx2::exp(_mm256_loadu_ps(xs.as_ptr()))) };
    }
}
