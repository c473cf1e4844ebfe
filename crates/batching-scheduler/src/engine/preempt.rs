//! Taking requests out of the batch: pausing for urgency (the cache stays),
//! dropping a cache for memory (resume by recomputation), and the one rule
//! that decides who outranks whom.
//!
//! # The preemption rule
//!
//! A waiting request `W` may take the place of a running request `R` only
//! if `W` *outranks* `R` in the aging order the queue serves by: `W`'s
//! effective priority (`base - aging_rate * seconds since it was first
//! queued`) is lower, ties going to the earlier arrival. Running requests
//! keep aging from their first enqueue, so a request that has waited long
//! enough to age past a class is never preempted by newer work of that
//! class: a LOW request queued more than `2 / aging_rate` seconds ago ranks
//! ahead of every HIGH request that arrives from then on. And a request
//! that has been taken out of the batch `max_preemptions` times is not
//! taken out for urgency again.
//!
//! When `W` needs a batch slot, the least urgent outranked running request
//! is *paused*: it keeps its KV blocks and its backend cache and waits in
//! the queue, under its original rank, to continue exactly where it
//! stopped. When `W` needs KV blocks, the caches of less urgent requests
//! (paused ones and outranked running ones, least urgent first) are
//! dropped until enough are free; those requests resume later by
//! recomputing their prompt and generated tokens. Nothing is taken out
//! unless the head then fits, so no request is disturbed for nothing.

use std::{cmp::Ordering, time::Instant};

use batching_types::{
    Backend, BatchRequest, Clock, FinishReason, Priority, RequestId, RequestStatus,
};

use super::{placeholder, Paused, Scheduler};
use crate::{metrics as names, StepTrace};

/// Where a request stands in service order at one instant; smaller is
/// served first. It is the queue's own order: effective priority, then the
/// earlier first enqueue, then the older id.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rank {
    effective: f64,
    enqueued_at: Option<Instant>,
    id: RequestId,
}

impl Rank {
    pub(super) fn new(
        priority: Priority,
        enqueued_at: Option<Instant>,
        id: RequestId,
        now: Instant,
        aging_rate: f64,
    ) -> Self {
        let waited = enqueued_at.map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        Self {
            effective: f64::from(priority.value()) - aging_rate * waited,
            enqueued_at,
            id,
        }
    }

    pub(super) fn of(req: &BatchRequest, now: Instant, aging_rate: f64) -> Self {
        Self::new(
            req.priority,
            req.enqueued_at,
            req.request_id,
            now,
            aging_rate,
        )
    }

    /// Whether `self` is served strictly before `other`.
    pub(super) fn outranks(&self, other: &Rank) -> bool {
        self.cmp(other) == Ordering::Less
    }
}

impl PartialEq for Rank {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Rank {}

impl PartialOrd for Rank {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Rank {
    fn cmp(&self, other: &Self) -> Ordering {
        self.effective
            .total_cmp(&other.effective)
            .then(self.enqueued_at.cmp(&other.enqueued_at))
            .then(self.id.cmp(&other.id))
    }
}

/// Why a request leaves the batch; the label of the preemption counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reason {
    /// Paused for a more urgent request.
    Priority,
    /// Its cache was dropped for lack of KV blocks.
    Memory,
    /// Re-queued after a failed step.
    Retry,
    /// Paused because a step ran out of memory (cache kept).
    Shed,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Priority => "priority",
            Self::Memory => "memory",
            Self::Retry => "retry",
            Self::Shed => "shed",
        }
    }
}

/// A holder of KV blocks that could give them up.
#[derive(Debug, Clone, Copy)]
pub(super) enum Victim {
    /// A request in the batch, by its index in `active`.
    Active(usize),
    /// A paused request, waiting in the queue with its cache.
    Paused(RequestId),
}

/// What the most urgent waiting requests need, read from the queue.
struct Head {
    id: RequestId,
    rank: Rank,
    /// KV blocks it needs beyond those it holds.
    blocks: usize,
}

