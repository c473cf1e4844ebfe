//! A batched key/value cache: one padded row per sequence.
//!
//! Each layer keeps keys and values as one `[rows, kv_heads, cols,
//! head_dim]` array (stored flat, so that a step writes every new token of
//! every sequence with a single scatter per array). A sequence owns a row
//! from registration to release; its token at position `p` lives in column
//! `p`. This is what lets one decode step attend over all running sequences
//! with one batched attention call and a mask, while sequences join and
//! leave between steps without touching the others' rows.
//!
//! Rows and columns grow geometrically when a step needs more, by padding
//! (one copy, rare, which also drops free rows above the highest one in
//! use); when every sequence has left, the arrays are dropped.
//! Memory is therefore `rows x longest sequence`, not the sum of lengths:
//! the padding is the price of batched attention without gathers.

use mlx_rs::{
    ops::{self, indexing::IndexOp},
    Array, Dtype,
};

/// Column growth granularity, so that growing is rare.
const COL_CHUNK: usize = 256;
/// Row growth granularity.
const ROW_CHUNK: usize = 4;

/// The cache's shape constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Transformer blocks.
    pub layers: usize,
    /// Key/value heads per block.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl KvLayout {
    /// Bytes that one token's keys and values take over all layers.
    pub fn bytes_per_token(&self, dtype: Dtype) -> usize {
        self.layers * 2 * self.kv_heads * self.head_dim * dtype_size(dtype)
    }
}

fn dtype_size(dtype: Dtype) -> usize {
    match dtype {
        Dtype::Float16 | Dtype::Bfloat16 => 2,
        Dtype::Float64 => 8,
        _ => 4,
    }
}

/// Keys and values of every layer, plus which rows are in use.
pub struct KvCache {
    layout: KvLayout,
    dtype: Dtype,
    rows: usize,
    cols: usize,
    /// Per layer: keys and values, flat `[rows * kv_heads * cols,
    /// head_dim]`, or nothing while the cache is empty.
    arrays: Vec<(Array, Array)>,
    /// Tokens written in each row; `None` for a free row.
    lengths: Vec<Option<usize>>,
}

impl KvCache {
    /// An empty cache; nothing is allocated until a row is used.
    pub fn new(layout: KvLayout, dtype: Dtype) -> Self {
        Self {
            layout,
            dtype,
            rows: 0,
            cols: 0,
            arrays: Vec::new(),
            lengths: Vec::new(),
        }
    }

    /// The shape constants.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Allocated rows (sequences the arrays can hold without growing).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Allocated columns (the longest sequence without growing).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes currently allocated for keys and values.
    pub fn allocated_bytes(&self) -> usize {
        self.rows * self.cols * self.layout.bytes_per_token(self.dtype)
    }

    /// Takes a free row (the lowest, so that live rows stay packed at the
    /// top and decode attention spans few rows) and returns it.
    pub fn acquire_row(&mut self) -> usize {
        if let Some(row) = self.lengths.iter().position(Option::is_none) {
            self.lengths[row] = Some(0);
            return row;
        }
        self.lengths.push(Some(0));
        self.lengths.len() - 1
    }

    /// Frees a row; when no row is in use, the arrays are dropped.
    pub fn release_row(&mut self, row: usize) {
        if let Some(len) = self.lengths.get_mut(row) {
            *len = None;
        }
        while self.lengths.last().is_some_and(Option::is_none) {
            self.lengths.pop();
        }
        if self.lengths.is_empty() {
            self.arrays.clear();
            self.rows = 0;
            self.cols = 0;
        }
    }

    /// Tokens written in `row`.
    pub fn len(&self, row: usize) -> usize {
        self.lengths.get(row).copied().flatten().unwrap_or(0)
    }

    /// Whether no row is in use.
    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Rows in use or below a row in use: what decode attention spans.
    pub fn live_rows(&self) -> usize {
        self.lengths.len()
    }

    /// Records that `row` now holds `len` tokens (after a step wrote them).
    pub fn set_len(&mut self, row: usize, len: usize) {
        if let Some(slot) = self.lengths.get_mut(row) {
            *slot = Some(len);
        }
    }

