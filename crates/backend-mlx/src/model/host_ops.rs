//! Elementwise work of the CPU path that MLX does slowly, done on the host
//! in place (f32 only): a prefill chunk's causal softmax, the MLP's
//! `silu(gate) * up` and the RMS norms' row reductions.
//!
//! MLX's CPU backend computes `exp` one element at a time (about 10 ns an
//! element, 2.5 ns inside a compiled function) on one thread. A chunk's
//! scores hold `heads * chunk * span` values: at a 2k-token prompt the
//! softmax took a third of prefill, more than the attention's matmuls, and
//! the SiLU's exps another tenth. Here the same arithmetic runs with a
//! polynomial `exp` written so that the compiler vectorises it (AVX2 where
//! the CPU has it), on every core, and each softmax row is normalised over
//! only the keys its query may see (the rest is written as zeros, without
//! an exp). Each writes into the buffer of an op's output that nothing
//! else holds, which saves a copy and a fresh allocation (which on Linux
//! means page faults).

use mlx_rs::{error::Exception, ops::indexing::IndexOp, Array, Dtype};

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
    let span = scores.shape().last().copied().unwrap_or(0).max(0) as usize;
    let avx2 = has_avx2();
    for_rows_in_place(&scores, span, |r, row| {
        let (seen, hidden) = row.split_at_mut(rows.visible(r, span));
        softmax_row(seen, avx2);
        hidden.fill(0.0);
    })?;
    Ok(scores)
}

/// `silu(gate) * up` for `gate_up` (`[rows, 2 * width]`, f32, the gate
/// then the up projection of each row, just made by a matmul and held
/// nowhere else), written over the gate half. Returns that half, a view
/// `[rows, width]` with a row stride of `2 * width`.
pub(crate) fn silu_mul_in_place(gate_up: Array, width: usize) -> MlxResult<Array> {
    let avx2 = has_avx2();
    for_rows_in_place(&gate_up, 2 * width, |_, row| {
        let (gate, up) = row.split_at_mut(width);
        silu_mul_row(gate, up, avx2);
    })?;
    Ok(gate_up.index((.., 0..width as i32)))
}

/// RMS norm of `x` (`[rows, hidden]`, f32) with weight `w` (`[hidden]`):
/// MLX multiplies `x * w` into a fresh array (vector code), then each row
/// of that is scaled in place by its `1 / sqrt(mean(x^2) + eps)`, reduced
/// on the host. `None` when `x` or `w` is not a row-major f32 array, for
/// the caller's other path.
pub(crate) fn rms_norm(x: &Array, w: &Array, eps: f32) -> MlxResult<Option<Array>> {
    let hidden = w.size();
    if x.dtype() != Dtype::Float32
        || w.dtype() != Dtype::Float32
        || hidden == 0
        || x.shape().last().map(|&d| d as usize) != Some(hidden)
    {
        return Ok(None);
    }
    let out = x.multiply(w)?;
    let Ok(xs) = x.try_as_slice::<f32>() else {
        return Ok(None);
    };
    if xs.len() != out.size() {
        return Ok(None);
    }
    let avx2 = has_avx2();
    for_rows_in_place(&out, hidden, |r, row| {
        let sum_sq = sum_of_squares(&xs[r * hidden..(r + 1) * hidden], avx2);
        let inv = 1.0 / (sum_sq / hidden as f32 + eps).sqrt();
        for v in row.iter_mut() {
            *v *= inv;
        }
    })?;
    Ok(Some(out))
}

/// The shape of decode attention over the block pool.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolAttention {
    /// Query heads.
    pub(crate) heads: usize,
    /// KV heads; query head `h` reads KV head `h / (heads / kv_heads)`.
    pub(crate) kv_heads: usize,
    /// Values per head.
    pub(crate) head_dim: usize,
    /// Tokens per pool block.
    pub(crate) block_size: usize,
    /// The scores' scale.
    pub(crate) scale: f32,
}

