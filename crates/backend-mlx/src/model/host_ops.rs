//! The softmax of a prefill chunk's attention scores, on the host, in
//! place (CPU device, f32 only).
//!
//! MLX's CPU backend computes `exp` one element at a time (about 10 ns an
//! element, 2.5 ns inside a compiled function) on one thread, and a
//! chunk's scores hold `heads * chunk * span` values: at a 2k-token prompt
//! the softmax took a third of prefill, more than the attention's matmuls.
//! Here each row is normalised over only the keys its query may see (the
//! causal part; the rest is written as zeros, without an exp), with a
//! polynomial `exp` written so that the compiler vectorises it, on every
//! core, in the scores' own buffer. The buffer is one the matmul just made
//! and nothing else holds, so writing it in place is sound and saves both
//! a copy and a fresh allocation (which on Linux means page faults).

use mlx_rs::{error::Exception, Array, Dtype};

type MlxResult<T> = Result<T, Exception>;

/// Which keys each row of a chunk's scores may see: rows are `[heads,
/// queries]` flattened, and query `i` (at position `position + i`) sees the
/// keys up to its own position.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CausalRows {
    /// Queries in the chunk.
    pub(crate) queries: usize,
    /// Absolute position of the first query.
    pub(crate) position: usize,
}

impl CausalRows {
    /// Keys row `row` may see, out of `span`.
    fn visible(self, row: usize, span: usize) -> usize {
        (self.position + row % self.queries.max(1) + 1).min(span)
    }
}

/// Turns `scores` (`[.., rows, span]`, f32, just made by a matmul and held
/// nowhere else) into attention weights in place: for every row, the
/// softmax over its visible keys and zero past them. Returns the same
/// array, evaluated.
pub(crate) fn softmax_in_place(scores: Array, rows: CausalRows) -> MlxResult<Array> {
    if scores.dtype() != Dtype::Float32 {
        return Err(Exception::custom("the host softmax takes f32 scores"));
    }
    let span = scores.shape().last().copied().unwrap_or(0).max(0) as usize;
    // Evaluates, and checks that the buffer is one row-major block.
    let len = scores
        .try_as_slice::<f32>()
        .map_err(|e| Exception::custom(format!("scores for the host softmax: {e}")))?
        .len();
    if span == 0 || len % span != 0 {
        return Err(Exception::custom("scores with no keys"));
    }
    // SAFETY: `scores` is evaluated, f32 and row-contiguous with `len`
    // elements (checked above), so its data pointer addresses `len` f32s.
    // The pointer comes from MLX, not from a Rust reference, and the array
    // is the fresh output of a matmul that this function owns, so no other
    // array shares the buffer and nothing reads it while it is written.
    let data = unsafe {
        let ptr = mlx_sys::mlx_array_data_float32(scores.as_ptr()) as *mut f32;
        if ptr.is_null() {
            return Err(Exception::custom("scores without data"));
        }
        std::slice::from_raw_parts_mut(ptr, len)
    };
    let total_rows = len / span;
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(total_rows.div_ceil(16))
        .max(1);
    let per_thread = total_rows.div_ceil(threads);
    std::thread::scope(|scope| {
        for (t, part) in data.chunks_mut(per_thread * span).enumerate() {
            scope.spawn(move || {
                for (i, row) in part.chunks_exact_mut(span).enumerate() {
                    let visible = rows.visible(t * per_thread + i, span);
                    let (seen, hidden) = row.split_at_mut(visible);
                    softmax_row(seen);
                    hidden.fill(0.0);
                }
            });
        }
    });
    Ok(scores)
}

/// Lanes the loops below are written in, so that each becomes vector code.
const LANES: usize = 8;

/// `row <- softmax(row)`, in the widest vectors the machine has.
fn softmax_row(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, the one requirement of this function.
        unsafe { softmax_row_avx2(row) };
        return;
    }
    softmax_row_portable(row);
}

/// [`softmax_row_portable`] compiled for AVX2: the same code, twice the
/// lanes of the baseline SSE2 build.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn softmax_row_avx2(row: &mut [f32]) {
    softmax_row_portable(row);
}

/// `row <- softmax(row)`; inlined into each target-specific copy.
#[inline(always)]
fn softmax_row_portable(row: &mut [f32]) {
    if row.is_empty() {
        return;
    }
    let max = lane_fold(row, f32::NEG_INFINITY, f32::max);
    for x in row.iter_mut() {
        *x = exp_nonpositive(*x - max);
    }
    let sum = lane_fold(row, 0.0, |a, b| a + b);
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// Folds `values` with `f` in `LANES` independent lanes (which the
/// compiler keeps in one vector register), then folds the lanes.
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    use proptest::prelude::*;

    fn reference_softmax(row: &[f32]) -> Vec<f32> {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = row.iter().map(|&x| f64::from(x - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|v| (v / sum) as f32).collect()
    }

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
            let mut got = row.clone();
            softmax_row(&mut got);
            for (g, w) in got.iter().zip(&want) {
                prop_assert!((g - w).abs() <= 1e-6 + 1e-5 * w, "{g} vs {w}");
            }
        }
    }

    /// The in-place softmax over an MLX matmul's output: each row sees its
    /// causal prefix, rows of later heads start over at the first query,
    /// and everything past a row's visible keys is zero.
    #[test]
    fn softmax_in_place_is_causal_per_head() {
        let (heads, queries, span, position) = (2usize, 5usize, 16usize, 3usize);
        let values: Vec<f32> = (0..heads * queries * 4)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let a = Array::from_slice(&values, &[heads as i32, queries as i32, 4]);
        let b: Vec<f32> = (0..4 * span)
            .map(|i| ((i * 11 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let b = Array::from_slice(&b, &[4, span as i32]);
        let scores = mlx_rs::ops::matmul(&a, &b).unwrap();
        let plain = scores.try_as_slice::<f32>().unwrap().to_vec();
        let rows = CausalRows { queries, position };
        let weights = softmax_in_place(scores, rows).unwrap();
        let got = weights.as_slice::<f32>();
        for r in 0..heads * queries {
            let visible = position + r % queries + 1;
            let row = &got[r * span..(r + 1) * span];
            let want = reference_softmax(&plain[r * span..r * span + visible]);
            for (g, w) in row.iter().zip(&want) {
                assert!((g - w).abs() < 1e-6, "row {r}: {g} vs {w}");
            }
            assert!(row[visible..].iter().all(|&x| x == 0.0), "row {r} leaks");
        }
    }
}