impl<B: Backend, C: Clock + Clone> Scheduler<B, C> {
    pub(super) fn rank_active(&self, i: usize, now: Instant) -> Rank {
        Rank::of(&self.active[i].req, now, self.config.aging_rate)
    }

    fn rank_paused(&self, id: RequestId, p: &Paused, now: Instant) -> Rank {
        Rank::new(p.priority, p.enqueued_at, id, now, self.config.aging_rate)
    }

    /// Makes room in the batch for waiting requests that outrank running
    /// ones (see the module documentation). Runs before decodes are planned,
    /// so that everyone it takes out simply is not in this step's plan.
    pub(super) fn make_way(&mut self, now: Instant, trace: &mut StepTrace) {
        if !self.config.preemption || self.shutdown_deadline.is_some() {
            return;
        }
        let max = self.config.max_batch_size;
        let rate = self.config.aging_rate;
        let blocks = &self.blocks;
        let prefix_cache = self.config.prefix_cache;
        let free = blocks.free();
        let heads: Vec<Head> = self.queue.peek_n_with(max, |r| {
            // What admission will take from the free blocks: a paused
            // request only its growth; a new one its blocks minus prefix-
            // cache hits, plus the hits that are idle (they leave the LRU).
            // Hits only lower the need, so the context is looked up only
            // when the plain need does not fit: most steps copy nothing.
            let needed = blocks
                .blocks_for(r.effective_tokens())
                .saturating_sub(r.block_table.len());
            let taken = if !r.block_table.is_empty() || !prefix_cache || needed <= free {
                needed
            } else {
                let hits = blocks.lookup(&r.context_tokens());
                needed.saturating_sub(hits.len()) + blocks.idle_among(&hits)
            };
            Head {
                id: r.request_id,
                rank: Rank::of(r, now, rate),
                blocks: taken,
            }
        });
        let mut live = self.active.iter().filter(|a| !a.gone).count();
        // Blocks promised already: the ones this step's decodes will take,
        // then those of the heads judged so far, so that each head is judged
        // against what will really be left.
        let mut reserved: usize = self
            .active
            .iter()
            .filter(|a| !a.gone && a.decoding())
            .map(|a| {
                self.blocks
                    .blocks_for(a.req.effective_tokens())
                    .saturating_sub(a.req.block_table.len())
            })
            .sum();
        let mut judged = std::collections::HashSet::new();
        for head in heads {
            judged.insert(head.id);
            let free = self.blocks.free().saturating_sub(reserved);
            let slot_short = live >= max;
            let blocks_short = head.blocks.saturating_sub(free);
            if !slot_short && blocks_short == 0 {
                live += 1;
                reserved += head.blocks;
                continue;
            }
            let Some(choice) = self.choose_victims(&head, &judged, slot_short, blocks_short, now)
            else {
                // The head waits, and nobody behind it may overtake it.
                break;
            };
            for victim in choice.drop {
                if let Victim::Active(_) = victim {
                    live -= 1;
                }
                self.drop_cache(victim, Reason::Memory, trace);
            }
            if let Some(i) = choice.pause {
                live -= 1;
                self.pause(i, now, trace);
            }
            live += 1;
            reserved += head.blocks;
        }
    }

