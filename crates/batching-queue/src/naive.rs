//! The original plan's algorithm, kept only as a baseline for benchmarks.
//!
//! It recomputes every effective priority and rebuilds a heap on every
//! `get`, which is O(n) per call. Nothing in the engine uses it.

use std::{cmp::Ordering, collections::BinaryHeap, time::Instant};

use batching_types::Clock;

use crate::QueueItem;

/// A heap entry: the effective priority at the time of the `get`, with the
/// same tie-breaks as the real queue.
struct Entry {
    effective: f64,
    enqueued_at: Instant,
    seq: u64,
    index: usize,
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed, because `BinaryHeap` pops the largest entry and the
        // smallest effective priority must come out first.
        other
            .effective
            .total_cmp(&self.effective)
            .then_with(|| other.enqueued_at.cmp(&self.enqueued_at))
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Entry {}

/// The naive aging queue: O(1) put, O(n) get.
pub struct NaiveAgingQueue<T, C> {
    items: Vec<(T, Instant, u64)>,
    clock: C,
    aging_rate: f64,
    next_seq: u64,
}

impl<T: QueueItem, C: Clock> NaiveAgingQueue<T, C> {
    /// An empty queue reading time from `clock`.
    pub fn new(aging_rate: f64, clock: C) -> Self {
        Self {
            items: Vec::new(),
            clock,
            aging_rate,
            next_seq: 0,
        }
    }

    /// Adds `item`, stamping `enqueued_at` if it has none.
    pub fn put(&mut self, mut item: T) {
        let enqueued_at = match item.enqueued_at() {
            Some(at) => at,
            None => {
                let now = self.clock.now();
                item.set_enqueued_at(now);
                now
            }
        };
        self.items.push((item, enqueued_at, self.next_seq));
        self.next_seq += 1;
    }

    /// Recomputes every effective priority, heapifies and pops the best.
    pub fn get(&mut self) -> Option<T> {
        let now = self.clock.now();
        let entries: Vec<Entry> = self
            .items
            .iter()
            .enumerate()
            .map(|(index, (item, enqueued_at, seq))| {
                let wait = now.saturating_duration_since(*enqueued_at).as_secs_f64();
                Entry {
                    effective: f64::from(item.base_priority().value()) - wait * self.aging_rate,
                    enqueued_at: *enqueued_at,
                    seq: *seq,
                    index,
                }
            })
            .collect();
        let best = BinaryHeap::from(entries).pop()?;
        Some(self.items.swap_remove(best.index).0)
    }

    /// How many items are queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True if nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}
