//! The KV cache as a pool of fixed-size blocks, indexed by the scheduler's
//! block ids.
//!
//! Each layer keeps keys and values as one
//! `[blocks * block_size, kv_heads * head_dim]` array: row
//! `b * block_size + i` holds token `i` of block `b`, so a block is one
//! contiguous run of rows. A step writes every new
//! token of every sequence with one scatter per array (in place, since the
//! pool holds the only handle), and attention reads a sequence's tokens by
//! gathering its whole blocks along the first axis, in table order (the
//! fast, contiguous case of MLX's gather; a heads-outermost layout that
//! gathers along an inner axis measured slower). So the memory is the
//! blocks in use, whatever the mix of lengths: no row is padded to the
//! longest sequence.
//!
//! The pool is allocated on demand: it covers the highest block id used so
//! far, rounded up to a growth step of [`KvPool::growth_blocks`], never more
//! than the configured `num_blocks`. It is kept while idle, since freed
//! blocks still hold the prefix cache. The
//! scheduler hands out the lowest free ids first, so the pool stays about as
//! large as the blocks in use: allocated bytes are at most `(highest id in
//! used + 1 + growth step) * block bytes`, and at most the whole budget.

use batching_types::KvBlocks;
use mlx_rs::{ops, Array, Dtype};

/// The shape constants of one token's keys and values.
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

    /// Width of one token's keys (or values) in one layer.
    pub fn width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

fn dtype_size(dtype: Dtype) -> usize {
    match dtype {
        Dtype::Float16 | Dtype::Bfloat16 => 2,
        Dtype::Float64 => 8,
        _ => 4,
    }
}

/// Keys and values of every layer, in blocks.
pub struct KvPool {
    layout: KvLayout,
    dtype: Dtype,
    blocks: Option<KvBlocks>,
    /// Blocks the arrays hold now.
    allocated: usize,
    /// Per layer: keys and values, `[allocated * block_size, kv_heads *
    /// head_dim]`, or nothing while the pool is empty.
    arrays: Vec<(Array, Array)>,
}

impl KvPool {
    /// An unconfigured, empty pool.
    pub fn new(layout: KvLayout, dtype: Dtype) -> Self {
        Self {
            layout,
            dtype,
            blocks: None,
            allocated: 0,
            arrays: Vec::new(),
        }
    }

    /// Sets the block layout; the pool must be empty.
    pub fn configure(&mut self, blocks: KvBlocks) {
        self.arrays.clear();
        self.allocated = 0;
        self.blocks = Some(blocks);
    }

    /// The block layout, once configured.
    pub fn blocks(&self) -> Option<KvBlocks> {
        self.blocks
    }

    /// The shape constants.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Blocks the pool holds now.
    pub fn allocated_blocks(&self) -> usize {
        self.allocated
    }

    /// Bytes of one block over all layers.
    pub fn block_bytes(&self) -> usize {
        self.blocks.map_or(0, |b| b.block_size) * self.layout.bytes_per_token(self.dtype)
    }

    /// Bytes currently allocated for keys and values.
    pub fn allocated_bytes(&self) -> usize {
        self.allocated * self.block_bytes()
    }

    /// How many blocks the pool grows by at a time: a sixteenth of the
    /// budget, at least 16 blocks, so that growing (a copy) is rare.
    pub fn growth_blocks(&self) -> usize {
        self.blocks.map_or(0, |b| b.num_blocks.div_ceil(16).max(16))
    }

    /// Makes the arrays cover block ids below `needed`, growing by padding
    /// (the existing blocks stay in place).
    pub fn ensure(&mut self, needed: usize) -> mlx_rs::error::Result<()> {
        let Some(blocks) = self.blocks else {
            return Err(mlx_rs::error::Exception::custom(
                "the KV pool was not configured",
            ));
        };
        if needed <= self.allocated && !self.arrays.is_empty() {
            return Ok(());
        }
        let step = self.growth_blocks();
        let target = needed
            .max(1)
            .div_ceil(step)
            .saturating_mul(step)
            .min(blocks.num_blocks);
        if target < needed {
            return Err(mlx_rs::error::Exception::custom(format!(
                "block {} is outside the pool of {} blocks",
                needed - 1,
                blocks.num_blocks
            )));
        }
        let bs = blocks.block_size;
        let width = self.layout.width() as i32;
        let dtype = self.dtype;
        // One array at a time, each old one dropped as soon as its larger
        // copy exists, so that growing costs one array's worth of memory on
        // top of the pool, not a second pool. An array already at the
        // target (after a growth that failed half-way) is left as it is.
        let grow = |array: &mut Array| -> mlx_rs::error::Result<()> {
            let have = array.dim(0) as usize / bs;
            if have >= target {
                return Ok(());
            }
            let fresh = ops::zeros_dtype(&[((target - have) * bs) as i32, width], dtype)?;
            let grown = if have == 0 {
                fresh
            } else {
                ops::concatenate(&[&*array, &fresh], 0)?
            };
            grown.eval()?;
            *array = grown;
            Ok(())
        };
        if self.arrays.is_empty() {
            let empty = || ops::zeros_dtype(&[0, width], dtype);
            for _ in 0..self.layout.layers {
                self.arrays.push((empty()?, empty()?));
            }
        }
        for (keys, values) in &mut self.arrays {
            grow(keys)?;
            grow(values)?;
        }
        self.allocated = target;
        Ok(())
    }

    /// Layer `layer`'s keys and values.
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

    fn pool(num_blocks: usize) -> KvPool {
        let mut p = KvPool::new(
            KvLayout {
                layers: 2,
                kv_heads: 2,
                head_dim: 4,
            },
            Dtype::Float32,
        );
        p.configure(KvBlocks {
            block_size: 4,
            num_blocks,
        });
        p
    }

    #[test]
    fn the_pool_grows_in_steps_up_to_its_budget_and_keeps_its_blocks() {
        let mut p = pool(40);
        assert_eq!(p.growth_blocks(), 16);
        assert_eq!(p.allocated_bytes(), 0);
        p.ensure(3).unwrap();
        assert_eq!(p.allocated_blocks(), 16);
        assert_eq!(p.block_bytes(), 4 * 2 * 2 * 2 * 4 * 4);
        let (keys, _) = p.layer(0).unwrap().clone();
        assert_eq!(keys.shape(), &[16 * 4, 8]);
        let mut data = vec![0f32; 16 * 4 * 8];
        data[5 * 8..6 * 8].copy_from_slice(&[1.0; 8]);
        let filled = Array::from_slice(&data, &[64, 8]);
        p.set_layer(0, filled.clone(), filled);
        p.ensure(17).unwrap();
        assert_eq!(p.allocated_blocks(), 32);
        p.ensure(33).unwrap();
        assert_eq!(p.allocated_blocks(), 40, "never past the budget");
        let (keys, _) = p.layer(0).unwrap();
        assert_eq!(keys.shape(), &[160, 8]);
        let data = keys.as_slice::<f32>();
        assert_eq!(&data[5 * 8..6 * 8], &[1.0; 8]);
        assert_eq!(data.iter().filter(|&&x| x != 0.0).count(), 8);
        assert!(p.ensure(41).is_err());
    }

    #[test]
    fn an_unconfigured_pool_refuses_to_grow() {
        let mut p = KvPool::new(
            KvLayout {
                layers: 1,
                kv_heads: 1,
                head_dim: 1,
            },
            Dtype::Float32,
        );
        assert!(p.ensure(1).is_err());
    }
}
