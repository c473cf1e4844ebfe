//! The queue itself: a sorted map under a mutex, plus a wake-up signal.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    pin::pin,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use batching_types::{BatchRequest, Clock, RequestId, SystemClock};
use tokio::sync::Notify;

use crate::{key::ServiceKey, QueueConfig, QueueError, QueueItem};

/// The data behind the mutex. `by_order` holds the items in service order;
/// `keys` finds an item's key from its id so that removal by id is
/// O(log n) instead of a scan.
struct State<T> {
    by_order: BTreeMap<ServiceKey, T>,
    keys: HashMap<RequestId, ServiceKey>,
    next_seq: u64,
}

impl<T: QueueItem> State<T> {
    fn pop_first(&mut self) -> Option<T> {
        let (_, item) = self.by_order.pop_first()?;
        self.keys.remove(&item.id());
        Some(item)
    }

    fn remove_key(&mut self, key: &ServiceKey) -> Option<T> {
        let item = self.by_order.remove(key)?;
        self.keys.remove(&item.id());
        Some(item)
    }
}

/// A priority queue in which waiting raises an item's priority.
///
/// All methods take `&self` (the state sits behind a mutex), so one queue is
/// shared through an `Arc` by the HTTP handlers that put and the scheduler
/// that takes. Every operation is O(log n) except [`drain`](Self::drain)
/// and [`remove_where`](Self::remove_where), which are O(n).
pub struct PriorityQueueWithAging<T: QueueItem = BatchRequest, C: Clock = SystemClock> {
    state: Mutex<State<T>>,
    not_empty: Notify,
    clock: C,
    /// Keys count seconds from here rather than from some far-away epoch so
    /// that `f64` keeps sub-microsecond precision for years of uptime.
    origin: Instant,
    config: QueueConfig,
}

impl<T: QueueItem> PriorityQueueWithAging<T, SystemClock> {
    /// An unbounded queue on the system clock, as the original plan had it.
    ///
    /// # Panics
    ///
    /// If `aging_rate` is negative, NaN or infinite. Use
    /// [`with_config`](Self::with_config) for a rate that comes from a user.
    pub fn new(aging_rate: f64) -> Self {
        let config = QueueConfig {
            aging_rate,
            capacity: None,
        };
        match Self::with_config(config) {
            Ok(queue) => queue,
            Err(err) => panic!("{err}"),
        }
    }

    /// A queue on the system clock; refuses an unusable configuration.
    pub fn with_config(config: QueueConfig) -> Result<Self, QueueError<T>> {
        Self::with_clock(config, SystemClock)
    }
}

impl<T: QueueItem> Default for PriorityQueueWithAging<T, SystemClock> {
    /// An unbounded queue with the default aging rate of 0.1 per second.
    fn default() -> Self {
        Self::new(crate::DEFAULT_AGING_RATE)
    }
}