    /// Makes room for `live_rows()` rows of `cols` tokens, growing by
    /// padding the existing arrays (existing data is kept in place).
    pub fn reserve(&mut self, cols: usize) -> mlx_rs::error::Result<()> {
        let need_rows = self.lengths.len();
        if need_rows <= self.rows && cols <= self.cols && !self.arrays.is_empty() {
            return Ok(());
        }
        // Growing copies the arrays anyway, so rows above the highest one
        // in use are left out of the copy: a long sequence that outlives a
        // burst of short ones does not keep paying for their rows.
        let new_rows = need_rows.max(1).div_ceil(ROW_CHUNK) * ROW_CHUNK;
        let new_cols = cols.max(self.cols).max(1).div_ceil(COL_CHUNK) * COL_CHUNK;
        let (h, d) = (self.layout.kv_heads as i32, self.layout.head_dim as i32);
        let flat = [(new_rows as i32) * h * (new_cols as i32), d];
        let kept = self.rows.min(new_rows);
        let mut arrays = Vec::with_capacity(self.layout.layers);
        for layer in 0..self.layout.layers {
            let grow = |old: Option<&Array>| -> mlx_rs::error::Result<Array> {
                match old {
                    Some(old) if self.rows > 0 => {
                        let four = old.reshape(&[self.rows as i32, h, self.cols as i32, d])?;
                        let four = if kept < self.rows {
                            four.index(0..kept as i32)
                        } else {
                            four
                        };
                        let widths = [
                            (0, (new_rows - kept) as i32),
                            (0, 0),
                            (0, (new_cols - self.cols) as i32),
                            (0, 0),
                        ];
                        ops::pad(&four, &widths[..], None, None)?.reshape(&flat)
                    }
                    _ => ops::zeros_dtype(&flat, self.dtype),
                }
            };
            let old = self.arrays.get(layer);
            let keys = grow(old.map(|o| &o.0))?;
            let values = grow(old.map(|o| &o.1))?;
            arrays.push((keys, values));
        }
        mlx_rs::transforms::eval(arrays.iter().flat_map(|(k, v)| [k, v]))?;
        self.arrays = arrays;
        self.rows = new_rows;
        self.cols = new_cols;
        Ok(())
    }

    /// The flat index of `(row, head 0, position)`; head `h` adds
    /// `h * cols`.
    pub fn slot(&self, row: usize, position: usize) -> i32 {
        ((row * self.layout.kv_heads) * self.cols + position) as i32
    }

    /// Layer `layer`'s keys and values (flat).
    pub(crate) fn layer(&self, layer: usize) -> Option<&(Array, Array)> {
        self.arrays.get(layer)
    }

    /// Replaces layer `layer`'s arrays with the step's updated ones; the old
    /// handles are dropped here so that MLX can update the buffers in place.
    pub(crate) fn set_layer(&mut self, layer: usize, keys: Array, values: Array) {
        if let Some(slot) = self.arrays.get_mut(layer) {
            *slot = (keys, values);
        }
    }

    /// Every array, for evaluation.
    pub(crate) fn all_arrays(&self) -> impl Iterator<Item = &Array> {
        self.arrays.iter().flat_map(|(k, v)| [k, v])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            layers: 2,
            kv_heads: 2,
            head_dim: 4,
        }
    }

    #[test]
    fn rows_are_reused_lowest_first_and_the_cache_empties() {
        let mut c = KvCache::new(layout(), Dtype::Float32);
        assert_eq!(c.acquire_row(), 0);
        assert_eq!(c.acquire_row(), 1);
        assert_eq!(c.acquire_row(), 2);
        c.release_row(1);
        assert_eq!(c.live_rows(), 3);
        assert_eq!(c.acquire_row(), 1);
        c.release_row(2);
        assert_eq!(c.live_rows(), 2, "trailing free rows are trimmed");
        c.reserve(10).unwrap();
        assert_eq!((c.rows(), c.cols()), (4, 256));
        c.release_row(0);
        c.release_row(1);
        assert!(c.is_empty());
        assert_eq!(c.allocated_bytes(), 0);
    }

    #[test]
    fn growing_columns_drops_free_rows_above_the_last_in_use() {
        let mut c = KvCache::new(layout(), Dtype::Float32);
        for _ in 0..9 {
            c.acquire_row();
        }
        c.reserve(10).unwrap();
        assert_eq!((c.rows(), c.cols()), (12, 256));
        for row in 1..9 {
            c.release_row(row);
        }
        assert_eq!(c.live_rows(), 1);
        c.reserve(10).unwrap();
        assert_eq!(c.rows(), 12, "no growth, no copy");
        c.reserve(300).unwrap();
        assert_eq!((c.rows(), c.cols()), (4, 512));
        assert_eq!(c.layer(0).unwrap().0.dim(0), 4 * 2 * 512);
    }

    #[test]
    fn growing_keeps_existing_entries_in_place() {
        let mut c = KvCache::new(layout(), Dtype::Float32);
        let row = c.acquire_row();
        c.reserve(3).unwrap();
        let (keys, _) = c.layer(0).unwrap().clone();
        let n = keys.dim(0);
        let mut data = vec![0f32; (n * 4) as usize];
        let slot = c.slot(row, 2) as usize;
        data[slot * 4..slot * 4 + 4].copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
        let filled = Array::from_slice(&data, &[n, 4]);
        c.set_layer(0, filled.clone(), filled);
        for _ in 0..5 {
            c.acquire_row();
        }
        c.reserve(300).unwrap();
        assert_eq!((c.rows(), c.cols()), (8, 512));
        let (keys, _) = c.layer(0).unwrap();
        let slot = c.slot(row, 2) as usize;
        let got = keys.as_slice::<f32>()[slot * 4..slot * 4 + 4].to_vec();
        assert_eq!(got, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            keys.as_slice::<f32>().iter().filter(|&&x| x != 0.0).count(),
            4
        );
    }
}
