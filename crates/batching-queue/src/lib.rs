//! The waiting queue of mlx-batch: a priority queue with aging, from which
//! the scheduler admits requests.
//!
//! A request's *effective priority* is
//! `base_priority - wait_seconds * aging_rate` (HIGH=0, NORMAL=1, LOW=2;
//! lower is served first; equal values are served first-come first-served).
//! With the default rate of 0.1 per second a LOW request that has waited
//! 15 s (effective 0.5) beats a NORMAL one that just arrived (1.0), and after
//! 20 s it ties with a new HIGH one and wins because it came first.
//!
//! # Main design decision: a fixed key instead of re-sorting
//!
//! The obvious implementation recomputes every effective priority and
//! re-heapifies on each `get`, which costs O(n) per request admitted. It is
//! not needed, because every item ages at the same rate. Measure times in
//! seconds from a fixed origin (the queue's creation), let `e` be an item's
//! enqueue time, `b` its base priority, `r` the aging rate and `t` now.
//! Then
//!
//! ```text
//! effective(t) = b - (t - e) * r
//!              = (b + r * e) - r * t
//!              = key - r * t        where key = b + r * e
//! ```
//!
//! The term `r * t` is the same for every item at a given instant, so for
//! any two items `effective_1(t) < effective_2(t)` exactly when
//! `key_1 < key_2`, at every `t`. The order never changes while items wait;
//! only the *values* drift, all by the same amount. So each item gets its
//! key once, when it is put, and the queue is an ordered map keyed by
//! `(key, enqueued_at, put sequence)`: put, get, peek and remove by id are
//! all O(log n) (a `HashMap` from request id to key finds the entry for
//! removal), and `get` never re-sorts.
//!
//! Two details keep this exact in practice. Keys count seconds from the
//! queue's origin rather than from a distant epoch, so an `f64` keeps
//! sub-microsecond resolution. And a request put back after preemption keeps
//! its original `enqueued_at`, so its key, and the aging it earned, are
//! unchanged (its enqueue time may even precede the origin; the offset is
//! then negative, which the algebra allows).
//!
//! Time comes from a [`Clock`](batching_types::Clock), so tests drive it
//! with a [`ManualClock`](batching_types::ManualClock) and never sleep.
//! The queue is shared through an `Arc`: a mutex guards the map and a
//! `tokio::sync::Notify` wakes an async [`PriorityQueueWithAging::get`]
//! when something is put.

mod config;
mod error;
mod item;
mod key;
mod queue;

#[doc(hidden)]
pub mod naive;

pub use config::{QueueConfig, DEFAULT_AGING_RATE};
pub use error::QueueError;
pub use item::QueueItem;
pub use queue::PriorityQueueWithAging;
