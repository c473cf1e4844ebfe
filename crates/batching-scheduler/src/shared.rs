//! State shared between the engine and every handle: admission checks at
//! submit, id assignment, and the health snapshot.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use batching_types::{
    event_channel, BackendCapacity, BackendMemory, BatchRequest, EventReceiver, NewRequest,
};

use crate::{ContextOverflow, SchedulerError};

/// A cheap snapshot of the engine for health checks and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SchedulerStatus {
    /// The engine loop is running (its thread has not exited or panicked).
    pub alive: bool,
    /// Shutdown has begun.
    pub shutting_down: bool,
    /// Requests in the batch (prefilling or decoding), as of the last step.
    pub running: usize,
    /// Requests waiting in the queue without a cache, as of the last step.
    pub waiting: usize,
    /// Requests paused for more urgent work: queued, keeping their cache.
    pub paused: usize,
    /// Submitted requests not yet admitted for the first time (including
    /// those not yet seen by the engine loop).
    pub pending: usize,
    /// KV blocks assigned to requests.
    pub kv_blocks_used: usize,
    /// KV blocks free.
    pub kv_blocks_free: usize,
    /// Steps run (non-empty plans only). It doubles as the loop's
    /// heartbeat: `steps` not advancing while `running > 0` means the
    /// backend is stuck in a step.
    pub steps: u64,
    /// Whole steps that failed.
    pub step_failures: u64,
    /// Failed steps since the last successful one.
    pub consecutive_step_failures: u64,
    /// Time since the engine loop last made progress: finished a step, or
    /// woke up with work after being idle. While there is work, a large
    /// value means the loop is stuck (a step that never returns).
    pub since_progress: Duration,
    /// The backend's memory after the last step.
    pub memory: BackendMemory,
    /// New work is refused because memory ran short in a recent step.
    pub shedding: bool,
}

/// Limits fixed when the engine starts, from the config and the backend.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// What the backend reported it holds.
    pub(crate) capacity: BackendCapacity,
    pub(crate) max_queue: Option<usize>,
    pub(crate) block_size: usize,
    pub(crate) total_blocks: usize,
    pub(crate) max_context: usize,
    pub(crate) overflow: ContextOverflow,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) limits: Limits,
    next_id: AtomicU64,
    pending: AtomicUsize,
    pub(crate) alive: AtomicBool,
    pub(crate) shutting_down: AtomicBool,
    /// New work is refused until this many nanoseconds after `epoch`
    /// (0: not shedding). A time, not a flag, so that it lapses by itself
    /// while the engine is idle.
    shed_until_ns: AtomicU64,
    pub(crate) running: AtomicUsize,
    pub(crate) waiting: AtomicUsize,
    pub(crate) paused: AtomicUsize,
    pub(crate) blocks_used: AtomicUsize,
    pub(crate) blocks_free: AtomicUsize,
    pub(crate) steps: AtomicU64,
    pub(crate) step_failures: AtomicU64,
    pub(crate) consecutive_failures: AtomicU64,
    /// The backend's memory: active, peak, cache and KV bytes.
    pub(crate) memory: [AtomicU64; 4],
    /// When the engine started; progress is kept as nanoseconds since.
    epoch: Instant,
    progress_ns: AtomicU64,
}

impl Shared {
    pub(crate) fn new(limits: Limits, now: Instant) -> Self {
        Self {
            epoch: now,
            progress_ns: AtomicU64::new(0),
            limits,
            next_id: AtomicU64::new(1),
            pending: AtomicUsize::new(0),
            alive: AtomicBool::new(true),
            shutting_down: AtomicBool::new(false),
            shed_until_ns: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            paused: AtomicUsize::new(0),
            blocks_used: AtomicUsize::new(0),
            blocks_free: AtomicUsize::new(limits.total_blocks),
            steps: AtomicU64::new(0),
            step_failures: AtomicU64::new(0),
            consecutive_failures: AtomicU64::new(0),
            memory: Default::default(),
        }
    }

