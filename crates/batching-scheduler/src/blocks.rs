//! KV cache accounting in fixed-size blocks, with a prefix cache.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::{DefaultHasher, Hash, Hasher},
};

/// What a full block holds, for the prefix cache: its tokens and the block
/// before it in the sequence it was written for. A block is identified by
/// its tokens *and* its whole prefix (the parent chain), since its keys and
/// values depend on every token before it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cached {
    hash: u64,
    parent: Option<u32>,
    tokens: Vec<u32>,
}

/// Hands out KV block ids from a fixed pool, and keeps full blocks of
/// finished prompts for reuse.
///
/// These ids are the backend's memory: the tables built from them go to the
/// backend with every plan and index its block pool. The lowest free id is
/// always handed out first, so the ids in use stay packed at the bottom of
/// the pool and a backend that grows its pool on demand stays as small as
/// the blocks in use allow.
///
/// # Prefix cache
///
/// A full block of a sequence can be *registered* under the hash of its
/// tokens chained to its parent's hash (vLLM's scheme). A request whose
/// context starts with registered blocks shares them by reference count
/// instead of recomputing them. A block whose last user leaves keeps its
/// hash and goes to the tail of an LRU list; it is evicted (loses its hash)
/// only when a fresh block is needed and no never-cached block is free.
/// Blocks in use are never evicted. Lookups compare the stored tokens and
/// parent too, so a hash collision can never share a wrong block.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    total: usize,
    /// Free blocks that hold nothing worth keeping.
    free: BTreeSet<u32>,
    /// Free blocks that still hold a registered prefix, by last use.
    lru: BTreeMap<u64, u32>,
    /// Users of each block.
    refs: Vec<u32>,
    /// The registered content of each block, if any.
    cached: Vec<Option<Cached>>,
    /// When each block in `lru` was last released (its key there).
    released_at: Vec<u64>,
    by_hash: HashMap<u64, u32>,
    tick: u64,
    evictions: u64,
}

