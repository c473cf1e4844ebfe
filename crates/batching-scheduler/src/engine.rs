//! The synchronous engine core: one call of [`Engine::step`] plans, runs
//! and accounts one forward pass. The threaded loop in [`crate::handle`]
//! only wraps it, so tests drive it step by step with a manual clock.

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use batching_queue::{PriorityQueueWithAging, QueueConfig};
use batching_types::{
    Backend, BackendCapacity, BatchRequest, Clock, EventReceiver, FinishReason, NewRequest,
    OutputEvent, RequestId, RequestStatus, SequenceOutcome, StepItem, StepOutput, StepPlan, Usage,
    WorkKind,
};

use crate::{
    blocks::BlockAllocator,
    metrics as names,
    shared::{EngineHealth, Limits, Shared},
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

/// The scheduler's core: owns the backend, the waiting queue and the KV
/// block accounting, and runs one step per call of [`Engine::step`].
///
/// Not thread-safe by design: it lives on the engine thread (MLX arrays
/// must stay on the thread that made them). Use
/// [`crate::SchedulerHandle`] to run it on its own thread.
pub struct Engine<B: Backend, C: Clock + Clone> {
    config: SchedulerConfig,
    backend: B,
    clock: C,
    queue: PriorityQueueWithAging<BatchRequest, C>,
    active: Vec<Active>,
    blocks: BlockAllocator,
    shared: Arc<Shared>,
    capacity: BackendCapacity,
    /// Failed whole steps each request has been part of.
    retries: HashMap<RequestId, u32>,
    /// When running requests are cancelled, once shutdown has begun.
    shutdown_deadline: Option<Instant>,
    steps: u64,
    hot: names::Hot,
}

impl<B: Backend, C: Clock + Clone> std::fmt::Debug for Engine<B, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
}