/// One decoding sequence: its block table and the tokens it attends to
/// (its context and this step's token, already written to the pool).
#[derive(Debug, Clone)]
pub(crate) struct DecodeRow {
    /// Block ids, covering `len` tokens.
    pub(crate) table: Vec<u32>,
    /// Tokens attended.
    pub(crate) len: usize,
}

/// Decode attention read straight from one layer of the block pool:
/// `q` is `[rows, heads, head_dim]`, `keys` and `values` are the layer's
/// pool (`[slots, kv_heads * head_dim]`, slot `block * block_size +
/// offset`). Returns `[rows, heads * head_dim]`. No gather copies the
/// blocks and no mask pads the rows to the longest: each row reads its own
/// tokens once for all the query heads that share a KV head.
pub(crate) fn decode_attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    rows: &[DecodeRow],
    shape: PoolAttention,
) -> Result<Vec<f32>, Exception> {
    let PoolAttention {
        heads,
        kv_heads,
        head_dim: hd,
        block_size: bs,
        ..
    } = shape;
    let width = kv_heads * hd;
    if kv_heads == 0 || heads % kv_heads != 0 || hd == 0 || bs == 0 {
        return Err(Exception::custom("a decode attention shape with no heads"));
    }
    if q.len() != rows.len() * heads * hd || keys.len() != values.len() {
        return Err(Exception::custom(
            "decode attention inputs of the wrong size",
        ));
    }
    let slots = keys.len() / width;
    for row in rows {
        if row.len == 0 {
            return Err(Exception::custom("a decode row attends to no token"));
        }
        let blocks = row.len.div_ceil(bs);
        let covered = row
            .table
            .get(..blocks)
            .ok_or_else(|| Exception::custom("a block table shorter than its sequence"))?;
        if covered.iter().any(|&b| (b as usize + 1) * bs > slots) {
            return Err(Exception::custom("a block id past the KV pool"));
        }
    }
    // One thread: a layer's decode attention is short (about 0.4 ms at 32
    // rows of 90 tokens), and starting threads for it each layer cost more
    // than they saved (12 ms a step on one thread, 16 ms on two).
    let mut out = vec![0f32; q.len()];
    let row_out = heads * hd;
    let avx2 = has_avx2();
    let pool = PoolLayer {
        keys,
        values,
        shape,
    };
    for ((q_row, o), row) in q
        .chunks_exact(row_out)
        .zip(out.chunks_exact_mut(row_out))
        .zip(rows)
    {
        attend_row(q_row, &pool, row, o, avx2);
    }
    Ok(out)
}

/// One layer of the pool as decode attention reads it.
struct PoolLayer<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    shape: PoolAttention,
}

/// One row of [`decode_attention`]; `avx2` from [`has_avx2`].
fn attend_row(q: &[f32], pool: &PoolLayer<'_>, row: &DecodeRow, out: &mut [f32], avx2: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` says the CPU has AVX2 and FMA, all this needs.
        unsafe { attend_row_avx2(q, pool, row, out) };
        return;
    }
    let _ = avx2;
    attend_row_portable(q, pool, row, out, dot);
}

/// [`attend_row_portable`] compiled for AVX2, with [`dot_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_row_avx2(q: &[f32], pool: &PoolLayer<'_>, row: &DecodeRow, out: &mut [f32]) {
    // SAFETY: this function has the features `dot_avx2` needs.
    attend_row_portable(q, pool, row, out, |a, b| unsafe { dot_avx2(a, b) });
}

