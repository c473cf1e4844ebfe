//! The synchronous engine core: one call of [`Scheduler::step`] plans, runs
//! and accounts one forward pass. The threaded loop in [`crate::handle`]
//! only wraps it, so tests drive it step by step with a manual clock.
//!
//! The step is split by phase: [`preempt`] makes way for urgent work,
//! [`plan`] forms the step, [`outcome`] applies its results and finishes
//! requests.

mod outcome;
mod plan;
mod preempt;

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use batching_queue::{PriorityQueueWithAging, QueueConfig};
use batching_types::{
    Backend, BackendCapacity, BatchRequest, Clock, EventReceiver, Failure, FailureKind,
    FinishReason, KvBlocks, NewRequest, Priority, RequestId, RequestStatus, StepOutput, StepPlan,
};

use crate::{
    blocks::BlockAllocator,
    metrics as names,
    shared::{Limits, SchedulerStatus, Shared},
    SchedulerConfig, SchedulerError, StepTrace,
};

/// A request that holds KV blocks and is known to the backend.
#[derive(Debug)]
struct Active {
    req: BatchRequest,
    /// Tokens of the context given to the backend.
    context_len: usize,
    /// How many of them have been fed so far.
    prefilled: usize,
    /// When its last token was delivered, for inter-token latency.
    last_token_at: Option<Instant>,
    /// Set when it leaves the batch during this step.
    gone: bool,
}

impl Active {
    fn decoding(&self) -> bool {
        self.req.status() == RequestStatus::Running
    }
}

/// What the engine keeps of a paused request while the request itself
/// waits in the queue: where it stopped, and what ranking and memory
/// decisions need without taking it out of the queue.
#[derive(Debug)]
struct Paused {
    context_len: usize,
    prefilled: usize,
    last_token_at: Option<Instant>,
    /// When it was paused, for the time-paused histogram.
    since: Instant,
    priority: Priority,
    enqueued_at: Option<Instant>,
    /// The KV blocks it holds (a copy of its table).
    table: Vec<u32>,
}

/// The scheduler's core: owns the backend, the waiting queue and the KV
/// block accounting, and runs one step per call of [`Scheduler::step`].
///
/// Not thread-safe by design: it lives on the engine thread (MLX arrays
/// must stay on the thread that made them). Use
/// [`crate::SchedulerHandle`] to run it on its own thread.
pub struct Scheduler<B: Backend, C: Clock + Clone> {
    config: SchedulerConfig,
    backend: B,
    clock: C,
    queue: PriorityQueueWithAging<BatchRequest, C>,
    active: Vec<Active>,
    /// Requests paused for urgency: queued, but holding blocks and a
    /// backend cache.
    paused: HashMap<RequestId, Paused>,
    blocks: BlockAllocator,
    shared: Arc<Shared>,
    capacity: BackendCapacity,
    /// Failed whole steps each request has been part of.
    retries: HashMap<RequestId, u32>,
    /// When running requests are cancelled, once shutdown has begun.
    shutdown_deadline: Option<Instant>,
    steps: u64,
    hot: names::Hot,
    memory: MemoryPressure,
}

/// How long new work is refused after the backend last ran out of memory.
pub(super) const SHED_HOLD: std::time::Duration = std::time::Duration::from_secs(2);
/// Successful steps under a memory cap before the cap doubles.
pub(super) const STEPS_PER_RELAXATION: u32 = 4;

/// What running out of memory left behind.
#[derive(Debug, Default)]
struct MemoryPressure {
    /// The most tokens a step may feed, until it has doubled back up.
    cap: Option<usize>,
    /// Successful steps since the cap last changed.
    successes: u32,
}