    /// Validates `spec`, assigns it a fresh id (overwriting the caller's
    /// `request_id`, which keeps ids unique across all handles) and
    /// reserves a place in the bounded queue.
    pub(crate) fn prepare(
        &self,
        mut spec: NewRequest,
        now: Instant,
    ) -> Result<(BatchRequest, EventReceiver), SchedulerError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(SchedulerError::ShuttingDown);
        }
        if !self.alive.load(Ordering::Acquire) {
            return Err(SchedulerError::EngineStopped);
        }
        if self.shedding(now) {
            return Err(SchedulerError::Shedding);
        }
        spec.request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = event_channel();
        let request = BatchRequest::new(spec, tx, now)?;
        self.check_size(&request)?;
        self.reserve()?;
        Ok((request, rx))
    }

    fn check_size(&self, r: &BatchRequest) -> Result<(), SchedulerError> {
        let l = self.limits;
        let prompt = r.prompt_tokens.len();
        if prompt >= l.max_context {
            return Err(SchedulerError::PromptTooLong {
                prompt,
                max_context: l.max_context,
            });
        }
        let wanted = prompt.saturating_add(r.max_tokens);
        if wanted > l.max_context && l.overflow == ContextOverflow::Refuse {
            return Err(SchedulerError::ContextTooLong {
                needed: wanted,
                max_context: l.max_context,
            });
        }
        // The last generated token is never fed back, so the cache holds at
        // most one token less than prompt plus max_tokens.
        let kv_tokens = wanted.min(l.max_context) - 1;
        let needed_blocks = kv_tokens.div_ceil(l.block_size);
        if needed_blocks > l.total_blocks {
            return Err(SchedulerError::RequestTooLarge {
                needed: needed_blocks * l.block_size,
                capacity: l.total_blocks * l.block_size,
            });
        }
        Ok(())
    }

    fn reserve(&self) -> Result<(), SchedulerError> {
        match self.limits.max_queue {
            None => {
                self.pending.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Some(capacity) => self
                .pending
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < capacity).then_some(n + 1)
                })
                .map(|_| ())
                .map_err(|_| SchedulerError::QueueFull { capacity }),
        }
    }

    /// A request left the "submitted, never admitted" state.
    pub(crate) fn unreserve(&self) {
        // Saturating, so a bookkeeping slip can never wrap the counter.
        let _ = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Refuses new work until `until`.
    pub(crate) fn shed_until(&self, until: Instant) {
        let ns = until.saturating_duration_since(self.epoch).as_nanos();
        self.shed_until_ns
            .store(u64::try_from(ns).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn shedding(&self, now: Instant) -> bool {
        let until = self.shed_until_ns.load(Ordering::Relaxed);
        until != 0 && now < self.epoch + Duration::from_nanos(until)
    }

    /// Records that the engine loop made progress at `now`.
    pub(crate) fn mark_progress(&self, now: Instant) {
        let ns = now.saturating_duration_since(self.epoch).as_nanos();
        self.progress_ns
            .store(u64::try_from(ns).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub(crate) fn status(&self, now: Instant) -> SchedulerStatus {
        let progress = self.epoch + Duration::from_nanos(self.progress_ns.load(Ordering::Relaxed));
        SchedulerStatus {
            since_progress: now.saturating_duration_since(progress),
            alive: self.alive.load(Ordering::Acquire),
            shutting_down: self.shutting_down.load(Ordering::Acquire),
            running: self.running.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
            paused: self.paused.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
            kv_blocks_used: self.blocks_used.load(Ordering::Relaxed),
            kv_blocks_free: self.blocks_free.load(Ordering::Relaxed),
            steps: self.steps.load(Ordering::Relaxed),
            step_failures: self.step_failures.load(Ordering::Relaxed),
            consecutive_step_failures: self.consecutive_failures.load(Ordering::Relaxed),
            memory: BackendMemory {
                active_bytes: self.memory[0].load(Ordering::Relaxed),
                peak_bytes: self.memory[1].load(Ordering::Relaxed),
                cache_bytes: self.memory[2].load(Ordering::Relaxed),
                kv_bytes: self.memory[3].load(Ordering::Relaxed),
            },
            shedding: self.shedding(now),
        }
    }
}