/// The scores of every query head against each of the row's keys, their
/// softmax, then the weighted sum of the values. Each token's keys (and
/// then values) for all KV heads are read once, in pool order, so that
/// the reads stream through memory: a layer's pool is cold in the caches
/// after the matmuls around it. Block ids were checked by the caller.
#[inline(always)]
fn attend_row_portable(
    q: &[f32],
    pool: &PoolLayer<'_>,
    row: &DecodeRow,
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    let PoolLayer {
        keys,
        values,
        shape,
    } = *pool;
    let (hd, bs, len) = (shape.head_dim, shape.block_size, row.len);
    let rep = shape.heads / shape.kv_heads;
    let width = shape.kv_heads * hd;
    // Where each token's keys start in the pool, looked up once per row.
    let starts: Vec<usize> = (0..len)
        .map(|p| (row.table[p / bs] as usize * bs + p % bs) * width)
        .collect();
    let mut scores = vec![0f32; shape.heads * len];
    for (p, &start) in starts.iter().enumerate() {
        let k = &keys[start..start + width];
        for (h, q_head) in q.chunks_exact(hd).enumerate() {
            let g = h / rep;
            scores[h * len + p] = dot(q_head, &k[g * hd..(g + 1) * hd]) * shape.scale;
        }
    }
    for head_scores in scores.chunks_exact_mut(len) {
        softmax_row_portable(head_scores);
    }
    out.fill(0.0);
    for (p, &start) in starts.iter().enumerate() {
        let v = &values[start..start + width];
        for (h, o_head) in out.chunks_exact_mut(hd).enumerate() {
            let g = h / rep;
            axpy(o_head, scores[h * len + p], &v[g * hd..(g + 1) * hd]);
        }
    }
}

/// The dot product of two equal-length vectors with AVX2 and FMA: two
/// independent 8-lane sums, so that consecutive FMAs need not wait on each
/// other. Written with intrinsics because the compiler did not make fast
/// code of the portable [`dot`]: decode attention at batch 32 took 18 ms a
/// step with it, built for AVX2, and 12 ms with this.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::{
        _mm256_add_ps, _mm256_castps256_ps128, _mm256_extractf128_ps, _mm256_fmadd_ps,
        _mm256_loadu_ps, _mm256_setzero_ps, _mm_add_ps, _mm_add_ss, _mm_cvtss_f32, _mm_movehl_ps,
        _mm_shuffle_ps,
    };
    let n = a.len().min(b.len());
    let whole = n / 16 * 16;
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i < whole {
        // SAFETY: `i + 16 <= n`, so both 8-float loads at `i` and `i + 8`
        // stay inside `a` and `b`; unaligned loads need no alignment.
        unsafe {
            let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8)), s1);
        }
        i += 16;
    }
    let s = _mm256_add_ps(s0, s1);
    let q = _mm_add_ps(_mm256_extractf128_ps::<1>(s), _mm256_castps256_ps128(s));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let q = _mm_add_ss(q, _mm_shuffle_ps::<1>(q, q));
    let tail: f32 = a[whole..n]
        .iter()
        .zip(&b[whole..n])
        .map(|(x, y)| x * y)
        .sum();
    _mm_cvtss_f32(q) + tail
}

/// The dot product of two equal-length vectors, in `LANES` partial sums.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a8, a_rest) = a.as_chunks::<LANES>();
    let (b8, b_rest) = b.as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for (x, y) in a8.iter().zip(b8) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum::<f32>()
}

/// `out += w * v`, in fixed-size lanes.
#[inline(always)]
fn axpy(out: &mut [f32], w: f32, v: &[f32]) {
    let (o8, o_rest) = out.as_chunks_mut::<LANES>();
    let (v8, v_rest) = v.as_chunks::<LANES>();
    for (o, x) in o8.iter_mut().zip(v8) {
        for l in 0..LANES {
            o[l] += w * x[l];
        }
    }
    for (o, &x) in o_rest.iter_mut().zip(v_rest) {
        *o += w * x;
    }
}

/// Below this many elements one thread does the work: starting threads
/// costs more than it saves (a decode step's rows are small).
const PARALLEL_FROM: usize = 1 << 18;

