//! Helpers shared by the scheduler's integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use batching_scheduler::{Scheduler, SchedulerConfig};
use batching_types::{
    EventReceiver, FinishReason, ManualClock, NewRequest, OutputEvent, Priority, RequestId,
    SamplingParams,
};
use sim_backend::{SimBackend, SimConfig, TimeMode};

pub type SimEngine = Scheduler<SimBackend, ManualClock>;

/// A sim backend on virtual time: each step advances `clock` by its cost
/// (10 ms per step, 1 ms per decode token, 0.1 ms per prompt token).
pub fn sim_config(clock: &ManualClock, kv_tokens: usize) -> SimConfig {
    SimConfig {
        step_cost: Duration::from_millis(10),
        prefill_token_cost: Duration::from_micros(100),
        decode_token_cost: Duration::from_millis(1),
        kv_tokens,
        max_context: 4096,
        vocab: 1000,
        stop: None,
        time: TimeMode::Advance(clock.clone()),
    }
}

pub fn engine(config: SchedulerConfig, kv_tokens: usize) -> (SimEngine, ManualClock) {
    let clock = ManualClock::new();
    let backend = SimBackend::new(sim_config(&clock, kv_tokens)).unwrap();
    (
        Scheduler::new(config, backend, clock.clone()).unwrap(),
        clock,
    )
}

pub fn request(prompt_len: usize, max_tokens: usize, priority: Priority) -> NewRequest {
    NewRequest {
        request_id: 0,
        name: None,
        model_id: "sim".into(),
        prompt_tokens: (1..=prompt_len as u32).collect(),
        max_tokens,
        priority,
        sampling: SamplingParams::default(),
        deadline: None,
    }
}

/// Everything received so far on a stream.
pub fn drain(rx: &mut EventReceiver) -> Vec<OutputEvent> {
    let mut out = vec![];
    while let Ok(event) = rx.try_recv() {
        out.push(event);
    }
    out
}

/// Tokens and the finish reason, checking indices run 0, 1, 2, ... and that
/// exactly one finish event ends the stream.
pub fn tokens_and_finish(events: &[OutputEvent]) -> (Vec<u32>, FinishReason) {
    let mut tokens = vec![];
    let mut finish = None;
    for event in events {
        assert!(
            finish.is_none(),
            "an event after the finish event: {events:?}"
        );
        match event {
            OutputEvent::Token { token, index, .. } => {
                assert_eq!(*index, tokens.len(), "gap or duplicate in {events:?}");
                tokens.push(*token);
            }
            OutputEvent::Finished { reason, usage, .. } => {
                assert_eq!(usage.completion_tokens, tokens.len());
                finish = Some(*reason);
            }
        }
    }
    (tokens, finish.expect("no finish event"))
}

/// Runs steps until the engine is idle and returns one trace line per step.
pub fn run_to_idle(engine: &mut SimEngine, max_steps: usize) -> Vec<String> {
    let mut lines = vec![];
    while engine.has_work() {
        assert!(
            lines.len() < max_steps,
            "no progress after {max_steps} steps"
        );
        lines.push(engine.step().to_string());
    }
    lines
}

pub fn ids(ids: &[RequestId]) -> Vec<u64> {
    ids.iter().map(|id| id.seq()).collect()
}
