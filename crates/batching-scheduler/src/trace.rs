//! What one engine step did, in a form tests can snapshot.

use std::fmt;

use batching_types::{FinishReason, RequestId, StepItem, WorkKind};

/// A record of one step: the plan, who entered and left the batch, and the
/// KV blocks afterwards.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepTrace {
    /// The step's number, counting every call of [`crate::Scheduler::step`].
    pub step: u64,
    /// The plan given to the backend, in order (empty when idle).
    pub items: Vec<StepItem>,
    /// Requests taken from the queue into the batch in this step.
    pub admitted: Vec<RequestId>,
    /// Requests whose cache was dropped (for lack of KV blocks, or after a
    /// failed step); they resume by recomputation.
    pub preempted: Vec<RequestId>,
    /// Requests taken out of the batch for a more urgent one, keeping
    /// their cache.
    pub paused: Vec<RequestId>,
    /// Paused requests that came back into the batch in this step.
    pub resumed: Vec<RequestId>,
    /// Requests that ended in this step, with why.
    pub finished: Vec<(RequestId, FinishReason)>,
    /// Tokens delivered in this step, in plan order.
    pub tokens: Vec<(RequestId, u32)>,
    /// The backend's error when the whole step failed.
    pub failure: Option<String>,
    /// KV blocks assigned after the step.
    pub blocks_used: usize,
    /// KV blocks free after the step.
    pub blocks_free: usize,
    /// Requests holding KV blocks after the step.
    pub running: usize,
    /// Requests in the queue after the step, paused ones not counted.
    pub waiting: usize,
    /// Paused requests after the step.
    pub paused_now: usize,
}

impl StepTrace {
    /// Tokens the plan fed through the model.
    pub fn num_tokens(&self) -> usize {
        self.items.iter().map(|i| i.kind.tokens()).sum()
    }
}

fn ids(f: &mut fmt::Formatter<'_>, label: &str, ids: &[RequestId]) -> fmt::Result {
    if ids.is_empty() {
        return Ok(());
    }
    write!(f, " {label}[")?;
    for (i, id) in ids.iter().enumerate() {
        let sep = if i == 0 { "" } else { " " };
        write!(f, "{sep}{}", id.seq())?;
    }
    f.write_str("]")
}

/// One line per step, for snapshots: `#3 plan[1:D 2:P16] admit[2]
/// pause[4] done[1:length] kv 5/11 run 2 wait 1 paused 1`.
impl fmt::Display for StepTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} plan[", self.step)?;
        for (i, item) in self.items.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            match item.kind {
                WorkKind::Decode => write!(f, "{sep}{}:D", item.id.seq())?,
                WorkKind::Prefill { len } => write!(f, "{sep}{}:P{len}", item.id.seq())?,
            }
        }
        f.write_str("]")?;
        ids(f, "admit", &self.admitted)?;
        ids(f, "pause", &self.paused)?;
        ids(f, "resume", &self.resumed)?;
        ids(f, "preempt", &self.preempted)?;
        if !self.finished.is_empty() {
            f.write_str(" done[")?;
            for (i, (id, reason)) in self.finished.iter().enumerate() {
                let sep = if i == 0 { "" } else { " " };
                write!(f, "{sep}{}:{reason}", id.seq())?;
            }
            f.write_str("]")?;
        }
        if let Some(failure) = &self.failure {
            write!(f, " FAILED({failure})")?;
        }
        write!(
            f,
            " kv {}/{} run {} wait {}",
            self.blocks_used,
            self.blocks_used + self.blocks_free,
            self.running,
            self.waiting
        )?;
        if self.paused_now > 0 {
            write!(f, " paused {}", self.paused_now)?;
        }
        Ok(())
    }
}