/// Evaluates `array` (f32, the fresh output of an op, held by no other
/// array) and calls `f(row index, row)` on every `row_len`-long row of its
/// buffer, the rows split across the machine's cores.
fn for_rows_in_place(
    array: &Array,
    row_len: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) -> MlxResult<()> {
    if array.dtype() != Dtype::Float32 {
        return Err(Exception::custom("host ops take f32 arrays"));
    }
    // Evaluates, and checks that the buffer is one row-major block.
    let len = array
        .try_as_slice::<f32>()
        .map_err(|e| Exception::custom(format!("an array for a host op: {e}")))?
        .len();
    if row_len == 0 || len % row_len != 0 {
        return Err(Exception::custom("a host op's rows do not tile its array"));
    }
    // SAFETY: `array` is evaluated, f32 and row-contiguous with `len`
    // elements (checked above), so its data pointer addresses `len` f32s.
    // The pointer comes from MLX, not from a Rust reference, and the array
    // is the fresh output of an op that its caller owns and that no other
    // array shares, so nothing reads the buffer while it is written.
    let data = unsafe {
        let ptr = mlx_sys::mlx_array_data_float32(array.as_ptr()) as *mut f32;
        if ptr.is_null() {
            return Err(Exception::custom("an array without data"));
        }
        std::slice::from_raw_parts_mut(ptr, len)
    };
    let rows = len / row_len;
    let threads = if len < PARALLEL_FROM {
        1
    } else {
        std::thread::available_parallelism().map_or(1, usize::from)
    }
    .min(rows)
    .max(1);
    let per_thread = rows.div_ceil(threads);
    let f = &f;
    let run = move |first: usize, part: &mut [f32]| {
        for (i, row) in part.chunks_exact_mut(row_len).enumerate() {
            f(first + i, row);
        }
    };
    if threads == 1 {
        run(0, data);
        return Ok(());
    }
    std::thread::scope(|scope| {
        for (t, part) in data.chunks_mut(per_thread * row_len).enumerate() {
            scope.spawn(move || run(t * per_thread, part));
        }
    });
    Ok(())
}

