//! Steady-state put+get throughput of the aging queue beside the naive
//! algorithm of the original plan, with N requests already queued.
//!
//! Each iteration puts one new request and gets one, so the queue stays at
//! N. The items are small structs, so the numbers measure the queue rather
//! than request construction.

#![allow(missing_docs)]

use std::{hint::black_box, time::Duration, time::Instant};

use batching_queue::{naive::NaiveAgingQueue, PriorityQueueWithAging, QueueItem};
use batching_types::{Priority, RequestId, SystemClock};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SIZES: [u64; 3] = [1_000, 100_000, 1_000_000];

struct BenchItem {
    id: u64,
    priority: Priority,
    enqueued_at: Option<Instant>,
}

impl QueueItem for BenchItem {
    fn id(&self) -> RequestId {
        RequestId::from(self.id)
    }
    fn base_priority(&self) -> Priority {
        self.priority
    }
    fn enqueued_at(&self) -> Option<Instant> {
        self.enqueued_at
    }
    fn set_enqueued_at(&mut self, at: Instant) {
        self.enqueued_at = Some(at);
    }
}

/// A cheap, deterministic mix of priorities (a multiplicative hash of the
/// id), so no random generator sits inside the timed loop.
fn item(id: u64) -> BenchItem {
    let mixed = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61;
    BenchItem {
        id,
        priority: Priority::ALL[(mixed % 3) as usize],
        enqueued_at: None,
    }
}

fn put_get(c: &mut Criterion) {
    let mut group = c.benchmark_group("put_get");
    group.throughput(Throughput::Elements(1));
    for n in SIZES {
        group.sample_size(100);
        let queue: PriorityQueueWithAging<BenchItem> = PriorityQueueWithAging::new(0.1);
        for id in 0..n {
            // Ids are unique by construction, so this cannot fail.
            let _ = queue.try_put(item(id));
        }
        let mut next = n;
        group.bench_with_input(BenchmarkId::new("fixed_key", n), &n, |b, _| {
            b.iter(|| {
                let _ = queue.try_put(item(next));
                next += 1;
                black_box(queue.try_get())
            })
        });
        drop(queue);

        // The naive get is O(n); at 1M one iteration takes milliseconds, so
        // take the fewest samples criterion allows there.
        if n >= 1_000_000 {
            group.sample_size(10);
        }
        let mut naive = NaiveAgingQueue::new(0.1, SystemClock);
        for id in 0..n {
            naive.put(item(id));
        }
        let mut next = n;
        group.bench_with_input(BenchmarkId::new("naive", n), &n, |b, _| {
            b.iter(|| {
                naive.put(item(next));
                next += 1;
                black_box(naive.get())
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = put_get
}
criterion_main!(benches);
