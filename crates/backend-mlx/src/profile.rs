//! Where one step's time goes, stage by stage.
//!
//! MLX evaluates lazily: the host builds a step's graph, and the work runs
//! only when the graph is evaluated, so timing the calls that build it says
//! nothing about the work itself. A profiled step therefore evaluates after
//! each stage of the forward pass (a barrier) and charges the time to that
//! stage's kind, and the time spent building each stage's graph to
//! [`Stage::Graph`]. Barriers cost a host sync each and keep MLX from
//! overlapping graph building with execution, so a profiled step is a
//! little slower than a plain one; `cargo bench -p backend-mlx --bench
//! generate -- --profile` prints both. When profiling is off (always, in
//! the server) a mark is one branch.

use std::time::{Duration, Instant};

use mlx_rs::Array;

/// A kind of work inside a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Host work before the graph: turning the plan into positions, slots,
    /// block lists and masks, and uploading them.
    Plan,
    /// Host work building the MLX graph of each stage.
    Graph,
    /// The token embedding lookup.
    Embed,
    /// RMS norms.
    Norm,
    /// The per-layer projections: q/k/v, output, gate/up and down.
    Projection,
    /// Rotary position embedding of queries and keys.
    Rope,
    /// Growing the block pool (rare: a sixteenth of the budget at a time).
    KvGrow,
    /// Writing the step's keys and values into the block pool.
    KvWrite,
    /// Reading each sequence's keys and values out of the pool.
    KvGather,
    /// Attention itself: scores, softmax, weighted sum.
    Attention,
    /// Residual adds and the gated activation.
    Elementwise,
    /// The output projection to the vocabulary.
    LmHead,
    /// Choosing tokens (on the device or the host) and reading them back.
    Sample,
}

impl Stage {
    /// Every stage, in report order.
    pub const ALL: [Stage; 13] = [
        Stage::Plan,
        Stage::Graph,
        Stage::Embed,
        Stage::Norm,
        Stage::Projection,
        Stage::Rope,
        Stage::KvGrow,
        Stage::KvWrite,
        Stage::KvGather,
        Stage::Attention,
        Stage::Elementwise,
        Stage::LmHead,
        Stage::Sample,
    ];

    /// A short lower-case name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Plan => "plan+upload",
            Stage::Graph => "graph build",
            Stage::Embed => "embedding",
            Stage::Norm => "rms norm",
            Stage::Projection => "projections",
            Stage::Rope => "rope",
            Stage::KvGrow => "kv pool growth",
            Stage::KvWrite => "kv write",
            Stage::KvGather => "kv gather",
            Stage::Attention => "attention",
            Stage::Elementwise => "elementwise",
            Stage::LmHead => "lm head",
            Stage::Sample => "sample+download",
        }
    }

    /// True for the stages that are matrix multiplications by weights.
    pub fn is_matmul(self) -> bool {
        matches!(self, Stage::Projection | Stage::LmHead)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Time per stage, summed over the profiled steps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepProfile {
    times: [Duration; Stage::ALL.len()],
    /// Steps summed.
    pub steps: u32,
}

impl StepProfile {
    /// Total time charged to `stage`.
    pub fn time(&self, stage: Stage) -> Duration {
        self.times[stage.index()]
    }

    /// Everything charged, over every stage.
    pub fn total(&self) -> Duration {
        self.times.iter().sum()
    }

    /// Time in the weight matmuls ([`Stage::is_matmul`]).
    pub fn matmul(&self) -> Duration {
        Stage::ALL
            .iter()
            .filter(|s| s.is_matmul())
            .map(|&s| self.time(s))
            .sum()
    }

    fn add(&mut self, stage: Stage, d: Duration) {
        self.times[stage.index()] += d;
    }
}

/// Collects a [`StepProfile`] when enabled; does nothing otherwise.
#[derive(Debug, Default)]
pub(crate) struct Profiler {
    /// Where the last mark ended, while a step is being profiled.
    last: Option<Instant>,
    enabled: bool,
    profile: StepProfile,
}

impl Profiler {
    pub(crate) fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        self.last = None;
    }

    /// Starts timing a step.
    pub(crate) fn begin(&mut self) {
        if self.enabled {
            self.last = Some(Instant::now());
        }
    }

    /// Charges the time since the last mark to `stage` without evaluating
    /// anything: host work.
    pub(crate) fn host(&mut self, stage: Stage) {
        if let Some(last) = self.last.as_mut() {
            let now = Instant::now();
            self.profile.add(stage, now - *last);
            *last = now;
        }
    }

    /// Ends a stage: the time since the last mark is graph building, and
    /// evaluating `arrays` is the stage's work.
    pub(crate) fn mark(&mut self, stage: Stage, arrays: &[&Array]) -> mlx_rs::error::Result<()> {
        if self.last.is_none() {
            return Ok(());
        }
        self.host(Stage::Graph);
        mlx_rs::transforms::eval(arrays.iter().copied())?;
        self.host(stage);
        Ok(())
    }

    /// Ends a step.
    pub(crate) fn end(&mut self) {
        if self.last.take().is_some() {
            self.profile.steps += 1;
        }
    }

    /// The profile so far, and a fresh start.
    pub(crate) fn take(&mut self) -> StepProfile {
        std::mem::take(&mut self.profile)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_disabled_profiler_records_nothing() {
        let mut p = Profiler::default();
        p.begin();
        p.host(Stage::Plan);
        p.mark(Stage::Norm, &[]).unwrap();
        p.end();
        assert_eq!(p.take(), StepProfile::default());
    }

    #[test]
    fn marks_charge_their_stage_and_steps_are_counted() {
        let mut p = Profiler::default();
        p.set_enabled(true);
        p.begin();
        std::thread::sleep(Duration::from_millis(2));
        p.host(Stage::Plan);
        let a = mlx_rs::Array::from_slice(&[1.0f32, 2.0], &[2]);
        p.mark(Stage::Norm, &[&a]).unwrap();
        p.end();
        let profile = p.take();
        assert_eq!(profile.steps, 1);
        assert!(profile.time(Stage::Plan) >= Duration::from_millis(2));
        assert_eq!(profile.time(Stage::Projection), Duration::ZERO);
        assert_eq!(profile.matmul(), Duration::ZERO);
        assert!(profile.total() >= profile.time(Stage::Plan));
    }
}
