//! The vector kernels of the host ops: row softmax, SiLU, sums of
//! squares and a polynomial `exp`, written in fixed-size lanes so that the
//! compiler vectorises them, each built twice (portable, and AVX2/FMA
//! chosen at run time).

/// every AVX2 CPU has).
pub(super) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Lanes the loops below are written in, so that each becomes vector code.
pub(super) const LANES: usize = 8;

/// `row <- softmax(row)`; `avx2` from [`has_avx2`].
pub(super) fn softmax_row(row: &mut [f32], avx2: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` says the CPU has AVX2 and FMA, all this needs.
        unsafe { softmax_row_avx2(row) };
        return;
    }
    let _ = avx2;
    softmax_row_portable(row);
}

/// [`softmax_row_portable`] compiled for AVX2: the same code, twice the
/// lanes of the baseline SSE2 build.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32]) {
    softmax_row_portable(row);
}

/// `row <- softmax(row)`; inlined into each target-specific copy.
#[inline(always)]
pub(super) fn softmax_row_portable(row: &mut [f32]) {
    if row.is_empty() {
        return;
    }
    let max = lane_fold(row, f32::NEG_INFINITY, f32::max);
    for x in row.iter_mut() {
        *x = exp_nonpositive(*x - max);
    }
    let inv = 1.0 / lane_fold(row, 0.0, |a, b| a + b);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// `gate <- silu(gate) * up`; `avx2` from [`has_avx2`].
pub(super) fn silu_mul_row(gate: &mut [f32], up: &[f32], avx2: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` says the CPU has AVX2 and FMA, all this needs.
        unsafe { silu_mul_row_avx2(gate, up) };
        return;
    }
    let _ = avx2;
    silu_mul_row_portable(gate, up);
}

/// [`silu_mul_row_portable`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_row_avx2(gate: &mut [f32], up: &[f32]) {
    silu_mul_row_portable(gate, up);
}

/// `gate <- gate * sigmoid(gate) * up`, with the sigmoid from
/// `e = exp(-|g|)` (never overflowing): `1 / (1 + e)` for `g >= 0`, and
/// `e / (1 + e)` below.
#[inline(always)]
fn silu_mul_row_portable(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let e = exp_nonpositive(-g.abs());
        let numerator = if *g >= 0.0 { 1.0 } else { e };
        *g = *g * u * numerator / (1.0 + e);
    }
}

/// The sum of `values`' squares; `avx2` from [`has_avx2`].
pub(super) fn sum_of_squares(values: &[f32], avx2: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` says the CPU has AVX2 and FMA, all this needs.
        return unsafe { sum_of_squares_avx2(values) };
    }
    let _ = avx2;
    sum_of_squares_portable(values)
}

/// [`sum_of_squares`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_of_squares_avx2(values: &[f32]) -> f32 {
    sum_of_squares_portable(values)
}

/// The sum of squares in `LANES` partial sums, then their sum (a
/// [`lane_fold`] would square the partial sums again).
#[inline(always)]
fn sum_of_squares_portable(values: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += x * x;
        }
    }
    let lanes: f32 = acc.iter().sum();
    lanes + chunks.remainder().iter().map(|x| x * x).sum::<f32>()
}

/// Folds `values` with `f` in `LANES` independent lanes (which the
/// compiler keeps in one vector register), then folds the lanes with the
/// same `f`: right for `max` and `+`, not for folds that transform their
/// element.
#[inline(always)]
fn lane_fold(values: &[f32], init: f32, f: impl Fn(f32, f32) -> f32 + Copy) -> f32 {
    let mut acc = [init; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = f(*a, x);
        }
    }
    let lanes = acc.into_iter().fold(init, f);
    chunks.remainder().iter().fold(lanes, |a, &x| f(a, x))
}

/// `e^x` for `x <= 0` (a score minus its row's maximum), within about two
/// ulp: Cody-Waite reduction to `x = n ln 2 + r` with `|r| <= ln 2 / 2`,
/// a degree-6 polynomial for `e^r`, and `2^n` built in the exponent bits.
/// Below `-87.3` the result is the smallest normal float rather than zero,
/// which beside a row maximum of `e^0 = 1` changes nothing. Branch-free,
/// so that loops over it vectorise.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.336_54, 0.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // n is in [-126, 0]: its bits sit at the bottom of t's mantissa.
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits(((n_int + 127) << 23) as u32);
    er * scale
}

/// The softmax of `row` in f64, for tests.
#[cfg(test)]
pub(super) fn reference_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = row.iter().map(|&x| f64::from(x - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|v| (v / sum) as f32).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    use proptest::prelude::*;

    #[test]
    fn exp_matches_the_library_exp_to_a_few_ulp() {
        let mut worst = 0f32;
        let mut x = 0f32;
        while x > -87.0 {
            let got = exp_nonpositive(x);
            let want = x.exp();
            worst = worst.max((got - want).abs() / want);
            x -= 0.001_7;
        }
        assert!(worst < 4.0 * f32::EPSILON, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
    }

    proptest! {
        #[test]
        fn rows_match_a_double_precision_softmax(
            row in prop::collection::vec(-60f32..60.0, 1..70),
        ) {
            let want = reference_softmax(&row);
            // The portable build, then the AVX2 one where the CPU has it.
            for avx2 in [false, has_avx2()] {
                let mut got = row.clone();
                softmax_row(&mut got, avx2);
                for (g, w) in got.iter().zip(&want) {
                    prop_assert!((g - w).abs() <= 1e-6 + 1e-5 * w, "{g} vs {w}");
                }
            }
        }

        #[test]
        fn silu_mul_matches_a_double_precision_one(
            pairs in prop::collection::vec((-120f32..120.0, -8f32..8.0), 1..70),
        ) {
            let up: Vec<f32> = pairs.iter().map(|p| p.1).collect();
            for avx2 in [false, has_avx2()] {
                let mut gate: Vec<f32> = pairs.iter().map(|p| p.0).collect();
                silu_mul_row(&mut gate, &up, avx2);
                for (got, &(g, u)) in gate.iter().zip(&pairs) {
                    let (g, u) = (f64::from(g), f64::from(u));
                    let want = g / (1.0 + (-g).exp()) * u;
                    let got = f64::from(*got);
                    prop_assert!((got - want).abs() <= 1e-6 + 1e-6 * want.abs(), "{got} vs {want}");
                }
            }
        }
    }
}
