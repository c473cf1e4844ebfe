//! Forming a step: sweeping requests that must leave, planning decodes
//! (preempting when KV blocks run out), continuing chunked prefills and
//! admitting waiting requests in queue order.

use std::time::Instant;

use batching_types::{Backend, Clock, FinishReason, RequestStatus, StepItem, WorkKind};

use super::{placeholder, Active, Engine};
use crate::{metrics as names, StepTrace};

impl<B: Backend, C: Clock + Clone> Engine<B, C> {
    /// Ends requests whose client left, waiting requests past their
    /// deadline, and everything the shutdown no longer allows.
    pub(super) fn sweep(&mut self, now: Instant, trace: &mut StepTrace) {
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
    pub(super) fn plan(
        &mut self,
        now: Instant,
        trace: &mut StepTrace,
    ) -> (Vec<StepItem>, Vec<usize>) {
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

    pub(super) fn admit(
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
    pub(super) fn urgency_key(&self, i: usize, now: Instant) -> f64 {
        let req = &self.active[i].req;
        let waited = req
            .enqueued_at
            .map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        f64::from(req.priority.value()) - self.config.aging_rate * waited
    }

    /// The least urgent request that is not yet planned: highest effective
    /// priority value, and the newest among equals.
    pub(super) fn pick_victim(&self, planned: &[bool], now: Instant) -> Option<usize> {
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
    pub(super) fn preempt(&mut self, i: usize, trace: &mut StepTrace) {
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
}
