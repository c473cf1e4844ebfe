//! The queue against a plain reference model that recomputes every
//! effective priority and sorts, over random workloads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use batching_queue::{naive::NaiveAgingQueue, PriorityQueueWithAging, QueueConfig};
use batching_types::{Clock, ManualClock, Priority, RequestId};
use common::Item;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Time passes, in steps of 1/8 s.
    Advance(u8),
    Put(Priority),
    Get,
    /// Removes the n-th item (modulo the count) of those ever put.
    Remove(usize),
    /// Takes the head and puts it straight back, as preemption does.
    Requeue,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..80).prop_map(Op::Advance),
        4 => prop::sample::select(Priority::ALL.to_vec()).prop_map(Op::Put),
        3 => Just(Op::Get),
        1 => (0usize..1000).prop_map(Op::Remove),
        1 => Just(Op::Requeue),
    ]
}

/// Rates and time steps are multiples of powers of two, so every key and
/// every effective priority is exact in `f64` and exact ties really tie in
/// both the queue and the model.
fn rate() -> impl Strategy<Value = f64> {
    prop::sample::select(vec![0.0, 0.125, 0.25, 0.5, 1.0, 4.0])
}

/// The reference: a list in arrival order; `head` recomputes every
/// effective priority at `now` and picks the smallest, earliest arrival
/// first, then earliest put.
struct Model {
    rate: f64,
    items: Vec<(Item, Instant, u64)>,
    next_seq: u64,
}

impl Model {
    fn head(&self, now: Instant) -> Option<usize> {
        let mut order: Vec<usize> = (0..self.items.len()).collect();
        let eff = |i: usize| {
            let (item, at, _) = &self.items[i];
            f64::from(item.priority.value()) - (now - *at).as_secs_f64() * self.rate
        };
        // A stable sort on (effective, arrival) keeps put order among equals.
        order.sort_by(|&a, &b| {
            eff(a)
                .total_cmp(&eff(b))
                .then(self.items[a].1.cmp(&self.items[b].1))
        });
        order.first().copied()
    }

    fn put(&mut self, item: Item, at: Instant) {
        self.items.push((item, at, self.next_seq));
        self.next_seq += 1;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn queue_matches_the_reference_model(rate in rate(), ops in prop::collection::vec(op(), 1..120)) {
        let clock = ManualClock::new();
        let config = QueueConfig { aging_rate: rate, capacity: None };
        let q = PriorityQueueWithAging::with_clock(config, clock.clone()).unwrap();
        let mut model = Model { rate, items: Vec::new(), next_seq: 0 };
        let mut next_id = 0u64;
        for op in ops {
            let now = clock.now();
            match op {
                Op::Advance(eighths) => clock.advance(Duration::from_millis(125 * u64::from(eighths))),
                Op::Put(p) => {
                    q.try_put(Item::new(next_id, p)).unwrap();
                    model.put(Item::new(next_id, p), now);
                    next_id += 1;
                }
                Op::Get => {
                    let expected = model.head(now).map(|i| model.items.remove(i).0.id);
                    prop_assert_eq!(q.try_get().map(|i| i.id), expected);
                }
                Op::Remove(n) => {
                    let id = if next_id == 0 { 0 } else { n as u64 % next_id };
                    let expected = model.items.iter().position(|(i, _, _)| i.id == id)
                        .map(|pos| model.items.remove(pos).0.id);
                    prop_assert_eq!(q.remove(RequestId::from(id)).map(|i| i.id), expected);
                }
                Op::Requeue => {
                    if let Some(i) = model.head(now) {
                        let (item, at, _) = model.items.remove(i);
                        model.put(item, at);
                        let back = q.try_get().unwrap();
                        prop_assert_eq!(back.id, model.items.last().unwrap().0.id);
                        q.try_put(back).unwrap();
                    } else {
                        prop_assert!(q.try_get().is_none());
                    }
                }
            }
            let now = clock.now();
            prop_assert_eq!(q.qsize(), model.items.len());
            prop_assert_eq!(q.empty(), model.items.is_empty());
            prop_assert_eq!(q.peek(), model.head(now).map(|i| RequestId::from(model.items[i].0.id)));
        }
        // What is left drains in the model's order.
        let now = clock.now();
        let mut expected = Vec::new();
        while let Some(i) = model.head(now) {
            expected.push(model.items.remove(i).0.id);
        }
        let drained: Vec<u64> = q.drain().into_iter().map(|i| i.id).collect();
        prop_assert_eq!(drained, expected);
    }

    #[test]
    fn with_the_default_rate_service_order_never_goes_against_effective_priority(
        arrivals in prop::collection::vec((prop::sample::select(Priority::ALL.to_vec()), 0u64..60_000), 1..200),
    ) {
        // Arbitrary millisecond arrival gaps and the inexact rate 0.1: the
        // effective priorities of the drained items, all read at one
        // instant, must never decrease (up to rounding).
        let clock = ManualClock::new();
        let q = PriorityQueueWithAging::with_clock(QueueConfig::default(), clock.clone()).unwrap();
        for (id, (p, gap_ms)) in arrivals.iter().enumerate() {
            clock.advance(Duration::from_millis(*gap_ms));
            q.try_put(Item::new(id as u64, *p)).unwrap();
        }
        let drained = q.drain();
        let eff: Vec<f64> = drained.iter().map(|i| q.effective_priority(i)).collect();
        for pair in eff.windows(2) {
            prop_assert!(pair[0] <= pair[1] + 1e-9, "{:?}", pair);
        }
    }

    #[test]
    fn the_naive_baseline_serves_the_same_order(
        rate in rate(),
        arrivals in prop::collection::vec((prop::sample::select(Priority::ALL.to_vec()), 0u8..80, any::<bool>()), 1..100),
    ) {
        // The benchmark compares against the naive queue, so both must do
        // the same work: interleaved puts and gets give the same items.
        let clock = ManualClock::new();
        let config = QueueConfig { aging_rate: rate, capacity: None };
        let q = PriorityQueueWithAging::with_clock(config, clock.clone()).unwrap();
        let mut naive = NaiveAgingQueue::new(rate, clock.clone());
        for (id, (p, eighths, take)) in arrivals.into_iter().enumerate() {
            clock.advance(Duration::from_millis(125 * u64::from(eighths)));
            q.try_put(Item::new(id as u64, p)).unwrap();
            naive.put(Item::new(id as u64, p));
            if take {
                prop_assert_eq!(q.try_get().map(|i| i.id), naive.get().map(|i| i.id));
            }
        }
        prop_assert_eq!(q.qsize(), naive.len());
        while let Some(expected) = naive.get() {
            prop_assert_eq!(q.try_get().map(|i| i.id), Some(expected.id));
        }
        prop_assert!(q.empty() && naive.is_empty());
    }
}
