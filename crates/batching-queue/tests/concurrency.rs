//! The queue shared between tasks on a multi-threaded runtime.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::HashSet,
    future::Future,
    pin::pin,
    sync::Arc,
    task::{Context, Waker},
    time::Duration,
};

use batching_queue::{PriorityQueueWithAging, QueueConfig, QueueError};
use batching_types::{ManualClock, Priority};
use common::Item;

type Queue = PriorityQueueWithAging<Item, ManualClock>;

/// Only a guard against a hung test; no assertion depends on it.
const SAFETY_NET: Duration = Duration::from_secs(30);

fn shared(capacity: Option<usize>) -> Arc<Queue> {
    let config = QueueConfig {
        aging_rate: 0.1,
        capacity,
    };
    Arc::new(Queue::with_clock(config, ManualClock::new()).unwrap())
}

fn priority_of(n: u64) -> Priority {
    Priority::ALL[(n % 3) as usize]
}

#[test]
fn the_queue_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Queue>();
    assert_send_sync::<PriorityQueueWithAging>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_get_is_woken_by_a_later_put() {
    let q = shared(None);
    let waiter = tokio::spawn({
        let q = Arc::clone(&q);
        async move { q.get().await }
    });
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert!(
        !waiter.is_finished(),
        "get must wait while the queue is empty"
    );
    q.put(Item::new(7, Priority::Low)).await.unwrap();
    let got = tokio::time::timeout(SAFETY_NET, waiter)
        .await
        .expect("the put woke the waiting get")
        .unwrap();
    assert_eq!(got.id, 7);
    assert!(q.empty());
}

#[tokio::test]
async fn a_dropped_get_takes_nothing() {
    let q = shared(None);
    {
        let mut get = pin!(q.get());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(get.as_mut().poll(&mut cx).is_pending());
    }
    q.put(Item::new(1, Priority::Normal)).await.unwrap();
    assert_eq!(q.try_get().unwrap().id, 1);
}

#[tokio::test]
async fn async_put_reports_a_full_queue_at_once() {
    let q = shared(Some(1));
    q.put(Item::new(1, Priority::Normal)).await.unwrap();
    let err = q.put(Item::new(2, Priority::High)).await.unwrap_err();
    assert!(matches!(err, QueueError::Full(ref i) if i.id == 2));
    assert_eq!(q.get().await.id, 1);
}

/// Runs `producers` tasks that each put `per_producer` distinct items
/// (retrying on a full queue) and as many consumers that each take
/// `per_producer` items with `get`, then checks that every item came out
/// exactly once.
async fn producers_and_consumers(q: Arc<Queue>, producers: u64, per_producer: u64) {
    let mut putters = Vec::new();
    for p in 0..producers {
        let q = Arc::clone(&q);
        putters.push(tokio::spawn(async move {
            for n in 0..per_producer {
                let id = p * per_producer + n;
                let mut item = Item::new(id, priority_of(id));
                loop {
                    match q.put(item).await {
                        Ok(()) => break,
                        Err(QueueError::Full(back)) => {
                            item = back;
                            tokio::task::yield_now().await;
                        }
                        Err(other) => panic!("unexpected {other}"),
                    }
                }
            }
        }));
    }
    let mut getters = Vec::new();
    for _ in 0..producers {
        let q = Arc::clone(&q);
        getters.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..per_producer {
                ids.push(q.get().await.id);
            }
            ids
        }));
    }
    let all = async {
        for putter in putters {
            putter.await.unwrap();
        }
        let mut seen = Vec::new();
        for getter in getters {
            seen.extend(getter.await.unwrap());
        }
        seen
    };
    let seen = tokio::time::timeout(SAFETY_NET, all)
        .await
        .expect("no consumer was left waiting");
    let total = producers * per_producer;
    assert_eq!(seen.len() as u64, total, "nothing lost");
    let unique: HashSet<u64> = seen.iter().copied().collect();
    assert_eq!(unique.len() as u64, total, "nothing duplicated");
    assert!(unique.iter().all(|id| *id < total));
    assert!(q.empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_producers_and_consumers_lose_and_duplicate_nothing() {
    producers_and_consumers(shared(None), 8, 2_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_capacity_under_contention_loses_nothing() {
    producers_and_consumers(shared(Some(4)), 8, 1_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_synchronous_taker_and_async_waiters_share_items_exactly_once() {
    // The scheduler's engine thread uses `try_get` while async tasks may
    // wait in `get`; together they must still see every item once.
    let q = shared(None);
    let total = 4_000u64;
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let q = Arc::clone(&q);
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for _ in 0..total / 4 {
                    ids.push(q.get().await.id);
                }
                ids
            })
        })
        .collect();
    let engine = std::thread::spawn({
        let q = Arc::clone(&q);
        move || {
            let mut ids = Vec::new();
            while (ids.len() as u64) < total / 2 {
                match q.try_get() {
                    Some(item) => ids.push(item.id),
                    None => std::thread::yield_now(),
                }
            }
            ids
        }
    });
    for id in 0..total {
        q.try_put(Item::new(id, priority_of(id))).unwrap();
    }
    let mut seen = engine.join().unwrap();
    for w in waiters {
        seen.extend(tokio::time::timeout(SAFETY_NET, w).await.unwrap().unwrap());
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..total).collect::<Vec<_>>());
}
