//! The queue's ordering rules and bookkeeping, driven by a manual clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use batching_queue::{PriorityQueueWithAging, QueueConfig, QueueError};
use batching_types::{
    event_channel, BatchRequest, Clock, ManualClock, NewRequest, Priority, RequestId,
};
use common::Item;
use Priority::{High, Low, Normal};

type Queue = PriorityQueueWithAging<Item, ManualClock>;

fn queue(aging_rate: f64) -> (Queue, ManualClock) {
    let clock = ManualClock::new();
    let config = QueueConfig {
        aging_rate,
        capacity: None,
    };
    (Queue::with_clock(config, clock.clone()).unwrap(), clock)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn drain_ids(q: &Queue) -> Vec<u64> {
    q.drain().into_iter().map(|i| i.id).collect()
}

#[test]
fn put_then_get_returns_the_item_and_stamps_its_arrival() {
    let (q, clock) = queue(0.1);
    clock.advance(secs(3));
    q.try_put(Item::new(1, Normal)).unwrap();
    let got = q.try_get().unwrap();
    assert_eq!(got.id, 1);
    assert_eq!(got.enqueued_at, Some(clock.now()));
    assert!(q.try_get().is_none());
}

#[test]
fn high_is_served_before_low() {
    let (q, _clock) = queue(0.1);
    q.try_put(Item::new(1, Low)).unwrap();
    q.try_put(Item::new(2, Normal)).unwrap();
    q.try_put(Item::new(3, High)).unwrap();
    assert_eq!(drain_ids(&q), vec![3, 2, 1]);
}

#[test]
fn equal_priorities_are_first_come_first_served() {
    // Same instant (ties broken by put order) and spread over time.
    let (q, clock) = queue(0.1);
    for id in 1..=3 {
        q.try_put(Item::new(id, Normal)).unwrap();
    }
    for id in 4..=6 {
        clock.advance(Duration::from_millis(250));
        q.try_put(Item::new(id, Normal)).unwrap();
    }
    assert_eq!(drain_ids(&q), vec![1, 2, 3, 4, 5, 6]);

    // Without aging the order is plain priority, FIFO within a level.
    let (q, clock) = queue(0.0);
    for (id, p) in [(1, Low), (2, High), (3, Low), (4, High)] {
        q.try_put(Item::new(id, p)).unwrap();
        clock.advance(secs(100));
    }
    assert_eq!(drain_ids(&q), vec![2, 4, 1, 3]);
}

#[test]
fn a_low_request_that_waited_15s_beats_a_new_normal_one() {
    let (q, clock) = queue(0.1);
    let low = Item::new(1, Low);
    q.try_put(low).unwrap();
    clock.advance(secs(15));
    q.try_put(Item::new(2, Normal)).unwrap();
    let head_priority = q.peek_with(|i| q.effective_priority(i)).unwrap();
    assert!((head_priority - 0.5).abs() < 1e-9, "{head_priority}");
    assert_eq!(drain_ids(&q), vec![1, 2]);
}

#[test]
fn a_low_request_that_waited_only_9s_still_loses_to_a_new_normal_one() {
    let (q, clock) = queue(0.1);
    q.try_put(Item::new(1, Low)).unwrap();
    clock.advance(secs(9));
    q.try_put(Item::new(2, Normal)).unwrap();
    assert_eq!(drain_ids(&q), vec![2, 1]);
}

#[test]
fn after_20s_a_low_request_ties_with_a_new_high_one_and_wins_by_arrival() {
    let (q, clock) = queue(0.1);
    q.try_put(Item::new(1, Low)).unwrap();
    clock.advance(secs(20));
    q.try_put(Item::new(2, High)).unwrap();
    let low_priority = q.peek_with(|i| q.effective_priority(i)).unwrap();
    assert!(low_priority.abs() < 1e-9, "{low_priority}");
    assert_eq!(drain_ids(&q), vec![1, 2]);

    // One second earlier the new HIGH request still wins.
    let (q, clock) = queue(0.1);
    q.try_put(Item::new(1, Low)).unwrap();
    clock.advance(secs(19));
    q.try_put(Item::new(2, High)).unwrap();
    assert_eq!(drain_ids(&q), vec![2, 1]);

    // And after 21 s it wins outright.
    let (q, clock) = queue(0.1);
    q.try_put(Item::new(1, Low)).unwrap();
    clock.advance(secs(21));
    q.try_put(Item::new(2, High)).unwrap();
    assert_eq!(q.peek(), Some(RequestId::from(1)));
}

#[test]
fn empty_and_qsize_track_contents() {
    let (q, _clock) = queue(0.1);
    assert!(q.empty());
    assert_eq!(q.qsize(), 0);
    q.try_put(Item::new(1, Normal)).unwrap();
    q.try_put(Item::new(2, Normal)).unwrap();
    assert!(!q.empty());
    assert_eq!(q.qsize(), 2);
    q.try_get().unwrap();
    assert_eq!(q.qsize(), 1);
    q.remove(RequestId::from(2)).unwrap();
    assert!(q.empty());
}

#[test]
fn peek_shows_the_head_without_removing_it() {
    let (q, _clock) = queue(0.1);
    assert_eq!(q.peek(), None);
    assert_eq!(q.peek_with(|i| i.id), None);
    q.try_put(Item::new(1, Low)).unwrap();
    q.try_put(Item::new(2, High)).unwrap();
    assert_eq!(q.peek(), Some(RequestId::from(2)));
    assert_eq!(q.peek(), Some(RequestId::from(2)));
    assert_eq!(q.peek_with(|i| i.priority), Some(High));
    assert_eq!(q.qsize(), 2);
    assert_eq!(q.try_get().unwrap().id, 2);
    assert_eq!(q.peek(), Some(RequestId::from(1)));
}

#[test]
fn peek_n_lists_the_first_items_in_service_order_without_removing_them() {
    let (q, clock) = queue(0.1);
    q.try_put(Item::new(1, Low)).unwrap();
    clock.advance(secs(30));
    // Item 1 has aged past anything new: 2 - 3 < 0.
    for (id, p) in [(2, Normal), (3, High), (4, Low)] {
        q.try_put(Item::new(id, p)).unwrap();
    }
    assert_eq!(q.peek_n_with(3, |i| i.id), vec![1, 3, 2]);
    assert_eq!(q.peek_n_with(10, |i| i.id), vec![1, 3, 2, 4]);
    assert!(q.peek_n_with(0, |i| i.id).is_empty());
    assert_eq!(q.qsize(), 4);
    assert_eq!(drain_ids(&q), vec![1, 3, 2, 4]);
}

#[test]
fn remove_takes_out_exactly_that_item() {
    let (q, _clock) = queue(0.1);
    for (id, p) in [(1, High), (2, Normal), (3, Low)] {
        q.try_put(Item::new(id, p)).unwrap();
    }
    assert_eq!(q.remove(RequestId::from(2)).unwrap().id, 2);
    assert!(q.remove(RequestId::from(2)).is_none());
    assert!(q.remove(RequestId::from(99)).is_none());
    assert_eq!(q.qsize(), 2);
    // A removed id may be queued again.
    q.try_put(Item::new(2, Normal)).unwrap();
    assert_eq!(drain_ids(&q), vec![1, 2, 3]);
}

#[test]
fn a_full_queue_hands_the_item_back_and_loses_nothing() {
    let clock = ManualClock::new();
    let config = QueueConfig {
        aging_rate: 0.1,
        capacity: Some(2),
    };
    let q = Queue::with_clock(config, clock).unwrap();
    assert_eq!(q.capacity(), Some(2));
    q.try_put(Item::new(1, Normal)).unwrap();
    q.try_put(Item::new(2, Normal)).unwrap();
    let refused = q.try_put(Item::new(3, High)).unwrap_err();
    assert!(matches!(refused, QueueError::Full(_)));
    let back = refused.into_inner().unwrap();
    assert_eq!(back, Item::new(3, High), "handed back untouched");
    assert_eq!(q.qsize(), 2);
    // Taking one makes room again.
    assert_eq!(q.try_get().unwrap().id, 1);
    q.try_put(back).unwrap();
    assert_eq!(drain_ids(&q), vec![3, 2]);
}

#[test]
fn a_duplicate_id_is_refused_and_handed_back() {
    let (q, _clock) = queue(0.1);
    q.try_put(Item::new(1, Low)).unwrap();
    let err = q.try_put(Item::new(1, High)).unwrap_err();
    assert!(matches!(err, QueueError::DuplicateId(_)));
    assert_eq!(err.into_inner().unwrap().priority, High);
    assert_eq!(q.qsize(), 1);
    assert_eq!(q.try_get().unwrap().priority, Low);
}

#[test]
fn a_preempted_request_put_back_keeps_its_place() {
    let (q, clock) = queue(0.1);
    q.try_put(Item::new(1, Normal)).unwrap(); // key 1.0
    clock.advance(secs(5));
    q.try_put(Item::new(2, Normal)).unwrap(); // key 1.5
    let first = q.try_get().unwrap();
    assert_eq!(first.id, 1);
    let first_arrival = first.enqueued_at;
    clock.advance(secs(10));
    q.try_put(Item::new(3, High)).unwrap(); // key 1.5, later than 2
                                            // Preempted: put back with the arrival it already had.
    q.try_put(first).unwrap();
    assert_eq!(q.peek(), Some(RequestId::from(1)));
    let drained = q.drain();
    assert_eq!(drained[0].enqueued_at, first_arrival);
    let ids: Vec<u64> = drained.iter().map(|i| i.id).collect();
    assert_eq!(ids, vec![1, 2, 3]);
}

#[test]
fn a_request_that_entered_before_the_queue_existed_keeps_its_aging() {
    let clock = ManualClock::new();
    clock.advance(secs(60));
    let old_arrival = clock.now() - secs(30);
    let q = Queue::with_clock(QueueConfig::default(), clock.clone()).unwrap();
    q.try_put(Item::new(1, High)).unwrap(); // 0
    let mut old = Item::new(2, Low);
    old.enqueued_at = Some(old_arrival); // 2 - 3.0 = -1
    q.try_put(old).unwrap();
    assert_eq!(q.peek(), Some(RequestId::from(2)));
    let p = q.peek_with(|i| q.effective_priority(i)).unwrap();
    assert!((p + 1.0).abs() < 1e-9, "{p}");
}

#[test]
fn batch_requests_are_stamped_once_and_keep_the_stamp_when_put_back() {
    let clock = ManualClock::new();
    let q: PriorityQueueWithAging<BatchRequest, ManualClock> =
        PriorityQueueWithAging::with_clock(QueueConfig::default(), clock.clone()).unwrap();
    let (tx, _rx) = event_channel();
    let spec = NewRequest {
        request_id: 5,
        prompt_tokens: vec![1, 2],
        max_tokens: 4,
        ..Default::default()
    };
    let r = BatchRequest::new(spec, tx, clock.now()).unwrap();
    clock.advance(secs(2));
    let stamped = clock.now();
    q.try_put(r).unwrap();
    let r = q.try_get().unwrap();
    assert_eq!(r.enqueued_at, Some(stamped));
    clock.advance(secs(7));
    q.try_put(r).unwrap();
    assert_eq!(q.try_get().unwrap().enqueued_at, Some(stamped));
}

#[test]
fn drain_returns_everything_in_service_order() {
    let (q, clock) = queue(0.1);
    for (id, p) in [(1, Low), (2, Normal), (3, High), (4, Normal)] {
        q.try_put(Item::new(id, p)).unwrap();
        clock.advance(secs(1));
    }
    assert_eq!(drain_ids(&q), vec![3, 2, 4, 1]);
    assert!(q.empty());
    assert!(q.peek().is_none());
    // The id index was cleared too: the same ids can be queued again.
    q.try_put(Item::new(1, Low)).unwrap();
    assert_eq!(q.qsize(), 1);
}

#[test]
fn remove_where_takes_matching_items_in_service_order() {
    let (q, _clock) = queue(0.1);
    for (id, p) in [(1, Low), (2, High), (3, Normal), (4, High), (5, Low)] {
        q.try_put(Item::new(id, p)).unwrap();
    }
    let odd: Vec<u64> = q
        .remove_where(|i| i.id % 2 == 1)
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(odd, vec![3, 1, 5]);
    assert!(q.remove_where(|_| false).is_empty());
    assert!(q.remove(RequestId::from(3)).is_none(), "index updated");
    assert_eq!(drain_ids(&q), vec![2, 4]);
}

#[test]
fn effective_priority_follows_the_formula() {
    let (q, clock) = queue(0.25);
    let fresh = Item::new(1, Low);
    assert_eq!(q.effective_priority(&fresh), 2.0, "no arrival: no aging");
    let mut waited = Item::new(2, Normal);
    waited.enqueued_at = Some(clock.now());
    clock.advance(secs(6));
    assert_eq!(q.effective_priority(&waited), 1.0 - 6.0 * 0.25);
}

#[test]
fn bad_configurations_are_refused() {
    for config in [
        QueueConfig {
            aging_rate: -1.0,
            capacity: None,
        },
        QueueConfig {
            aging_rate: f64::NAN,
            capacity: None,
        },
        QueueConfig {
            aging_rate: 0.1,
            capacity: Some(0),
        },
    ] {
        let err = Queue::with_clock(config, ManualClock::new()).unwrap_err();
        assert!(matches!(err, QueueError::InvalidConfig(_)), "{err}");
    }
    let q: PriorityQueueWithAging<Item> = PriorityQueueWithAging::new(0.1);
    assert_eq!(q.aging_rate(), 0.1);
    assert_eq!(q.capacity(), None);
    let d: PriorityQueueWithAging<Item> = PriorityQueueWithAging::default();
    assert_eq!(d.aging_rate(), 0.1);
}

#[test]
#[should_panic(expected = "aging rate")]
fn new_panics_on_a_negative_rate() {
    let _q: PriorityQueueWithAging<Item> = PriorityQueueWithAging::new(-0.5);
}

#[test]
fn service_order_table() {
    // A mixed workload observed at t = 30 s, as a reviewable table.
    let (q, clock) = queue(0.1);
    let arrivals = [
        (1, Low, 0),
        (2, Normal, 2),
        (3, High, 5),
        (4, Low, 8),
        (5, Normal, 12),
        (6, High, 20),
        (7, Normal, 25),
        (8, High, 29),
    ];
    let start = clock.now();
    for (id, p, at) in arrivals {
        clock.advance(start + secs(at) - clock.now());
        q.try_put(Item::new(id, p)).unwrap();
    }
    clock.advance(start + secs(30) - clock.now());
    let mut table = String::from("id priority arrived effective\n");
    while let Some(id) = q.peek() {
        let (p, eff, arrived) = q
            .peek_with(|i| {
                let arrived = i.enqueued_at.unwrap() - start;
                (i.priority, q.effective_priority(i), arrived.as_secs())
            })
            .unwrap();
        table.push_str(&format!("{} {p} {arrived} {eff:.2}\n", id.seq()));
        assert_eq!(q.try_get().unwrap().id, id.seq());
    }
    insta::assert_snapshot!(table);
}