impl<B: Backend, C: Clock + Clone> Engine<B, C> {
    /// An engine over `backend`; validates `config` against the backend's
    /// capacity (it needs room for at least one block).
    pub fn new(config: SchedulerConfig, backend: B, clock: C) -> Result<Self, SchedulerError> {
        config.validate()?;
        let capacity = backend.capacity();
        let total_blocks = capacity.kv_tokens / config.block_size;
        if total_blocks == 0 || capacity.max_context < 2 {
            return Err(SchedulerError::InvalidConfig(format!(
                "the backend holds {} KV tokens and a context of {}: not even one block of {} tokens and one generated token fit",
                capacity.kv_tokens, capacity.max_context, config.block_size
            )));
        }
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
        let shared = Arc::new(Shared::new(Limits {
            max_queue: config.max_queue,
            block_size: config.block_size,
            total_blocks,
            max_context: capacity.max_context,
            overflow: config.context_overflow,
        }));
        Ok(Self {
            blocks: BlockAllocator::new(total_blocks, config.block_size),
            config,
            backend,
            clock,
            queue,
            active: Vec::new(),
            shared,
            capacity,
            retries: HashMap::new(),
            shutdown_deadline: None,
            steps: 0,
            hot: names::Hot::register(),
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
    pub fn health(&self) -> EngineHealth {
        self.shared.health()
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

    /// Runs one step: sweeps cancelled and expired requests, plans decodes
    /// first, continues chunked prefills, admits waiting requests in queue
    /// order within the batch, token and KV limits, runs the backend and
    /// delivers the results.
    pub fn step(&mut self) -> StepTrace {
        self.steps += 1;
        let mut trace = StepTrace {
            step: self.steps,
            ..StepTrace::default()
        };
        let now = self.clock.now();
        self.sweep(now, &mut trace);
        // `slots[k]` is the index in `active` of plan item `k`; entries
        // that leave during the step are only marked `gone` until the end,
        // so these indices stay valid.
        let (items, slots) = self.plan(now, &mut trace);
        if !items.is_empty() {
            let plan = StepPlan { items };
            self.hot.batch_size.record(plan.items.len() as f64);
            self.hot.batch_tokens.record(plan.num_tokens() as f64);
            self.hot.steps.increment(1);
            self.shared.steps.fetch_add(1, Ordering::Relaxed);
            match self.backend.step(&plan) {
                Ok(output) => match check_output(&plan, &output) {
                    Ok(()) => {
                        self.shared.consecutive_failures.store(0, Ordering::Relaxed);
                        self.apply(&plan, &slots, output, &mut trace);
                    }
                    Err(message) => self.step_failed(&slots, message, &mut trace),
                },
                Err(err) => self.step_failed(&slots, err.to_string(), &mut trace),
            }
            trace.items = plan.items;
        }
        self.active.retain(|a| !a.gone);
        self.publish();
        trace.blocks_used = self.blocks.used();
        trace.blocks_free = self.blocks.free();
        trace.running = self.active.len();
        trace.waiting = self.queue.qsize();
        trace
    }

    /// Ends requests whose client left, waiting requests past their
    /// deadline, and everything the shutdown no longer allows.
    fn sweep(&mut self, now: Instant, trace: &mut StepTrace) {
        let shutting_down = self.shutdown_deadline.is_some();
        let grace_over = self.shutdown_deadline.is_some_and(|d| now >= d);
        for i in 0..self.active.len() {
            let reason = if self.active[i].req.events.is_closed() {
                Some((FinishReason::Cancelled, "the client disconnected"))
            } else if grace_over {
                Some((FinishReason::Cancelled, "the server shut down"))
            } else {
                None
            };
            if let Some((reason, message)) = reason {
                self.finish_active(i, reason, Some(message.to_owned()), trace);
            }
        }
        self.active.retain(|a| !a.gone);
        let mut ended = self.queue.remove_where(|r| r.events.is_closed());
        let cancelled = ended.len();
        if shutting_down {
            ended.extend(self.queue.drain());
        }
        for (n, mut r) in ended.into_iter().enumerate() {
            let message = if n < cancelled {
                "the client disconnected"
            } else {
                "the server shut down before the request started"
            };
            self.finish_request(
                &mut r,
                FinishReason::Cancelled,
                Some(message.into()),
                Some(trace),
            );
        }
        let expired = self
            .queue
            .remove_where(|r| r.deadline.is_some_and(|d| now >= d));
        for mut r in expired {
            self.finish_request(
                &mut r,
                FinishReason::Timeout,
                Some("the deadline passed while the request was waiting".into()),
                Some(trace),
            );
        }
    }

    /// Builds the plan: decodes (KV permitting, preempting if not), then
    /// continued prefills, then admissions.
    fn plan(&mut self, now: Instant, trace: &mut StepTrace) -> (Vec<StepItem>, Vec<usize>) {
        let mut items = Vec::with_capacity(self.config.max_batch_size);
        let mut slots = Vec::with_capacity(self.config.max_batch_size);
        let mut budget = self.config.max_batch_tokens;
        let mut planned = vec![false; self.active.len()];

        // Decodes. When blocks are short, most urgent first, so that a
        // preemption always hits a request that is less urgent than every
        // one already planned; otherwise (the common case) in admission
        // order, without computing priorities.
        let mut short = 0usize;
        let mut order: Vec<(f64, usize)> = Vec::with_capacity(self.active.len());
        for (i, a) in self.active.iter().enumerate() {
            if a.decoding() {
                let needed = self.blocks.blocks_for(a.req.effective_tokens());
                short += needed.saturating_sub(a.req.block_table.len());
                order.push((0.0, i));
            }
        }
        if short > self.blocks.free() {
            for entry in &mut order {
                entry.0 = self.urgency_key(entry.1, now);
            }
            order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        }
        for (_, i) in order {
            if self.active[i].gone {
                continue;
            }
            let needed = self
                .blocks
                .blocks_for(self.active[i].req.effective_tokens());
            loop {
                let a = &mut self.active[i];
                if self.blocks.grow_to(&mut a.req.block_table, needed) {
                    planned[i] = true;
                    slots.push(i);
                    items.push(StepItem {
                        id: a.req.request_id,
                        kind: WorkKind::Decode,
                    });
                    budget = budget.saturating_sub(1);
                    break;
                }
                let Some(victim) = self.pick_victim(&planned, now) else {
                    break;
                };
                self.preempt(victim, trace);
                if victim == i {
                    break;
                }
            }
        }

        // Prefills already under way, oldest first.
        for (i, a) in self.active.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if a.gone || a.decoding() {
                continue;
            }
            let len = (a.context_len - a.prefilled).min(budget);
            budget -= len;
            items.push(StepItem {
                id: a.req.request_id,
                kind: WorkKind::Prefill { len },
            });
            planned[i] = true;
            slots.push(i);
        }

        // Admissions in queue order; the head must fit now, and nobody
        // overtakes it, so priorities and aging are honoured exactly.
        if self.shutdown_deadline.is_none() {
            self.admit(&mut items, &mut slots, &mut budget, now, trace);
        }
        (items, slots)
    }

    fn admit(
        &mut self,
        items: &mut Vec<StepItem>,
        slots: &mut Vec<usize>,
        budget: &mut usize,
        now: Instant,
        trace: &mut StepTrace,
    ) {
        let mut live = self.active.iter().filter(|a| !a.gone).count();
        while *budget > 0
            && items.len() < self.config.max_batch_size
            && live < self.config.max_batch_size
        {
            let Some((id, tokens)) = self
                .queue
                .peek_with(|r| (r.request_id, r.effective_tokens()))
            else {
                break;
            };
            if self.blocks.blocks_for(tokens) > self.blocks.free() {
                break;
            }
            let Some(mut req) = self.queue.remove(id) else {
                break;
            };
            let first = req.started_at.is_none();
            if req.set_status(RequestStatus::Prefilling, now).is_err() {
                self.finish_request(
                    &mut req,
                    FinishReason::Error,
                    Some("internal error: a queued request was not waiting".into()),
                    Some(trace),
                );
                continue;
            }
            if first {
                self.shared.unreserve();
                let waited = now.saturating_duration_since(req.created_at).as_secs_f64();
                self.hot.queue_time[usize::from(req.priority.value())].record(waited);
            }
            let needed = self.blocks.blocks_for(tokens);
            self.blocks.grow_to(&mut req.block_table, needed);
            let context = req.context_tokens();
            if let Err(err) = self.backend.add_sequence(id, &context, &req.sampling) {
                self.finish_request(
                    &mut req,
                    FinishReason::Error,
                    Some(format!("the backend refused the request: {err}")),
                    Some(trace),
                );
                continue;
            }
            let len = context.len().min(*budget);
            *budget -= len;
            items.push(StepItem {
                id,
                kind: WorkKind::Prefill { len },
            });
            trace.admitted.push(id);
            live += 1;
            slots.push(self.active.len());
            self.active.push(Active {
                req,
                context_len: context.len(),
                prefilled: 0,
                last_token_at: None,
                gone: false,
            });
        }
    }

    /// The queue's effective priority at `now`
    /// (`base - aging_rate * seconds waited`): lower is more urgent.
    fn urgency_key(&self, i: usize, now: Instant) -> f64 {
        let req = &self.active[i].req;
        let waited = req
            .enqueued_at
            .map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        f64::from(req.priority.value()) - self.config.aging_rate * waited
    }

    /// The least urgent request that is not yet planned: highest effective
    /// priority value, and the newest among equals.
    fn pick_victim(&self, planned: &[bool], now: Instant) -> Option<usize> {
        (0..self.active.len())
            .filter(|&i| !planned[i] && !self.active[i].gone)
            .max_by(|&a, &b| {
                let (ra, rb) = (&self.active[a].req, &self.active[b].req);
                self.urgency_key(a, now)
                    .total_cmp(&self.urgency_key(b, now))
                    .then(ra.enqueued_at.cmp(&rb.enqueued_at))
                    .then(ra.request_id.cmp(&rb.request_id))
            })
    }

    /// Frees a request's blocks, releases it in the backend and puts it back
    /// in the queue with its original enqueue time and its tokens.
    fn preempt(&mut self, i: usize, trace: &mut StepTrace) {
        let now = self.clock.now();
        let Some(stand_in) = placeholder(now) else {
            return;
        };
        let a = &mut self.active[i];
        if a.gone {
            return;
        }
        a.gone = true;
        self.blocks.release(&mut a.req.block_table);
        self.backend.release(a.req.request_id);
        let mut req = std::mem::replace(&mut a.req, stand_in);
        trace.preempted.push(req.request_id);
        ::metrics::counter!(names::PREEMPTIONS).increment(1);
        // Both PREFILLING and RUNNING may go back to WAITING.
        if req.set_status(RequestStatus::Waiting, now).is_err() {
            self.finish_request(
                &mut req,
                FinishReason::Error,
                Some("internal error: could not preempt".into()),
                Some(trace),
            );
            return;
        }
        if let Err(err) = self.queue.try_put(req) {
            let message = err.to_string();
            if let Some(mut req) = err.into_inner() {
                self.finish_request(&mut req, FinishReason::Error, Some(message), Some(trace));
            }
        }
    }

    /// Delivers the backend's results.
    fn apply(
        &mut self,
        plan: &StepPlan,
        slots: &[usize],
        output: StepOutput,
        trace: &mut StepTrace,
    ) {
        let now = self.clock.now();
        for ((item, result), &i) in plan.items.iter().zip(output.results).zip(slots) {
            if !self.retries.is_empty() {
                self.retries.remove(&item.id);
            }
            match (item.kind, result.outcome) {
                (WorkKind::Prefill { len }, SequenceOutcome::Pending) => {
                    let a = &mut self.active[i];
                    a.prefilled += len;
                    if a.prefilled >= a.context_len {
                        self.finish_active(
                            i,
                            FinishReason::Error,
                            Some("the backend finished a prefill without a token".into()),
                            trace,
                        );
                    }
                }
                (kind, SequenceOutcome::Token(token)) => {
                    let a = &mut self.active[i];
                    if let WorkKind::Prefill { len } = kind {
                        a.prefilled += len;
                        if a.prefilled < a.context_len {
                            self.finish_active(
                                i,
                                FinishReason::Error,
                                Some("the backend sampled a token before the prefill ended".into()),
                                trace,
                            );
                            continue;
                        }
                        if a.req.set_status(RequestStatus::Running, now).is_err() {
                            self.finish_active(
                                i,
                                FinishReason::Error,
                                Some("internal error: could not start decoding".into()),
                                trace,
                            );
                            continue;
                        }
                    }
                    self.deliver(i, token, now, trace);
                }
                (WorkKind::Decode, SequenceOutcome::Pending) => {
                    self.finish_active(
                        i,
                        FinishReason::Error,
                        Some("the backend returned no token for a decode".into()),
                        trace,
                    );
                }
                (_, SequenceOutcome::Failed(message)) => {
                    self.finish_active(i, FinishReason::Error, Some(message), trace);
                }
            }
        }
    }

    /// Sends one token and ends the request if it is done.
    fn deliver(&mut self, i: usize, token: u32, now: Instant, trace: &mut StepTrace) {
        let a = &mut self.active[i];
        let index = a.req.generated_tokens.len();
        a.req.generated_tokens.push(token);
        let priority = usize::from(a.req.priority.value());
        if a.req
            .events
            .send(OutputEvent::Token { token, index })
            .is_err()
        {
            self.finish_active(
                i,
                FinishReason::Cancelled,
                Some("the client disconnected".into()),
                trace,
            );
            return;
        }
        trace.tokens.push((a.req.request_id, token));
        self.hot.tokens.increment(1);
        match a.last_token_at {
            None if index == 0 => {
                let ttft = now.saturating_duration_since(a.req.created_at);
                self.hot.ttft[priority].record(ttft.as_secs_f64());
            }
            Some(last) => {
                self.hot.itl[priority].record(now.saturating_duration_since(last).as_secs_f64());
            }
            None => {}
        }
        a.last_token_at = Some(now);
        let reason = if a.req.sampling.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if a.req.generated_tokens.len() >= a.req.max_tokens {
            Some(FinishReason::Length)
        } else if a.req.effective_tokens() >= self.capacity.max_context {
            Some(FinishReason::ContextLength)
        } else {
            None
        };
        if let Some(reason) = reason {
            self.finish_active(i, reason, None, trace);
        }
    }

    /// A whole step failed: nothing advanced. Each request in it is
    /// re-queued for recomputation, or fails once it has used its retries.
    fn step_failed(&mut self, slots: &[usize], message: String, trace: &mut StepTrace) {
        ::metrics::counter!(names::STEP_FAILURES).increment(1);
        self.shared.step_failures.fetch_add(1, Ordering::Relaxed);
        self.shared
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed);
        for &i in slots {
            let id = self.active[i].req.request_id;
            let tries = self.retries.entry(id).or_insert(0);
            *tries += 1;
            if *tries > self.config.max_step_retries {
                self.retries.remove(&id);
                self.finish_active(
                    i,
                    FinishReason::Error,
                    Some(format!("the backend failed: {message}")),
                    trace,
                );
            } else {
                self.preempt(i, trace);
            }
        }
        trace.failure = Some(message);
    }

    fn finish_active(
        &mut self,
        i: usize,
        reason: FinishReason,
        message: Option<String>,
        trace: &mut StepTrace,
    ) {
        // A cheap stand-in: the slot is dropped by the next `retain`.
        let Some(stand_in) = placeholder(self.clock.now()) else {
            return;
        };
        let a = &mut self.active[i];
        if a.gone {
            return;
        }
        a.gone = true;
        self.backend.release(a.req.request_id);
        let mut req = std::mem::replace(&mut a.req, stand_in);
        self.finish_request(&mut req, reason, message, Some(trace));
    }

    /// Sends the one finish event, frees blocks and records metrics.
    fn finish_request(
        &mut self,
        req: &mut BatchRequest,
        reason: FinishReason,
        message: Option<String>,
        trace: Option<&mut StepTrace>,
    ) {
        let now = self.clock.now();
        if req.started_at.is_none() {
            self.shared.unreserve();
        }
        let to = match reason {
            FinishReason::Stop | FinishReason::Length | FinishReason::ContextLength => {
                RequestStatus::Completed
            }
            _ => RequestStatus::Cancelled,
        };
        // A refused transition cannot happen on these paths; the client
        // still gets its finish event either way.
        let _ = req.set_status(to, now);
        self.blocks.release(&mut req.block_table);
        if !self.retries.is_empty() {
            self.retries.remove(&req.request_id);
        }
        if reason == FinishReason::Cancelled {
            ::metrics::counter!(names::CANCELLATIONS).increment(1);
        }
        ::metrics::counter!(names::REQUESTS_FINISHED, "reason" => reason.as_str()).increment(1);
        let _ = req.events.send(OutputEvent::Finished {
            reason,
            usage: Usage {
                prompt_tokens: req.prompt_tokens.len(),
                completion_tokens: req.generated_tokens.len(),
            },
            message,
        });
        if let Some(trace) = trace {
            trace.finished.push((req.request_id, reason));
        }
    }

    fn publish(&self) {
        let s = &self.shared;
        let running = self.active.len();
        let waiting = self.queue.qsize();
        s.running.store(running, Ordering::Relaxed);
        s.waiting.store(waiting, Ordering::Relaxed);
        s.blocks_used.store(self.blocks.used(), Ordering::Relaxed);
        s.blocks_free.store(self.blocks.free(), Ordering::Relaxed);
        self.hot.running.set(running as f64);
        self.hot.waiting.set(waiting as f64);
        self.hot.blocks_used.set(self.blocks.used() as f64);
        self.hot.blocks_free.set(self.blocks.free() as f64);
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

impl<B: Backend, C: Clock + Clone> Drop for Engine<B, C> {
    /// No client is left hanging: whatever is still queued or running when
    /// the engine goes away (shutdown, or a panic unwinding the engine
    /// thread) gets its finish event. The backend is not called here, since
    /// it may be what panicked.
    fn drop(&mut self) {
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
