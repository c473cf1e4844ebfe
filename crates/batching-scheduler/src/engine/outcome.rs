//! Applying a step's results: delivering tokens, deciding finishes,
//! recovering from failed steps, and the one place that finishes a request.

use std::{sync::atomic::Ordering, time::Instant};

use batching_types::{
    Backend, BatchRequest, Clock, FailureKind, FinishReason, OutputEvent, RequestStatus,
    SequenceOutcome, StepOutput, StepPlan, TokenLogprobs, Usage, WorkKind,
};

use super::{preempt::Reason, Scheduler, SHED_HOLD, STEPS_PER_RELAXATION};
use crate::{metrics as names, StepTrace};

impl<B: Backend, C: Clock + Clone> Scheduler<B, C> {
    /// Delivers the backend's results.
    pub(super) fn apply(
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
            let logprobs = result.logprobs;
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
                    } else {
                        // A long prompt's finished blocks are shareable at
                        // once, by requests that arrive while it is still
                        // being prefilled.
                        self.register_written(i);
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
                        // The whole context is in the cache now: requests
                        // that start the same way can share it at once.
                        self.register_written(i);
                        let a = &mut self.active[i];
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
                    self.deliver(i, token, logprobs, now, trace);
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
    pub(super) fn deliver(
        &mut self,
        i: usize,
        token: u32,
        logprobs: Option<TokenLogprobs>,
        now: Instant,
        trace: &mut StepTrace,
    ) {
        let a = &mut self.active[i];
        let index = a.req.generated_tokens.len();
        a.req.generated_tokens.push(token);
        let priority = usize::from(a.req.priority.value());
        if a.req
            .events
            .send(OutputEvent::Token {
                token,
                index,
                logprobs,
            })
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
        let sampling = &a.req.sampling;
        let grammar_done = sampling
            .constraint
            .as_ref()
            .is_some_and(|c| c.lock().is_finished());
        let stop_matched = sampling
            .stop_condition
            .as_ref()
            .is_some_and(|c| c.lock().on_token(token));
        let reason = if sampling.stop_token_ids.contains(&token) || grammar_done || stop_matched {
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
    pub(super) fn step_failed(
        &mut self,
        slots: &[usize],
        kind: FailureKind,
        message: String,
        trace: &mut StepTrace,
    ) {
        ::metrics::counter!(names::STEP_FAILURES, "kind" => kind.as_str()).increment(1);
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
                self.fail_active(i, kind, format!("the backend failed: {message}"), trace);
            } else {
                self.preempt(i, Reason::Retry, trace);
            }
        }
        trace.failure = Some(message);
    }

    /// The backend ran out of memory before running the step, so nothing
    /// advanced: every request keeps its place and its cache, the next
    /// steps feed at most half as many tokens (pausing the least urgent
    /// decodes beyond that), and new work is refused while memory is short.
    /// Not a failure of liveness: [`Scheduler::relax_memory_cap`] lifts the
    /// cap again step by step.
    pub(super) fn shed(&mut self, plan_tokens: usize, message: String, trace: &mut StepTrace) {
        let kind = FailureKind::OutOfMemory;
        ::metrics::counter!(names::STEP_FAILURES, "kind" => kind.as_str()).increment(1);
        self.shared.step_failures.fetch_add(1, Ordering::Relaxed);
        let cap = (plan_tokens / 2).max(1);
        self.memory.cap = Some(cap);
        self.memory.successes = 0;
        self.shared.shed_until(self.clock.now() + SHED_HOLD);
        self.publish_memory_pressure();
        trace.failure = Some(format!(
            "{message}; the next steps feed at most {cap} tokens"
        ));
    }

    /// After a successful step under a memory cap: every few steps the cap
    /// doubles, until it no longer limits anything. (New work is taken
    /// again once [`SHED_HOLD`] has passed since the last failure; the cap
    /// alone never refuses work.)
    pub(super) fn relax_memory_cap(&mut self) {
        let Some(cap) = self.memory.cap else {
            return;
        };
        self.memory.successes += 1;
        if self.memory.successes >= STEPS_PER_RELAXATION {
            self.memory.successes = 0;
            let doubled = cap.saturating_mul(2);
            self.memory.cap = (doubled < self.config.max_batch_tokens).then_some(doubled);
            self.publish_memory_pressure();
        }
    }

    pub(super) fn publish_memory_pressure(&self) {
        ::metrics::gauge!(names::MEMORY_TOKEN_CAP).set(self.memory.cap.unwrap_or(0) as f64);
    }

    /// [`Scheduler::finish_active`] with an error of `kind`.
    pub(super) fn fail_active(
        &mut self,
        i: usize,
        kind: FailureKind,
        message: String,
        trace: &mut StepTrace,
    ) {
        self.end_active(i, FinishReason::Error, Some(message), Some(kind), trace);
    }

    /// Ends active request `i` (its written blocks offered to the prefix
    /// cache first, its backend sequence released), as
    /// [`Scheduler::finish_request`] does.
    pub(super) fn finish_active(
        &mut self,
        i: usize,
        reason: FinishReason,
        message: Option<String>,
        trace: &mut StepTrace,
    ) {
        let failure = (reason == FinishReason::Error).then_some(FailureKind::Internal);
        self.end_active(i, reason, message, failure, trace);
    }

    fn end_active(
        &mut self,
        i: usize,
        reason: FinishReason,
        message: Option<String>,
        failure: Option<FailureKind>,
        trace: &mut StepTrace,
    ) {
        if self.active[i].gone {
            return;
        }
        self.register_written(i);
        let Some(mut req) = self.take_active(i) else {
            return;
        };
        self.backend.release(req.request_id);
        self.end_request(&mut req, reason, message, failure, Some(trace));
    }

    /// Offers the full blocks that active request `i` has written to the
    /// prefix cache, so later requests that start with the same tokens
    /// reuse them. Its last sampled token was never fed, so it is not in
    /// the cache.
    pub(super) fn register_written(&mut self, i: usize) {
        if !self.config.prefix_cache {
            return;
        }
        let a = &self.active[i];
        let written = if a.decoding() {
            a.req.effective_tokens().saturating_sub(1)
        } else {
            a.prefilled
        };
        let full = written / self.blocks.block_size() * self.blocks.block_size();
        if full == 0 {
            return;
        }
        let tokens = a.req.context_tokens();
        self.blocks
            .register(&a.req.block_table, &tokens[..full.min(tokens.len())]);
    }

    /// Sends the one finish event, frees blocks and records metrics. An
    /// `Error` finish here is an internal one; [`Scheduler::fail_request`]
    /// names another kind.
    pub(super) fn finish_request(
        &mut self,
        req: &mut BatchRequest,
        reason: FinishReason,
        message: Option<String>,
        trace: Option<&mut StepTrace>,
    ) {
        let failure = (reason == FinishReason::Error).then_some(FailureKind::Internal);
        self.end_request(req, reason, message, failure, trace);
    }

    /// Ends a request with an error of `kind`.
    pub(super) fn fail_request(
        &mut self,
        req: &mut BatchRequest,
        kind: FailureKind,
        message: String,
        trace: Option<&mut StepTrace>,
    ) {
        self.end_request(req, FinishReason::Error, Some(message), Some(kind), trace);
    }

    fn end_request(
        &mut self,
        req: &mut BatchRequest,
        reason: FinishReason,
        message: Option<String>,
        failure: Option<FailureKind>,
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
        // A paused request still has a backend cache to free.
        if self.paused.remove(&req.request_id).is_some() {
            self.backend.release(req.request_id);
        }
        self.blocks.release(&mut req.block_table);
        if !self.retries.is_empty() {
            self.retries.remove(&req.request_id);
        }
        if reason == FinishReason::Cancelled {
            ::metrics::counter!(names::CANCELLATIONS).increment(1);
        }
        if let Some(kind) = failure {
            ::metrics::counter!(names::REQUEST_FAILURES, "kind" => kind.as_str()).increment(1);
        }
        ::metrics::counter!(names::REQUESTS_FINISHED, "reason" => reason.as_str()).increment(1);
        let _ = req.events.send(OutputEvent::Finished {
            reason,
            usage: Usage {
                prompt_tokens: req.prompt_tokens.len(),
                completion_tokens: req.generated_tokens.len(),
                cached_tokens: req.cached_prompt_tokens.unwrap_or(0),
            },
            message,
            failure,
        });
        if let Some(trace) = trace {
            trace.finished.push((req.request_id, reason));
        }
    }

    pub(super) fn publish(&self) {
        let s = &self.shared;
        let running = self.active.len();
        let paused = self.paused.len();
        let waiting = self.queue.qsize().saturating_sub(paused);
        s.running.store(running, Ordering::Relaxed);
        s.waiting.store(waiting, Ordering::Relaxed);
        s.paused.store(paused, Ordering::Relaxed);
        self.hot.paused.set(paused as f64);
        s.blocks_used.store(self.blocks.used(), Ordering::Relaxed);
        s.blocks_free.store(self.blocks.free(), Ordering::Relaxed);
        self.hot.running.set(running as f64);
        self.hot.waiting.set(waiting as f64);
        self.hot.blocks_used.set(self.blocks.used() as f64);
        self.hot.blocks_free.set(self.blocks.free() as f64);
        self.hot.blocks_cached.set(self.blocks.cached_free() as f64);
    }

    /// Publishes the backend's memory; only after a step, since the drop
    /// guard must not call a backend that may have panicked.
    pub(super) fn publish_memory(&self) {
        let s = &self.shared;
        let m = self.backend.memory();
        let bytes = [m.active_bytes, m.peak_bytes, m.cache_bytes, m.kv_bytes];
        for ((slot, gauge), value) in s.memory.iter().zip(&self.hot.memory).zip(bytes) {
            slot.store(value, Ordering::Relaxed);
            gauge.set(value as f64);
        }
    }
}
