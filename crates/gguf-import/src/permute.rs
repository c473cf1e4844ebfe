//! Undoing llama.cpp's per-head row permutation of `q_proj` and `k_proj`.
//!
//! llama.cpp's converter reorders the rows of each head from the
//! Hugging Face order `(2, head_dim / 2)` to `(head_dim / 2, 2)` so that its
//! rotary embedding can rotate adjacent pairs. Going back reshapes the rows
//! to `(n_heads, head_dim / 2, 2)`, swaps the last two axes and flattens
//! again. Only whole rows move, so the same permutation applies to packed
//! quantized rows and to their scales and biases: quantization groups run
//! along a row, never across rows.

use crate::tensor::RawTensor;

/// The source row (in GGUF order) of each output row (in Hugging Face
/// order), or `None` if `rows` is not `n_heads` heads of an even size.
pub fn source_rows(rows: usize, n_heads: usize) -> Option<Vec<usize>> {
    if n_heads == 0 || !rows.is_multiple_of(n_heads) || !(rows / n_heads).is_multiple_of(2) {
        return None;
    }
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut src = Vec::with_capacity(rows);
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..half {
                src.push(h * head_dim + 2 * i + j);
            }
        }
    }
    Some(src)
}

/// Reorders the rows of `tensor` from llama.cpp's order back to Hugging
/// Face's. Returns `None` when the row count does not split into `n_heads`
/// heads of an even size.
pub fn unpermute_rows(tensor: &RawTensor, n_heads: usize) -> Option<RawTensor> {
    let rows = tensor.rows();
    let src = source_rows(rows, n_heads)?;
    let row_bytes = tensor.data.len().checked_div(rows)?;
    let mut data = Vec::with_capacity(tensor.data.len());
    for s in src {
        data.extend_from_slice(tensor.data.get(s * row_bytes..(s + 1) * row_bytes)?);
    }
    Some(RawTensor {
        dtype: tensor.dtype,
        shape: tensor.shape.clone(),
        data,
    })
}