impl<B: Backend, C: Clock + Clone> std::fmt::Debug for Scheduler<B, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("config", &self.config)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl<B: Backend, C: Clock + Clone> Scheduler<B, C> {
    /// An engine over `backend`; validates `config` against the backend's
    /// capacity (it needs room for at least one block).
    pub fn new(config: SchedulerConfig, mut backend: B, clock: C) -> Result<Self, SchedulerError> {
        config.validate()?;
        let capacity = backend.capacity();
        let total_blocks = capacity.kv_tokens / config.block_size;
        if total_blocks == 0 || capacity.max_context < 2 {
            return Err(SchedulerError::InvalidConfig(format!(
                "the backend holds {} KV tokens and a context of {}: not even one block of {} tokens and one generated token fit",
                capacity.kv_tokens, capacity.max_context, config.block_size
            )));
        }
        // Block ids above u32::MAX are never handed out, so the pool the
        // backend builds is what the allocator can address.
        let total_blocks = total_blocks.min(u32::MAX as usize);
        backend
            .configure_kv(KvBlocks {
                block_size: config.block_size,
                num_blocks: total_blocks,
            })
            .map_err(SchedulerError::backend)?;
        let queue = PriorityQueueWithAging::with_clock(
            QueueConfig {
                aging_rate: config.aging_rate,
                // The bound is enforced at submit (see `Shared::prepare`) so
                // that a preempted request can always go back in.
                capacity: None,
            },
            clock.clone(),
        )
        .map_err(|e| SchedulerError::InvalidConfig(e.to_string()))?;
        let shared = Arc::new(Shared::new(
            Limits {
                capacity,
                max_queue: config.max_queue,
                block_size: config.block_size,
                total_blocks,
                max_context: capacity.max_context,
                overflow: config.context_overflow,
            },
            clock.now(),
        ));
        Ok(Self {
            blocks: BlockAllocator::new(total_blocks, config.block_size),
            config,
            backend,
            clock,
            queue,
            active: Vec::new(),
            paused: HashMap::new(),
            shared,
            capacity,
            retries: HashMap::new(),
            shutdown_deadline: None,
            steps: 0,
            hot: names::Hot::register(),
            memory: MemoryPressure::default(),
        })
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Validates and queues a request; returns its id and output stream.
    /// The caller's `request_id` is replaced by a fresh engine-wide id.
    pub fn submit(
        &mut self,
        spec: NewRequest,
    ) -> Result<(RequestId, EventReceiver), SchedulerError> {
        let (request, rx) = self.shared.prepare(spec, self.clock.now())?;
        let id = request.request_id;
        self.enqueue(request);
        Ok((id, rx))
    }

    /// Queues a request that `Shared::prepare` accepted.
    pub(crate) fn enqueue(&mut self, request: BatchRequest) {
        if let Err(err) = self.queue.try_put(request) {
            let message = err.to_string();
            if let Some(mut request) = err.into_inner() {
                self.finish_request(&mut request, FinishReason::Error, Some(message), None);
            }
        }
        self.publish();
    }

    /// The backend, for inspection in tests.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend's capacity as read at start.
    pub fn capacity(&self) -> BackendCapacity {
        self.capacity
    }

    /// A snapshot of the engine's state.
    pub fn status(&self) -> SchedulerStatus {
        self.shared.status(self.clock.now())
    }

    /// Records that the loop made progress now (it woke up with work).
    pub(crate) fn mark_progress(&self) {
        self.shared.mark_progress(self.clock.now());
    }

    /// True while any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.active.is_empty() || !self.queue.empty()
    }

    /// Stops admitting: new submits fail with
    /// [`SchedulerError::ShuttingDown`], waiting requests are cancelled at
    /// the next step, and running ones may finish until the grace period
    /// (from now) ends.
    pub fn begin_shutdown(&mut self) {
        self.shared.shutting_down.store(true, Ordering::Release);
        if self.shutdown_deadline.is_none() {
            self.shutdown_deadline = Some(self.clock.now() + self.config.shutdown_grace);
        }
    }

