//! Forming a step: sweeping requests that must leave, planning decodes
//! (dropping caches when KV blocks run out), continuing chunked prefills
//! and admitting or resuming waiting requests in queue order.

use std::time::Instant;

use batching_types::{Backend, Clock, Failure, FinishReason, RequestStatus, StepItem, WorkKind};

use super::{
    preempt::{Reason, Victim},
    Active, Scheduler,
};
use crate::StepTrace;

impl<B: Backend, C: Clock + Clone> Scheduler<B, C> {
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
        // At shutdown, requests that never started are cancelled at once;
        // those already streaming (paused, or preempted to be recomputed)
        // may finish within the grace period like running ones.
        if shutting_down {
            ended.extend(
                self.queue
                    .remove_where(|r| grace_over || r.started_at.is_none()),
            );
        }
        for (n, mut r) in ended.into_iter().enumerate() {
            let message = if n < cancelled {
                "the client disconnected"
            } else if r.started_at.is_none() {
                "the server shut down before the request started"
            } else {
                "the server shut down"
            };
            self.finish_request(
                &mut r,
                FinishReason::Cancelled,
                Some(message.into()),
                Some(trace),
            );
        }
        // A deadline bounds the wait for the first token's work to start; a
        // request that has started (and was then paused or preempted) is
        // streaming already and is never timed out mid-answer.
        let expired = self
            .queue
            .remove_where(|r| r.started_at.is_none() && r.deadline.is_some_and(|d| now >= d));
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
        if let Some(cap) = self.memory.cap {
            budget = budget.min(cap);
            self.shed_decodes(cap, now, trace);
        }
        let mut planned = vec![false; self.active.len()];