impl BlockAllocator {
    /// A pool of `total` blocks of `block_size` tokens each.
    pub fn new(total: usize, block_size: usize) -> Self {
        let top = u32::try_from(total).unwrap_or(u32::MAX);
        let n = top as usize;
        Self {
            block_size: block_size.max(1),
            total: n,
            free: (0..top).collect(),
            lru: BTreeMap::new(),
            refs: vec![0; n],
            cached: vec![None; n],
            released_at: vec![0; n],
            by_hash: HashMap::new(),
            tick: 0,
            evictions: 0,
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

    /// Blocks a request can be given now: never-cached free blocks plus
    /// cached ones nobody uses (which are evicted on demand).
    pub fn free(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Blocks assigned to requests.
    pub fn used(&self) -> usize {
        self.total - self.free()
    }

    /// Free blocks that still hold a registered prefix.
    pub fn cached_free(&self) -> usize {
        self.lru.len()
    }

    /// Registered blocks evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `table` to at least `blocks` blocks. Returns false, changing
    /// nothing, when the pool has too few free blocks.
    pub fn grow_to(&mut self, table: &mut Vec<u32>, blocks: usize) -> bool {
        let missing = blocks.saturating_sub(table.len());
        if missing > self.free() {
            return false;
        }
        for _ in 0..missing {
            let id = match self.free.pop_first() {
                Some(id) => id,
                None => match self.lru.pop_first() {
                    Some((_, id)) => {
                        self.forget(id);
                        self.evictions += 1;
                        ::metrics::counter!(crate::metrics::PREFIX_EVICTIONS).increment(1);
                        id
                    }
                    None => return false,
                },
            };
            self.refs[id as usize] = 1;
            table.push(id);
        }
        true
    }

    /// Gives up every block of `table` and empties it. A block whose last
    /// user this was becomes free; if it holds a registered prefix it stays
    /// findable until it is evicted.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        // Last block first: a chain's tail then leaves the LRU before its
        // root, so eviction never strands the blocks after an evicted one.
        for id in table.drain(..).rev() {
            let i = id as usize;
            self.refs[i] = self.refs[i].saturating_sub(1);
            if self.refs[i] > 0 {
                continue;
            }
            if self.cached[i].is_some() {
                self.tick += 1;
                self.released_at[i] = self.tick;
                self.lru.insert(self.tick, id);
            } else {
                self.free.insert(id);
            }
        }
    }

    /// The registered blocks that hold the start of `tokens`, in order: at
    /// most the full blocks before its last token, which must be computed
    /// to get the next token's logits. Nothing is taken; see
    /// [`BlockAllocator::share`].
    pub fn lookup(&self, tokens: &[u32]) -> Vec<u32> {
        let mut hits = Vec::new();
        let full = tokens.len().saturating_sub(1) / self.block_size;
        let mut parent: Option<(u64, u32)> = None;
        for chunk in tokens.chunks(self.block_size).take(full) {
            let hash = chain(parent.map(|p| p.0), chunk);
            let Some(&id) = self.by_hash.get(&hash) else {
                break;
            };
            let same = self.cached[id as usize]
                .as_ref()
                .is_some_and(|c| c.tokens == chunk && c.parent == parent.map(|p| p.1));
            if !same {
                break;
            }
            hits.push(id);
            parent = Some((hash, id));
        }
        hits
    }

    /// Blocks of `table` that only one request holds: what giving up
    /// that table returns to [`BlockAllocator::free`].
    pub fn sole_owned(&self, table: &[u32]) -> usize {
        table
            .iter()
            .filter(|&&id| self.refs.get(id as usize) == Some(&1))
            .count()
    }

    /// Of `hits` (from [`BlockAllocator::lookup`]), how many are free now:
    /// sharing them takes them out of [`BlockAllocator::free`].
    pub fn idle_among(&self, hits: &[u32]) -> usize {
        hits.iter()
            .filter(|&&id| self.refs[id as usize] == 0)
            .count()
    }

    /// Takes a reference on each block of `hits` and appends them to
    /// `table` (which must be empty): the request reads them as its first
    /// blocks.
    pub fn share(&mut self, table: &mut Vec<u32>, hits: &[u32]) {
        for &id in hits {
            let i = id as usize;
            if self.refs[i] == 0 {
                self.lru.remove(&self.released_at[i]);
            }
            self.refs[i] += 1;
            table.push(id);
        }
    }

    /// Registers the full blocks of `table` that hold `tokens` (the
    /// sequence's tokens written so far), so later requests can share
    /// them. Blocks already registered are kept; a block whose content is
    /// already registered under another id stays private.
    pub fn register(&mut self, table: &[u32], tokens: &[u32]) {
        let mut parent: Option<(u64, u32)> = None;
        for (chunk, &id) in tokens.chunks_exact(self.block_size).zip(table) {
            let hash = chain(parent.map(|p| p.0), chunk);
            let i = id as usize;
            match self.by_hash.get(&hash).copied() {
                Some(owner) if owner == id => {}
                // A registration whose parent was evicted can never be
                // found again; an idle one gives its hash to this block.
                Some(other) if self.stale(other, parent.map(|p| p.1), chunk) => {
                    self.forget(other);
                    if self.lru.remove(&self.released_at[other as usize]).is_some() {
                        self.free.insert(other);
                    }
                    if self.cached[i].is_none() {
                        self.cached[i] = Some(Cached {
                            hash,
                            parent: parent.map(|p| p.1),
                            tokens: chunk.to_vec(),
                        });
                        self.by_hash.insert(hash, id);
                    } else {
                        return;
                    }
                }
                // Another block holds this prefix (two requests computed it
                // at once): this copy, and the rest of the sequence after
                // it, stay private and are freed as usual.
                Some(_) => return,
                None if self.cached[i].is_none() => {
                    self.cached[i] = Some(Cached {
                        hash,
                        parent: parent.map(|p| p.1),
                        tokens: chunk.to_vec(),
                    });
                    self.by_hash.insert(hash, id);
                }
                None => return,
            }
            parent = Some((hash, id));
        }
    }

    /// Whether block `id`'s registration is unreachable (its parent is no
    /// longer the block before it) and unused, so it may be replaced.
    fn stale(&self, id: u32, parent: Option<u32>, tokens: &[u32]) -> bool {
        let i = id as usize;
        self.refs[i] == 0
            && self.cached[i]
                .as_ref()
                .is_some_and(|c| c.parent != parent || c.tokens != tokens)
    }

    /// Drops a block's registration (it is about to be reused).
    fn forget(&mut self, id: u32) {
        if let Some(c) = self.cached[id as usize].take() {
            if self.by_hash.get(&c.hash) == Some(&id) {
                self.by_hash.remove(&c.hash);
            }
        }
    }
}

/// The hash of a block's tokens chained to its parent's hash.
fn chain(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
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

    #[test]
    fn registered_blocks_are_shared_kept_after_release_and_evicted_last() {
        let mut a = BlockAllocator::new(4, 2);
        let tokens = [1, 2, 3, 4, 5];
        let mut t = vec![];
        assert!(a.grow_to(&mut t, 3));
        a.register(&t, &tokens[..4]);
        // Only full blocks before the last token are offered.
        assert_eq!(a.lookup(&tokens), vec![0, 1]);
        assert_eq!(a.lookup(&[1, 2, 3, 4]), vec![0]);
        assert_eq!(a.lookup(&[1, 9, 3, 4, 5]), Vec::<u32>::new());
        assert_eq!(
            a.lookup(&[7, 7, 3, 4, 5]),
            Vec::<u32>::new(),
            "parents matter"
        );
        // A second user shares the blocks.
        let hits = a.lookup(&tokens);
        assert_eq!(a.idle_among(&hits), 0);
        let mut u = vec![];
        a.share(&mut u, &hits);
        assert_eq!(a.used(), 3);
        a.release(&mut t);
        assert_eq!((a.used(), a.free(), a.cached_free()), (2, 2, 0));
        a.release(&mut u);
        assert_eq!((a.used(), a.free(), a.cached_free()), (0, 4, 2));
        // Still findable while free; taking them back leaves the LRU.
        let hits = a.lookup(&tokens);
        assert_eq!(a.idle_among(&hits), 2);
        let mut w = vec![];
        a.share(&mut w, &hits);
        assert_eq!((a.used(), a.cached_free()), (2, 0));
        a.release(&mut w);
        // Never-cached blocks go first; cached ones are evicted oldest first.
        let mut x = vec![];
        assert!(a.grow_to(&mut x, 2));
        assert_eq!((a.evictions(), a.lookup(&tokens).len()), (0, 2));
        assert!(a.grow_to(&mut x, 3));
        assert_eq!(a.evictions(), 1);
        assert!(a.lookup(&tokens).len() < 2);
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

        #[test]
        fn a_block_in_use_is_never_evicted_and_counts_stay_whole(
            ops in proptest::collection::vec((0usize..4, 0usize..5, 0u32..3), 1..80),
        ) {
            let mut a = BlockAllocator::new(12, 2);
            let mut tables: Vec<Vec<u32>> = vec![vec![]; 4];
            let prompt = |k: u32| -> Vec<u32> { (0..7).map(|i| i / 3 + k).collect() };
            for (who, want, k) in ops {
                if want == 0 {
                    a.release(&mut tables[who]);
                    continue;
                }
                if tables[who].is_empty() {
                    let tokens = prompt(k);
                    let hits = a.lookup(&tokens);
                    let fresh = a.blocks_for(tokens.len()) - hits.len();
                    if fresh + a.idle_among(&hits) <= a.free() {
                        a.share(&mut tables[who], &hits);
                        prop_assert!(a.grow_to(&mut tables[who], a.blocks_for(tokens.len())));
                        a.register(&tables[who], &tokens[..6]);
                    }
                } else {
                    let target = tables[who].len() + want;
                    a.grow_to(&mut tables[who], target);
                }
                // Every block held by a table has a user; free + used = all.
                for t in &tables {
                    for &b in t {
                        prop_assert!(a.refs[b as usize] > 0);
                    }
                }
                prop_assert_eq!(a.used() + a.free(), 12);
                let held: std::collections::HashSet<u32> = tables.iter().flatten().copied().collect();
                prop_assert_eq!(held.len(), a.used());
            }
        }
    }
}
