//! bf16 rounding in portable code: the rounding `vcvtne2ps2bf16` does, and a matrix product
//! with the numerics of the bf16 kernel (operands rounded to bf16, exact products, f32 sums)
//! on any CPU, through f32 `gemm`. It is the reference the AVX512-BF16 kernel is tested
//! against and lets CPUs without that kernel measure what bf16 does to a codec
//! ([`Precision::Bf16Emulated`](crate::Precision::Bf16Emulated)); it is slower than f32.

/// bf16 bits of `x` (in the low 16 bits), rounded to nearest even; a NaN stays a quiet NaN.
#[inline]
pub(super) fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        (b >> 16) | 0x40
    } else {
        b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16
    }
}

/// `x` rounded to the nearest bf16 value, as an f32.
#[inline]
pub(super) fn round_bf16(x: f32) -> f32 {
    f32::from_bits(bf16_bits(x) << 16)
}

/// The `rows` x `cols` matrix at `src` (strides `(cs, rs)`), rounded to bf16, row-major.
///
/// # Safety
/// `src` must address the matrix at those sizes and strides.
unsafe fn rounded(
    src: *const f32,
    (rows, cols): (usize, usize),
    (cs, rs): (usize, usize),
) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        out.extend((0..cols).map(|c| round_bf16(*src.add(r * rs + c * cs))));
    }
    out
}

/// `dst [m, n] (= or +=) lhs [m, k] · rhs [k, n]` with both operands rounded to bf16 first
/// and the product taken in f32 (products of bf16 values are exact in f32, so only the order
/// of the f32 sums differs from the AVX512-BF16 kernel).
///
/// # Safety
/// As [`super::cpu_conv::product`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_strides: (usize, usize),
    rhs: *const f32,
    rhs_strides: (usize, usize),
) {
    let a = rounded(lhs, (m, k), lhs_strides);
    let b = rounded(rhs, (k, n), rhs_strides);
    // SAFETY: `a` is [m, k] and `b` [k, n], row-major; `dst` is the caller's.
    super::cpu_conv::gemm_f32(
        (m, n, k),
        dst,
        dst_rs,
        accumulate,
        a.as_ptr(),
        (1, k),
        b.as_ptr(),
        (1, n),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(round_bf16(-2.5), -2.5);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
    }
}