/// Whether the row kernels may use their AVX2 builds (with FMA, which
/// every AVX2 CPU has).
fn has_avx2() -> bool {
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
const LANES: usize = 8;

/// `row <- softmax(row)`; `avx2` from [`has_avx2`].
fn softmax_row(row: &mut [f32], avx2: bool) {
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
fn softmax_row_portable(row: &mut [f32]) {
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
fn silu_mul_row(gate: &mut [f32], up: &[f32], avx2: bool) {
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
fn sum_of_squares(values: &[f32], avx2: bool) -> f32 {
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

    #[test]
    fn rms_norm_matches_mlx() {
        let (rows, hidden) = (7usize, 40usize);
        let x: Vec<f32> = (0..rows * hidden)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 3.0)
            .collect();
        let x = Array::from_slice(&x, &[rows as i32, hidden as i32]);
        let w: Vec<f32> = (0..hidden).map(|i| 0.5 + i as f32 / 40.0).collect();
        let w = Array::from_slice(&w, &[hidden as i32]);
        let want = mlx_rs::fast::rms_norm(&x, Some(&w), 1e-5).unwrap();
        let got = rms_norm(&x, &w, 1e-5).unwrap().unwrap();
        let (want, got) = (want.as_slice::<f32>(), got.as_slice::<f32>());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
        // Other dtypes are the caller's to handle.
        let half = x.as_dtype(Dtype::Float16).unwrap();
        assert!(rms_norm(&half, &w, 1e-5).unwrap().is_none());
    }

    /// Decode attention from the pool against a direct computation over
    /// each row's own keys, with rows of different lengths, scattered
    /// blocks and grouped heads.
    #[test]
    fn decode_attention_matches_a_direct_computation() {
        let shape = PoolAttention {
            heads: 6,
            kv_heads: 2,
            head_dim: 11,
            block_size: 4,
            scale: 0.3,
        };
        let (heads, kv, hd, bs) = (6, 2, 11, 4);
        let width = kv * hd;
        let slots = 12 * bs;
        let val = |i: usize, m: usize| ((i * m % 37) as f32 - 18.0) / 9.0;
        let keys: Vec<f32> = (0..slots * width).map(|i| val(i, 7)).collect();
        let values: Vec<f32> = (0..slots * width).map(|i| val(i, 11)).collect();
        let rows = vec![
            DecodeRow {
                table: vec![5, 2, 9],
                len: 10,
            },
            DecodeRow {
                table: vec![0],
                len: 1,
            },
            DecodeRow {
                table: vec![11, 3, 7, 1],
                len: 16,
            },
        ];
        let q: Vec<f32> = (0..rows.len() * heads * hd).map(|i| val(i, 5)).collect();
        let got = decode_attention(&q, &keys, &values, &rows, shape).unwrap();
        // The portable build gives the same, where the AVX2 one ran above.
        let row_out = heads * hd;
        let mut portable = vec![0f32; got.len()];
        for ((q_row, o), row) in q
            .chunks_exact(row_out)
            .zip(portable.chunks_exact_mut(row_out))
            .zip(&rows)
        {
            let pool = PoolLayer {
                keys: &keys,
                values: &values,
                shape,
            };
            attend_row(q_row, &pool, row, o, false);
        }
        for (a, b) in got.iter().zip(&portable) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        for (r, row) in rows.iter().enumerate() {
            for h in 0..heads {
                let g = h / (heads / kv);
                let qh = &q[(r * heads + h) * hd..][..hd];
                let at = |p: usize| (row.table[p / bs] as usize * bs + p % bs) * width + g * hd;
                let scores: Vec<f32> = (0..row.len)
                    .map(|p| {
                        let k = &keys[at(p)..][..hd];
                        qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * 0.3
                    })
                    .collect();
                let weights = reference_softmax(&scores);
                for d in 0..hd {
                    let want: f32 = (0..row.len).map(|p| weights[p] * values[at(p) + d]).sum();
                    let got = got[(r * heads + h) * hd + d];
                    assert!(
                        (got - want).abs() < 1e-5,
                        "row {r} head {h} dim {d}: {got} vs {want}"
                    );
                }
            }
        }
        // A table that does not cover its row is an error, not a panic.
        let short = [DecodeRow {
            table: vec![0],
            len: 5,
        }];
        assert!(decode_attention(&q[..heads * hd], &keys, &values, &short, shape).is_err());
        let past = [DecodeRow {
            table: vec![12],
            len: 1,
        }];
        assert!(decode_attention(&q[..heads * hd], &keys, &values, &past, shape).is_err());
        let empty = [DecodeRow {
            table: vec![0],
            len: 0,
        }];
        assert!(decode_attention(&q[..heads * hd], &keys, &values, &empty, shape).is_err());
    }

    /// The in-place SiLU over an MLX matmul's output: the gate half of each
    /// row becomes `silu(gate) * up`, and the view returned is that half.
    #[test]
    fn silu_mul_in_place_returns_the_gate_half() {
        let (rows, width) = (3usize, 5usize);
        let a: Vec<f32> = (0..rows * 2).map(|i| i as f32 / 3.0 - 1.0).collect();
        let a = Array::from_slice(&a, &[rows as i32, 2]);
        let b: Vec<f32> = (0..2 * 2 * width)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 2.0)
            .collect();
        let b = Array::from_slice(&b, &[2, 2 * width as i32]);
        let gate_up = mlx_rs::ops::matmul(&a, &b).unwrap();
        let plain = gate_up.try_as_slice::<f32>().unwrap().to_vec();
        let act = silu_mul_in_place(gate_up, width).unwrap();
        assert_eq!(act.shape(), &[rows as i32, width as i32]);
        let got = act.reshape(&[-1]).unwrap();
        let got = got.as_slice::<f32>();
        for r in 0..rows {
            for j in 0..width {
                let g = f64::from(plain[r * 2 * width + j]);
                let u = f64::from(plain[r * 2 * width + width + j]);
                let want = (g / (1.0 + (-g).exp()) * u) as f32;
                let got = got[r * width + j];
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
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
