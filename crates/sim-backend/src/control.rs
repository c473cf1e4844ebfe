//! A shared handle for injecting faults into, and reading statistics from,
//! a backend that has moved to the engine thread.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use batching_types::RequestId;

/// What the backend has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Steps that ran (including failed ones).
    pub steps: u64,
    /// Steps that failed as a whole.
    pub failed_steps: u64,
    /// Prompt tokens fed in prefill chunks.
    pub prefill_tokens: u64,
    /// Decode tokens fed.
    pub decode_tokens: u64,
    /// Context tokens taken from the prefix cache instead of fed.
    pub cached_tokens: u64,
    /// Sequences added.
    pub added: u64,
    /// Sequences released (known ids only).
    pub released: u64,
    /// The largest number of sequences in one step.
    pub max_batch_size: usize,
    /// The most tokens fed in one step.
    pub max_batch_tokens: usize,
    /// The most KV slots in use at once.
    pub max_kv_in_use: usize,
    /// KV slots in use now.
    pub kv_in_use: usize,
    /// KV blocks owned by live sequences after the last step.
    pub blocks_in_use: usize,
    /// The most KV blocks owned at once.
    pub max_blocks_in_use: usize,
    /// Sequences currently known.
    pub live_sequences: usize,
    /// The summed cost of all steps.
    pub virtual_time: Duration,
    /// Every contract violation seen, in order.
    pub violations: Vec<String>,
}

#[derive(Debug, Default)]
pub(crate) struct ControlState {
    pub(crate) stats: SimStats,
    pub(crate) fail_steps: u32,
    pub(crate) step_token_limit: Option<usize>,
    pub(crate) fail_sequences: HashSet<RequestId>,
    pub(crate) fail_adds: HashSet<RequestId>,
}

/// Cheap to clone; every clone talks to the same backend.
#[derive(Debug, Clone, Default)]
pub struct SimControl {
    state: Arc<Mutex<ControlState>>,
}

impl SimControl {
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut ControlState) -> R) -> R {
        // A poisoned lock only means a test thread panicked; the counters
        // inside are still meaningful.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut state)
    }

    /// Makes the next `n` non-empty steps fail as a whole.
    pub fn fail_next_steps(&self, n: u32) {
        self.with(|s| s.fail_steps = n);
    }

    /// Makes every step that feeds more than `limit` tokens fail with
    /// [`crate::SimError::OutOfMemory`] before it runs (`None` lifts it):
    /// memory pressure, as the real backend reports it.
    pub fn limit_step_tokens(&self, limit: Option<usize>) {
        self.with(|s| s.step_token_limit = limit);
    }

    /// Makes the next step that names `id` report
    /// [`batching_types::SequenceOutcome::Failed`] for it (once).
    pub fn fail_sequence(&self, id: RequestId) {
        self.with(|s| s.fail_sequences.insert(id));
    }

    /// Makes the next `add_sequence` for `id` fail (once).
    pub fn fail_add(&self, id: RequestId) {
        self.with(|s| s.fail_adds.insert(id));
    }

    /// A copy of the statistics.
    pub fn stats(&self) -> SimStats {
        self.with(|s| s.stats.clone())
    }
}
