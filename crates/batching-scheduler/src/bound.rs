//! The longest a request can wait, as a formula the tests check.
//!
//! A request `R` of base priority `b` (HIGH 0, NORMAL 1, LOW 2) that was
//! first queued at `e` ranks by the fixed key `b + r * e` (`r` the aging
//! rate), and so does everyone else. Two facts bound its wait, counting
//! both the time it is queued and the time it is paused:
//!
//! 1. **Aging.** A request that arrives more than `b / r` seconds after `R`
//!    has a key above `R`'s whatever its class, so from `e + b / r` on no
//!    newcomer outranks `R`: it is never admitted before `R`, never
//!    pauses `R`, and never takes blocks from it. Only the `N` requests
//!    that outrank `R` at all (all of which arrived before that instant)
//!    and at most `B` (`max_batch_size`) requests already running behind
//!    it can hold the batch.
//! 2. **Progress.** Admission is strictly in rank order and every request
//!    in a step's plan advances by at least one token (a step's budget
//!    `max_batch_tokens >= max_batch_size` always leaves a decode or a
//!    chunk room), so each step in which `R` waits consumes at least one
//!    token of the work of those `N + B` requests, each of which needs at
//!    most `L + M` tokens (its prompt and its `max_tokens`).
//!
//! Hence, while KV memory does not run short:
//!
//! ```text
//! wait(R) <= b / r  +  ((N + B) * (L + M) + 1) * longest_step
//! ```
//!
//! (the `+ 1` is the step under way when `R` arrives). The preemption limit
//! `P` (`max_preemptions`) does not lengthen the wait, since `R` is paused
//! only by requests the formula already counts; it bounds how often `R`'s
//! stream stalls: at most `P` pauses for urgency, after which `R` stays in
//! the batch unless memory runs out. When memory does run short, each cache
//! dropped adds one recomputation of that request's context to the work.
//! With `r = 0` there is no bound: a steady stream of more urgent work
//! starves `R`, which is exactly what aging prevents.

use std::time::Duration;

use batching_types::Priority;

use crate::SchedulerConfig;

/// What a request's wait bound depends on besides the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitBoundInputs {
    /// The request's base priority.
    pub priority: Priority,
    /// How many requests outrank it in the aging order (`N`).
    pub outranking: usize,
    /// The longest prompt of any request involved (`L`), in tokens.
    pub max_prompt_tokens: usize,
    /// The largest `max_tokens` of any request involved (`M`).
    pub max_tokens: usize,
}

/// A wait bound: a fixed aging time plus a number of steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitBound {
    /// `b / r`: how long newer, more urgent work may still overtake.
    pub aging: Duration,
    /// `(N + B) * (L + M) + 1`: steps of work that may run before it.
    pub steps: u64,
}

impl WaitBound {
    /// The bound in time, given the longest step.
    pub fn with_longest_step(&self, longest_step: Duration) -> Duration {
        let steps = u32::try_from(self.steps).unwrap_or(u32::MAX);
        self.aging
            .saturating_add(longest_step.saturating_mul(steps))
    }
}

impl SchedulerConfig {
    /// The longest time a request can wait, queued plus paused (see the
    /// [module documentation](crate::bound) for the derivation); `None`
    /// when `aging_rate` is 0, where no bound exists.
    pub fn wait_bound(&self, inputs: &WaitBoundInputs) -> Option<WaitBound> {
        if self.aging_rate <= 0.0 || !self.aging_rate.is_finite() {
            return None;
        }
        let aging =
            Duration::try_from_secs_f64(f64::from(inputs.priority.value()) / self.aging_rate)
                .ok()?;
        let holders = (inputs.outranking + self.max_batch_size) as u64;
        let work = (inputs.max_prompt_tokens + inputs.max_tokens) as u64;
        Some(WaitBound {
            aging,
            steps: holders.saturating_mul(work).saturating_add(1),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_bound_follows_the_formula() {
        let config = SchedulerConfig {
            max_batch_size: 4,
            aging_rate: 0.5,
            ..SchedulerConfig::default()
        };
        let inputs = WaitBoundInputs {
            priority: Priority::Low,
            outranking: 6,
            max_prompt_tokens: 10,
            max_tokens: 5,
        };
        let bound = config.wait_bound(&inputs).unwrap();
        assert_eq!(bound.aging, Duration::from_secs(4));
        assert_eq!(bound.steps, (6 + 4) * 15 + 1);
        assert_eq!(
            bound.with_longest_step(Duration::from_millis(10)),
            Duration::from_secs(4) + Duration::from_millis(1510)
        );
        let high = WaitBoundInputs {
            priority: Priority::High,
            ..inputs
        };
        assert_eq!(config.wait_bound(&high).unwrap().aging, Duration::ZERO);
        let no_aging = SchedulerConfig {
            aging_rate: 0.0,
            ..config
        };
        assert_eq!(no_aging.wait_bound(&inputs), None);
    }
}
