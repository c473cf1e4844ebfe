//! KV cache accounting in fixed-size blocks.

use std::collections::BTreeSet;

/// Hands out KV block ids from a fixed pool.
///
/// These ids are the backend's memory: the tables built from them go to the
/// backend with every plan and index its block pool. The lowest free id is
/// always handed out first, so the ids in use stay packed at the bottom of
/// the pool and a backend that grows its pool on demand stays as small as
/// the blocks in use allow. Allocation and release are O(log n) per block.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    total: usize,
    free: BTreeSet<u32>,
}

impl BlockAllocator {
    /// A pool of `total` blocks of `block_size` tokens each.
    pub fn new(total: usize, block_size: usize) -> Self {
        let top = u32::try_from(total).unwrap_or(u32::MAX);
        Self {
            block_size: block_size.max(1),
            total: top as usize,
            free: (0..top).collect(),
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks not assigned to any request.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Blocks assigned to requests.
    pub fn used(&self) -> usize {
        self.total - self.free.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `table` to at least `blocks` blocks. Returns false, changing
    /// nothing, when the pool has too few free blocks.
    pub fn grow_to(&mut self, table: &mut Vec<u32>, blocks: usize) -> bool {
        let missing = blocks.saturating_sub(table.len());
        if missing > self.free.len() {
            return false;
        }
        for _ in 0..missing {
            if let Some(id) = self.free.pop_first() {
                table.push(id);
            }
        }
        true
    }

    /// Returns every block of `table` to the pool and empties it.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.extend(table.drain(..));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grows_releases_and_refuses_without_side_effects() {
        let mut a = BlockAllocator::new(4, 16);
        assert_eq!(a.blocks_for(0), 0);
        assert_eq!(a.blocks_for(16), 1);
        assert_eq!(a.blocks_for(17), 2);
        let mut t = vec![];
        assert!(a.grow_to(&mut t, 3));
        assert_eq!(t, vec![0, 1, 2]);
        assert!(a.grow_to(&mut t, 2), "a table never shrinks by growing");
        assert_eq!((a.used(), a.free()), (3, 1));
        let mut u = vec![];
        assert!(!a.grow_to(&mut u, 2));
        assert!(u.is_empty());
        assert_eq!(a.free(), 1);
        a.release(&mut t);
        assert!(t.is_empty());
        assert_eq!((a.used(), a.free()), (0, 4));
        let mut v = vec![];
        assert!(a.grow_to(&mut v, 2));
        assert_eq!(v, vec![0, 1], "the lowest free ids come first");
    }

    proptest! {
        #[test]
        fn blocks_are_never_shared_or_lost(ops in proptest::collection::vec((0usize..4, 0usize..6), 1..60)) {
            let mut a = BlockAllocator::new(10, 4);
            let mut tables: Vec<Vec<u32>> = vec![vec![]; 4];
            for (who, want) in ops {
                if want == 0 {
                    a.release(&mut tables[who]);
                } else {
                    let before = tables[who].len();
                    let target = before + want;
                    let ok = a.grow_to(&mut tables[who], target);
                    prop_assert_eq!(tables[who].len(), if ok { target } else { before });
                }
                let mut all: Vec<u32> = tables.iter().flatten().copied().collect();
                let held = all.len();
                all.sort_unstable();
                all.dedup();
                prop_assert_eq!(all.len(), held, "a block is in two tables");
                prop_assert_eq!(held + a.free(), 10);
                prop_assert!(all.iter().all(|&b| b < 10));
            }
        }
    }
}