impl<T: QueueItem, C: Clock> PriorityQueueWithAging<T, C> {
    /// A queue that reads time from `clock`; refuses negative, NaN or
    /// infinite aging rates and a capacity of zero.
    pub fn with_clock(config: QueueConfig, clock: C) -> Result<Self, QueueError<T>> {
        if let Some(problem) = config.problem() {
            return Err(QueueError::InvalidConfig(problem));
        }
        let origin = clock.now();
        Ok(Self {
            state: Mutex::new(State {
                by_order: BTreeMap::new(),
                keys: HashMap::new(),
                next_seq: 0,
            }),
            not_empty: Notify::new(),
            clock,
            origin,
            config,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // The lock is only poisoned if a caller's closure panicked inside
        // `peek_with` or `remove_where`; neither changes the state before
        // calling the closure, so the data is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `item`. It never waits: a full queue answers
    /// [`QueueError::Full`] at once, so a server can shed load instead of
    /// piling up waiting clients. The `async` form matches the original
    /// plan's API; it is the same as [`try_put`](Self::try_put).
    pub async fn put(&self, item: T) -> Result<(), QueueError<T>> {
        self.try_put(item)
    }

    /// Adds `item`, stamping its `enqueued_at` with the clock's now unless
    /// it already has one (a preempted request keeps the aging it earned).
    ///
    /// Errors hand the item back: [`QueueError::DuplicateId`] if an item
    /// with its id is queued (checked first), [`QueueError::Full`] if the
    /// queue is at capacity.
    pub fn try_put(&self, mut item: T) -> Result<(), QueueError<T>> {
        let mut state = self.lock();
        let id = item.id();
        if state.keys.contains_key(&id) {
            return Err(QueueError::DuplicateId(item));
        }
        if self
            .config
            .capacity
            .is_some_and(|cap| state.keys.len() >= cap)
        {
            return Err(QueueError::Full(item));
        }
        let enqueued_at = match item.enqueued_at() {
            Some(at) => at,
            None => {
                let now = self.clock.now();
                item.set_enqueued_at(now);
                now
            }
        };
        let key = ServiceKey::new(
            item.base_priority(),
            enqueued_at,
            self.origin,
            self.config.aging_rate,
            state.next_seq,
        );
        state.next_seq += 1;
        state.keys.insert(id, key);
        state.by_order.insert(key, item);
        drop(state);
        self.not_empty.notify_one();
        Ok(())
    }

    /// Takes the item with the best effective priority, waiting (without
    /// polling) until there is one. Cancel-safe: dropping the future before
    /// it completes takes nothing.
    pub async fn get(&self) -> T {
        loop {
            // Register for a wake-up *before* looking, so a put that lands
            // between the look and the wait is not missed.
            let mut notified = pin!(self.not_empty.notified());
            notified.as_mut().enable();
            if let Some(item) = self.try_get() {
                // A single stored permit can stand for several puts, so
                // pass the signal on while items remain; a spurious
                // wake-up only costs one extra look.
                if !self.empty() {
                    self.not_empty.notify_one();
                }
                return item;
            }
            notified.await;
        }
    }

    /// Takes the item with the best effective priority, if any.
    pub fn try_get(&self) -> Option<T> {
        self.lock().pop_first()
    }

    /// The id [`get`](Self::get) would return now, without removing it.
    pub fn peek(&self) -> Option<RequestId> {
        self.peek_with(QueueItem::id)
    }

    /// Looks at the head item without removing it, for example to check
    /// whether its prompt fits in free KV memory before taking it. `f` runs
    /// under the queue's lock, so it should be short.
    pub fn peek_with<R>(&self, f: impl FnOnce(&T) -> R) -> Option<R> {
        self.lock()
            .by_order
            .first_key_value()
            .map(|(_, item)| f(item))
    }

    /// Looks at the first `n` items in service order without removing
    /// them (O(log n + n)), for example to compare the most urgent waiting
    /// requests with running ones. `f` runs under the queue's lock.
    pub fn peek_n_with<R>(&self, n: usize, mut f: impl FnMut(&T) -> R) -> Vec<R> {
        self.lock().by_order.values().take(n).map(&mut f).collect()
    }

    /// Takes out the item with this id (a cancelled request), if queued.
    pub fn remove(&self, id: RequestId) -> Option<T> {
        let mut state = self.lock();
        let key = state.keys.get(&id).copied()?;
        state.remove_key(&key)
    }

    /// Takes out every item for which `pred` is true, in service order.
    ///
    /// This is O(n): it looks at every item. The scheduler calls it once per
    /// step to time out requests whose deadline passed.
    pub fn remove_where(&self, mut pred: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut state = self.lock();
        // Decide first and remove afterwards, so a panicking `pred` leaves
        // the queue untouched.
        let doomed: Vec<ServiceKey> = state
            .by_order
            .iter()
            .filter(|(_, item)| pred(item))
            .map(|(key, _)| *key)
            .collect();
        doomed
            .iter()
            .filter_map(|key| state.remove_key(key))
            .collect()
    }

    /// Takes out everything, in service order (for shutdown).
    pub fn drain(&self) -> Vec<T> {
        let mut state = self.lock();
        state.keys.clear();
        std::mem::take(&mut state.by_order).into_values().collect()
    }

    /// True if nothing is queued.
    pub fn empty(&self) -> bool {
        self.qsize() == 0
    }

    /// How many items are queued.
    pub fn qsize(&self) -> usize {
        self.lock().keys.len()
    }

    /// The most items the queue holds; `None` if unbounded.
    pub fn capacity(&self) -> Option<usize> {
        self.config.capacity
    }

    /// Priority levels gained per second of waiting.
    pub fn aging_rate(&self) -> f64 {
        self.config.aging_rate
    }

    /// `base_priority - wait_seconds * aging_rate` at the clock's now, where
    /// the wait counts from the item's `enqueued_at` (zero if it has none).
    /// Lower is served first; the value may go below zero.
    pub fn effective_priority(&self, item: &T) -> f64 {
        let now = self.clock.now();
        let since = item.enqueued_at().unwrap_or(now);
        let wait = now.saturating_duration_since(since).as_secs_f64();
        f64::from(item.base_priority().value()) - wait * self.config.aging_rate
    }
}

impl<T: QueueItem, C: Clock> fmt::Debug for PriorityQueueWithAging<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PriorityQueueWithAging")
            .field("qsize", &self.qsize())
            .field("aging_rate", &self.config.aging_rate)
            .field("capacity", &self.config.capacity)
            .finish_non_exhaustive()
    }
}
