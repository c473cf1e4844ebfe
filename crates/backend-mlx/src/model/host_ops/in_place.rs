//! The host ops over MLX arrays: each evaluates an op's fresh output and
//! rewrites its rows in place.

use mlx_rs::{error::Exception, ops::indexing::IndexOp, Array, Dtype};

use super::kernels::{has_avx2, silu_mul_row, softmax_row, sum_of_squares};
use crate::team;

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

/// Below this many elements an op runs on the calling thread alone: even
/// with the team's spinning helpers, handing out parts costs a few
/// microseconds.
const PARALLEL_FROM: usize = 1 << 15;

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
    let parts = if len < PARALLEL_FROM {
        1
    } else {
        team::parts().min(rows).max(1)
    };
    let per_part = rows.div_ceil(parts);
    // Each part takes its own contiguous rows.
    team::for_each_slice(
        data.chunks_mut(per_part * row_len).collect(),
        |part, chunk| {
            for (i, row) in chunk.chunks_exact_mut(row_len).enumerate() {
                f(part * per_part + i, row);
            }
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::model::host_ops::kernels::reference_softmax;

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