        // Decodes. When blocks are short, most urgent first, so that a
        // preemption always hits a request that is less urgent than every
        // one already planned; otherwise (the common case) in admission
        // order, without computing priorities.
        let mut short = 0usize;
        let mut order: Vec<usize> = Vec::with_capacity(self.active.len());
        for (i, a) in self.active.iter().enumerate() {
            if a.decoding() {
                let needed = self.blocks.blocks_for(a.req.effective_tokens());
                short += needed.saturating_sub(a.req.block_table.len());
                order.push(i);
            }
        }
        if short > self.blocks.free() {
            order.sort_by_cached_key(|&i| self.rank_active(i, now));
        }
        for i in order {
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
                self.drop_cache(victim, Reason::Memory, trace);
                if matches!(victim, Victim::Active(v) if v == i) {
                    break;
                }
            }
        }

        // Prefills already under way, oldest first, each capped so that a
        // long prompt leaves budget for admissions beside it.
        for (i, a) in self.active.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if a.gone || a.decoding() {
                continue;
            }
            let len = self.chunk_len(a.context_len - a.prefilled, budget);
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
        // `make_way` has already made room for heads that outrank running
        // work.
        // During shutdown only requests that already started are left in
        // the queue; they may come back until the grace period ends.
        self.admit(&mut items, &mut slots, &mut budget, now, trace);
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
            let Some((id, tokens, held, started)) = self.queue.peek_with(|r| {
                let started = r.started_at.is_some();
                (
                    r.request_id,
                    r.effective_tokens(),
                    r.block_table.len(),
                    started,
                )
            }) else {
                break;
            };
            if self.shutdown_deadline.is_some() && !started {
                break;
            }
            let needed = self.blocks.blocks_for(tokens);
            if let Some(paused) = self.paused.remove(&id) {
                if needed.saturating_sub(held) > self.blocks.free() {
                    self.paused.insert(id, paused);
                    break;
                }
                let Some(mut req) = self.queue.remove(id) else {
                    break;
                };
                self.blocks.grow_to(&mut req.block_table, needed);
                self.resume(req, paused, items, slots, budget, now, trace);
                live += 1;
                continue;
            }
            // A new (or recomputed) request: its context may start with
            // blocks that are already cached.
            let context = self
                .queue
                .peek_with(|r| r.context_tokens())
                .unwrap_or_default();
            let hits = if self.config.prefix_cache {
                self.blocks.lookup(&context)
            } else {
                Vec::new()
            };
            let fresh = needed.saturating_sub(hits.len());
            if fresh + self.blocks.idle_among(&hits) > self.blocks.free() {
                break;
            }
            let Some(mut req) = self.queue.remove(id) else {
                break;
            };
            self.blocks.share(&mut req.block_table, &hits);
            self.blocks.grow_to(&mut req.block_table, needed);
            let cached = hits.len() * self.blocks.block_size();
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
                if self.config.prefix_cache {
                    self.hot.prefix_queries.increment(context.len() as u64);
                    self.hot.prefix_hits.increment(cached as u64);
                }
                req.cached_prompt_tokens = Some(cached.min(req.prompt_tokens.len()));
            }
            let generated = req.generated_tokens.len();
            let added = self
                .backend
                .add_sequence(id, &context, &req.sampling)
                .and_then(|()| match generated {
                    0 => Ok(()),
                    n => self.backend.mark_generated(id, n),
                })
                .and_then(|()| match cached {
                    0 => Ok(()),
                    n => self.backend.use_cached_prefix(id, n),
                });
            if let Err(err) = added {
                self.backend.release(id);
                self.fail_request(
                    &mut req,
                    err.kind(),
                    format!("the backend refused the request: {err}"),
                    Some(trace),
                );
                continue;
            }
            let len = self.chunk_len(context.len() - cached, *budget);
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
                prefilled: cached,
                last_token_at: None,
                gone: false,
            });
        }
    }

    /// Under a memory cap of `cap` tokens a step, pauses the least urgent
    /// decodes beyond it (they keep their caches and resume as the cap
    /// relaxes).
    fn shed_decodes(&mut self, cap: usize, now: Instant, trace: &mut StepTrace) {
        let mut decoding: Vec<usize> = (0..self.active.len())
            .filter(|&i| !self.active[i].gone && self.active[i].decoding())
            .collect();
        if decoding.len() <= cap {
            return;
        }
        // Most urgent first; the tail is paused.
        decoding.sort_by_cached_key(|&i| self.rank_active(i, now));
        for &i in &decoding[cap..] {
            self.pause_for(i, Reason::Shed, now, trace);
        }
    }

    /// The next prefill chunk of a request with `remaining` prompt tokens:
    /// what the step's budget leaves, and never more than
    /// `max_prefill_chunk`, so a long prompt leaves room for others.
    fn chunk_len(&self, remaining: usize, budget: usize) -> usize {
        remaining.min(budget).min(self.config.max_prefill_chunk)
    }

    /// Brings a paused request back into the batch where it stopped: its
    /// next prefill chunk, or a decode of its last token. The backend still
    /// holds its cache, so nothing is recomputed.
    #[allow(clippy::too_many_arguments)]
    fn resume(
        &mut self,
        mut req: batching_types::BatchRequest,
        paused: super::Paused,
        items: &mut Vec<StepItem>,
        slots: &mut Vec<usize>,
        budget: &mut usize,
        now: Instant,
        trace: &mut StepTrace,
    ) {
        let id = req.request_id;
        let decoding = paused.prefilled >= paused.context_len;
        let to = if decoding {
            RequestStatus::Running
        } else {
            RequestStatus::Prefilling
        };
        if req.set_status(to, now).is_err() {
            self.backend.release(id);
            self.finish_request(
                &mut req,
                FinishReason::Error,
                Some("internal error: a paused request could not resume".into()),
                Some(trace),
            );
            return;
        }
        let kind = if decoding {
            WorkKind::Decode
        } else {
            WorkKind::Prefill {
                len: self.chunk_len(paused.context_len - paused.prefilled, *budget),
            }
        };
        *budget -= kind.tokens();
        let priority = usize::from(req.priority.value());
        self.hot.pause_time[priority]
            .record(now.saturating_duration_since(paused.since).as_secs_f64());
        items.push(StepItem { id, kind });
        trace.resumed.push(id);
        slots.push(self.active.len());
        self.active.push(Active {
            req,
            context_len: paused.context_len,
            prefilled: paused.prefilled,
            last_token_at: paused.last_token_at,
            gone: false,
        });
    }
}