    /// Runs one step: sweeps cancelled and expired requests, makes way for
    /// waiting requests that outrank running ones, plans decodes first,
    /// continues chunked prefills, admits (or resumes) waiting requests in
    /// queue order within the batch, token and KV limits, runs the backend
    /// and delivers the results.
    pub fn step(&mut self) -> StepTrace {
        self.steps += 1;
        let mut trace = StepTrace {
            step: self.steps,
            ..StepTrace::default()
        };
        let now = self.clock.now();
        self.sweep(now, &mut trace);
        self.make_way(now, &mut trace);
        // `slots[k]` is the index in `active` of plan item `k`; entries
        // that leave during the step are only marked `gone` until the end,
        // so these indices stay valid.
        let (items, slots) = self.plan(now, &mut trace);
        if !items.is_empty() {
            let block_tables = slots
                .iter()
                .map(|&i| self.active[i].req.block_table.clone())
                .collect();
            let plan = StepPlan {
                items,
                block_tables,
            };
            self.hot.batch_size.record(plan.items.len() as f64);
            self.hot.batch_tokens.record(plan.num_tokens() as f64);
            self.hot.steps.increment(1);
            self.shared.steps.fetch_add(1, Ordering::Relaxed);
            match self.backend.step(&plan) {
                Ok(output) => match check_output(&plan, &output) {
                    Ok(()) => {
                        self.shared.consecutive_failures.store(0, Ordering::Relaxed);
                        self.apply(&plan, &slots, output, &mut trace);
                        self.relax_memory_cap();
                    }
                    Err(message) => {
                        self.step_failed(&slots, FailureKind::Internal, message, &mut trace);
                    }
                },
                // Out of memory before anything ran: retry with less work,
                // unless the step was already as small as a step can be.
                Err(err) if err.kind() == FailureKind::OutOfMemory && plan.num_tokens() > 1 => {
                    self.shed(plan.num_tokens(), err.to_string(), &mut trace);
                }
                Err(err) => self.step_failed(&slots, err.kind(), err.to_string(), &mut trace),
            }
            trace.items = plan.items;
        }
        self.active.retain(|a| !a.gone);
        self.publish();
        self.publish_memory();
        self.shared.mark_progress(self.clock.now());
        trace.blocks_used = self.blocks.used();
        trace.blocks_free = self.blocks.free();
        trace.running = self.active.len();
        trace.waiting = self.queue.qsize() - self.paused.len();
        trace.paused_now = self.paused.len();
        trace
    }
}

/// An inert request used to move a real one out of a slot.
fn placeholder(now: Instant) -> Option<BatchRequest> {
    let (tx, _) = batching_types::event_channel();
    BatchRequest::new(
        NewRequest {
            prompt_tokens: vec![0],
            max_tokens: 1,
            ..NewRequest::default()
        },
        tx,
        now,
    )
    .ok()
}

/// The backend must answer every item, in order.
fn check_output(plan: &StepPlan, output: &StepOutput) -> Result<(), String> {
    if output.results.len() != plan.items.len()
        || plan
            .items
            .iter()
            .zip(&output.results)
            .any(|(item, result)| item.id != result.id)
    {
        return Err(format!(
            "the backend answered {} results for a plan of {} items, or out of order",
            output.results.len(),
            plan.items.len()
        ));
    }
    Ok(())
}

impl<B: Backend, C: Clock + Clone> Drop for Scheduler<B, C> {
    /// No client is left hanging: whatever is still queued or running when
    /// the engine goes away (shutdown, or a panic unwinding the engine
    /// thread) gets its finish event. The backend is not called here, since
    /// it may be what panicked.
    fn drop(&mut self) {
        // Forgetting the paused set keeps `finish_request` from calling the
        // backend.
        self.paused.clear();
        let mut left: Vec<BatchRequest> = self.queue.drain();
        for a in self.active.drain(..) {
            if !a.gone {
                left.push(a.req);
            }
        }
        for mut req in left {
            let reason = if self.shutdown_deadline.is_some() {
                FinishReason::Cancelled
            } else {
                FinishReason::Error
            };
            self.finish_request(&mut req, reason, Some("the engine stopped".into()), None);
        }
        self.shared.alive.store(false, Ordering::Release);
        self.publish();
    }
}