    /// Who gives way to `head`: a running request to pause for its slot
    /// and caches to drop for its blocks, all outranked by it. `None` when
    /// that would not be enough.
    fn choose_victims(
        &self,
        head: &Head,
        judged: &std::collections::HashSet<RequestId>,
        slot_short: bool,
        blocks_short: usize,
        now: Instant,
    ) -> Option<Choice> {
        let limit = self.config.max_preemptions;
        // Running requests the head may take out, least urgent first.
        let mut running: Vec<(Rank, usize)> = (0..self.active.len())
            .filter(|&i| !self.active[i].gone && self.active[i].req.preemptions < limit)
            .map(|i| (self.rank_active(i, now), i))
            .filter(|(rank, _)| head.rank.outranks(rank))
            .collect();
        running.sort_by_key(|r| std::cmp::Reverse(r.0));
        let pause = if slot_short {
            Some(running.first()?.1)
        } else {
            None
        };
        let mut drop = Vec::new();
        if blocks_short > 0 {
            // Every cache the head may reclaim, least urgent first; the
            // request paused for the slot is among them and, if its blocks
            // are needed, is dropped instead of paused.
            // Only blocks nobody else reads (no prefix-cache sharer) become
            // free when a cache is dropped.
            let mut pool: Vec<(Rank, Victim, usize)> = running
                .iter()
                .map(|&(rank, i)| {
                    let held = self.blocks.sole_owned(&self.active[i].req.block_table);
                    (rank, Victim::Active(i), held)
                })
                .collect();
            // Every paused request that is not a head judged so far sits
            // behind this head in the queue's own order, so its cache may
            // go: this is judged by queue position, not by `Rank`, so that
            // the two orders can never disagree on a tie and leave the head
            // waiting for blocks that only a paused request holds.
            for (&id, p) in &self.paused {
                if !judged.contains(&id) {
                    let rank = self.rank_paused(id, p, now);
                    pool.push((rank, Victim::Paused(id), self.blocks.sole_owned(&p.table)));
                }
            }
            pool.sort_by_key(|p| std::cmp::Reverse(p.0));
            let mut reclaimed = 0;
            for (_, victim, held) in pool {
                if reclaimed >= blocks_short {
                    break;
                }
                reclaimed += held;
                drop.push(victim);
            }
            if reclaimed < blocks_short {
                return None;
            }
        }
        let pause = pause.filter(|&p| {
            !drop
                .iter()
                .any(|v| matches!(v, Victim::Active(i) if *i == p))
        });
        Some(Choice { pause, drop })
    }

    /// Takes running request `i` out of the batch for a more urgent one: it
    /// keeps its blocks and its backend cache and waits in the queue, under
    /// its original rank, to continue where it stopped.
    pub(super) fn pause(&mut self, i: usize, now: Instant, trace: &mut StepTrace) {
        self.pause_for(i, Reason::Priority, now, trace);
    }

    /// [`Scheduler::pause`] for `reason`; only a pause for urgency counts
    /// against the request's preemption limit.
    pub(super) fn pause_for(
        &mut self,
        i: usize,
        reason: Reason,
        now: Instant,
        trace: &mut StepTrace,
    ) {
        let Some(mut req) = self.take_active(i) else {
            return;
        };
        let a = &self.active[i];
        let state = Paused {
            context_len: a.context_len,
            prefilled: a.prefilled,
            last_token_at: a.last_token_at,
            since: now,
            priority: req.priority,
            enqueued_at: req.enqueued_at,
            table: req.block_table.clone(),
        };
        if req.set_status(RequestStatus::Paused, now).is_err() {
            self.backend.release(req.request_id);
            self.finish_request(
                &mut req,
                FinishReason::Error,
                Some("internal error: could not pause".into()),
                Some(trace),
            );
            return;
        }
        if reason == Reason::Priority {
            req.preemptions += 1;
        }
        let id = req.request_id;
        trace.paused.push(id);
        ::metrics::counter!(names::PREEMPTIONS, "reason" => reason.as_str()).increment(1);
        self.paused.insert(id, state);
        if let Err(err) = self.queue.try_put(req) {
            let message = err.to_string();
            if let Some(mut req) = err.into_inner() {
                self.finish_request(&mut req, FinishReason::Error, Some(message), Some(trace));
            }
        }
    }

    /// Gives up a request's cache: a running one leaves the batch and is
    /// re-queued, a paused one stays queued; either resumes later by
    /// recomputing its prompt and generated tokens.
    pub(super) fn drop_cache(&mut self, victim: Victim, reason: Reason, trace: &mut StepTrace) {
        match victim {
            Victim::Active(i) => self.preempt(i, reason, trace),
            Victim::Paused(id) => {
                let now = self.clock.now();
                // Forgotten first, so that a request missing from the queue
                // can never be picked again.
                self.paused.remove(&id);
                let Some(mut req) = self.queue.remove(id) else {
                    return;
                };
                self.blocks.release(&mut req.block_table);
                self.backend.release(id);
                self.back_to_waiting(req, reason, now, trace);
            }
        }
    }

    /// The least urgent holder of KV blocks that is not in this step's plan
    /// (running or paused), preferring those still under the preemption
    /// limit: it gives up its cache when a decode needs a block.
    pub(super) fn pick_victim(&self, planned: &[bool], now: Instant) -> Option<Victim> {
        let limit = self.config.max_preemptions;
        let running = (0..self.active.len())
            .filter(|&i| !planned[i] && !self.active[i].gone)
            .map(|i| {
                let spent = self.active[i].req.preemptions >= limit;
                (spent, self.rank_active(i, now), Victim::Active(i))
            });
        let paused = self
            .paused
            .iter()
            .map(|(&id, p)| (false, self.rank_paused(id, p, now), Victim::Paused(id)));
        // Not spent before spent, then least urgent first.
        running
            .chain(paused)
            .max_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)))
            .map(|(_, _, victim)| victim)
    }

    /// Frees a running request's blocks, releases it in the backend and puts
    /// it back in the queue with its original enqueue time and its tokens,
    /// to be recomputed later.
    pub(super) fn preempt(&mut self, i: usize, reason: Reason, trace: &mut StepTrace) {
        let now = self.clock.now();
        if self.active[i].gone {
            return;
        }
        // What it wrote stays findable, so its recomputation (and anyone
        // else with the same start) may skip it.
        self.register_written(i);
        let Some(mut req) = self.take_active(i) else {
            return;
        };
        self.blocks.release(&mut req.block_table);
        self.backend.release(req.request_id);
        if reason != Reason::Retry {
            req.preemptions += 1;
        }
        self.back_to_waiting(req, reason, now, trace);
    }

    /// Puts a request whose cache is gone back in the queue (both
    /// PREFILLING, RUNNING and PAUSED may go back to WAITING), counted as
    /// preempted for `reason`.
    fn back_to_waiting(
        &mut self,
        mut req: BatchRequest,
        reason: Reason,
        now: Instant,
        trace: &mut StepTrace,
    ) {
        trace.preempted.push(req.request_id);
        ::metrics::counter!(names::PREEMPTIONS, "reason" => reason.as_str()).increment(1);
        if req.set_status(RequestStatus::Waiting, now).is_err() {
            self.finish_request(
                &mut req,
                FinishReason::Error,
                Some("internal error: could not preempt".into()),
                Some(trace),
            );
            return;
        }
        self.requeue(req, trace);
    }

    /// Takes active request `i` out of its slot, leaving an inert stand-in
    /// (the slot is dropped at the end of the step); `None` if it already
    /// left.
    pub(super) fn take_active(&mut self, i: usize) -> Option<BatchRequest> {
        if self.active[i].gone {
            return None;
        }
        let stand_in = placeholder(self.clock.now())?;
        let a = &mut self.active[i];
        a.gone = true;
        Some(std::mem::replace(&mut a.req, stand_in))
    }

    fn requeue(&mut self, req: BatchRequest, trace: &mut StepTrace) {
        if let Err(err) = self.queue.try_put(req) {
            let message = err.to_string();
            if let Some(mut req) = err.into_inner() {
                self.finish_request(&mut req, FinishReason::Error, Some(message), Some(trace));
            }
        }
    }
}

/// The requests that give way to one head.
struct Choice {
    /// Paused for the head's batch slot.
    pause: Option<usize>,
    /// Caches dropped for the head's KV blocks.
    drop: Vec<Victim>,
}
