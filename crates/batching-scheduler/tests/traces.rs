//! Step traces of typical scenarios, as insta snapshots.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use batching_scheduler::{SchedulerConfig, SchedulerError};
use batching_types::{Clock, FinishReason, Priority, SamplingParams};
use common::*;
use sim_backend::tokens::expected_tokens;

fn small(max_batch_size: usize, max_batch_tokens: usize, block_size: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_batch_size,
        max_batch_tokens,
        block_size,
        ..SchedulerConfig::default()
    }
}

#[test]
fn mixed_priorities_are_admitted_high_first_and_fifo_within_a_level() {
    let (mut e, _clock) = engine(small(2, 64, 4), 256);
    let mut rxs = vec![];
    for p in [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::High,
    ] {
        rxs.push(e.submit(request(4, 2, p)).unwrap().1);
    }
    let trace = run_to_idle(&mut e, 50);
    insta::assert_snapshot!(trace.join("\n"));
    for rx in &mut rxs {
        let (tokens, reason) = tokens_and_finish(&drain(rx));
        assert_eq!((tokens.len(), reason), (2, FinishReason::Length));
    }
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_while_decodes_continue() {
    let (mut e, _clock) = engine(small(4, 8, 4), 256);
    let (_, mut short) = e.submit(request(2, 6, Priority::Normal)).unwrap();
    e.step();
    let (_, mut long) = e.submit(request(20, 2, Priority::Normal)).unwrap();
    let mut lines = vec![];
    while e.has_work() {
        let t = e.step();
        assert!(t.num_tokens() <= 8, "{t}");
        lines.push(t.to_string());
    }
    insta::assert_snapshot!(lines.join("\n"));
    assert_eq!(tokens_and_finish(&drain(&mut short)).0.len(), 6);
    assert_eq!(
        tokens_and_finish(&drain(&mut long)).0,
        expected_tokens(&(1..=20).collect::<Vec<_>>(), None, 2, 1000, None)
    );
}

#[test]
fn running_out_of_blocks_preempts_the_least_urgent_which_resumes_without_gaps() {
    // 6 blocks of 4 tokens. Two requests of prompt 8 take 2 blocks each and
    // grow by one block every 4 tokens, so they collide.
    let (mut e, _clock) = engine(small(4, 32, 4), 24);
    let (low_id, mut low) = e.submit(request(8, 12, Priority::Low)).unwrap();
    let (high_id, mut high) = e.submit(request(8, 12, Priority::High)).unwrap();
    let mut lines = vec![];
    let mut preempted = vec![];
    while e.has_work() {
        let t = e.step();
        assert!(t.blocks_used <= 6);
        preempted.extend(ids(&t.preempted));
        lines.push(t.to_string());
    }
    insta::assert_snapshot!(lines.join("\n"));
    assert!(preempted.contains(&low_id.0), "LOW is the victim");
    assert!(!preempted.contains(&high_id.0));
    let prompt: Vec<u32> = (1..=8).collect();
    let alone = expected_tokens(&prompt, None, 12, 1000, None);
    assert_eq!(
        tokens_and_finish(&drain(&mut low)),
        (alone.clone(), FinishReason::Length)
    );
    assert_eq!(
        tokens_and_finish(&drain(&mut high)),
        (alone, FinishReason::Length)
    );
    assert_eq!(e.health().kv_blocks_used, 0);
    assert_eq!(
        e.backend().control().stats().violations,
        Vec::<String>::new()
    );
}

#[test]
fn a_dropped_client_is_cancelled_within_one_step_in_prefill_and_in_decode() {
    let (mut e, _clock) = engine(small(4, 8, 4), 256);
    let (_, decoding) = e.submit(request(2, 50, Priority::Normal)).unwrap();
    let (_, prefilling) = e.submit(request(30, 5, Priority::Normal)).unwrap();
    let (_, mut other) = e.submit(request(2, 3, Priority::Normal)).unwrap();
    let mut lines = vec![e.step().to_string(), e.step().to_string()];
    drop(prefilling);
    lines.push(e.step().to_string());
    lines.push(e.step().to_string());
    drop(decoding);
    lines.extend(run_to_idle(&mut e, 20));
    insta::assert_snapshot!(lines.join("\n"));
    assert_eq!(
        tokens_and_finish(&drain(&mut other)).1,
        FinishReason::Length
    );
    assert_eq!(e.health().kv_blocks_used, 0);
    assert_eq!(e.backend().control().stats().live_sequences, 0);
}

#[test]
fn a_full_queue_refuses_at_once_and_frees_its_place_on_admission() {
    let config = SchedulerConfig {
        max_queue: Some(2),
        ..small(1, 16, 4)
    };
    let (mut e, _clock) = engine(config, 256);
    let _a = e.submit(request(2, 2, Priority::Normal)).unwrap();
    let _b = e.submit(request(2, 2, Priority::Normal)).unwrap();
    let err = e.submit(request(2, 2, Priority::Normal)).unwrap_err();
    assert_eq!(err, SchedulerError::QueueFull { capacity: 2 });
    insta::assert_snapshot!(err.to_string(), @"queue full: 2 requests are already waiting");
    e.step();
    assert!(
        e.submit(request(2, 2, Priority::Normal)).is_ok(),
        "admission frees a place"
    );
}

#[test]
fn a_request_waiting_past_its_deadline_times_out() {
    let (mut e, clock) = engine(small(1, 16, 4), 256);
    let (_, mut busy) = e.submit(request(2, 20, Priority::Normal)).unwrap();
    let mut lines = vec![e.step().to_string()];
    let deadline = clock.now() + Duration::from_millis(50);
    let (_, mut late) = e
        .submit(batching_types::NewRequest {
            deadline: Some(deadline),
            ..request(2, 2, Priority::High)
        })
        .unwrap();
    // The batch of one is busy; HIGH waits behind the running request.
    lines.extend(run_to_idle(&mut e, 40));
    insta::assert_snapshot!(lines.join("\n"));
    let events = drain(&mut late);
    assert!(matches!(
        &events[..],
        [batching_types::OutputEvent::Finished {
            reason: FinishReason::Timeout,
            message: Some(_),
            ..
        }]
    ));
    assert_eq!(tokens_and_finish(&drain(&mut busy)).1, FinishReason::Length);
}

#[test]
fn stop_tokens_failed_sequences_and_failed_steps_end_requests_correctly() {
    let (mut e, _clock) = engine(small(4, 64, 4), 256);
    let prompt: Vec<u32> = (1..=3).collect();
    let first = expected_tokens(&prompt, None, 3, 1000, None);
    let stopper = batching_types::NewRequest {
        sampling: SamplingParams {
            stop_token_ids: vec![first[1]],
            ..SamplingParams::default()
        },
        ..request(3, 10, Priority::Normal)
    };
    let (_, mut stop) = e.submit(stopper).unwrap();
    let (fail_id, mut fail) = e.submit(request(3, 10, Priority::Normal)).unwrap();
    let (_, mut survivor) = e.submit(request(3, 4, Priority::Normal)).unwrap();
    let control = e.backend().control();
    let mut lines = vec![e.step().to_string()];
    control.fail_sequence(fail_id);
    lines.push(e.step().to_string());
    control.fail_next_steps(1);
    lines.extend(run_to_idle(&mut e, 20));
    insta::assert_snapshot!(lines.join("\n"));
    assert_eq!(
        tokens_and_finish(&drain(&mut stop)),
        (first[..2].to_vec(), FinishReason::Stop)
    );
    assert_eq!(tokens_and_finish(&drain(&mut fail)).1, FinishReason::Error);
    let (tokens, reason) = tokens_and_finish(&drain(&mut survivor));
    assert_eq!(
        (tokens, reason),
        (
            first
                .iter()
                .chain(&expected_tokens(&prompt, None, 4, 1000, None)[3..])
                .copied()
                .collect(),
            FinishReason::Length
        )
    );
    let health = e.health();
    assert_eq!(
        (health.step_failures, health.consecutive_step_failures),
        (1, 0)
    );
}

#[test]
fn repeated_step_failures_end_requests_with_an_error_and_the_engine_recovers() {
    let (mut e, _clock) = engine(small(4, 64, 4), 256);
    let (_, mut doomed) = e.submit(request(3, 4, Priority::Normal)).unwrap();
    e.backend().control().fail_next_steps(2);
    let lines = run_to_idle(&mut e, 10);
    insta::assert_snapshot!(lines.join("\n"));
    let events = drain(&mut doomed);
    assert_eq!(tokens_and_finish(&events).1, FinishReason::Error);
    let (_, mut fine) = e.submit(request(3, 2, Priority::Normal)).unwrap();
    run_to_idle(&mut e, 10);
    assert_eq!(tokens_and_finish(&drain(&mut fine)).1, FinishReason::Length);
    assert_eq!(e.health().step_failures, 2);
}

#[test]
fn requests_that_can_never_fit_are_refused_at_submit() {
    let (mut e, _clock) = engine(small(4, 64, 16), 64);
    let too_big = e.submit(request(40, 40, Priority::Normal)).unwrap_err();
    assert_eq!(
        too_big,
        SchedulerError::RequestTooLarge {
            needed: 80,
            capacity: 64
        }
    );
    assert!(
        e.submit(request(40, 25, Priority::Normal)).is_ok(),
        "64 fits exactly"
    );
    assert!(matches!(
        e.submit(request(4096, 1, Priority::Normal)),
        Err(SchedulerError::PromptTooLong { .. })
    ));
    assert!(matches!(
        e.submit(request(4000, 100, Priority::Normal)),
        Err(SchedulerError::ContextTooLong { .. })
    ));
    assert!(matches!(
        e.submit(request(0, 1, Priority::Normal)),
        Err(SchedulerError::InvalidRequest(_))
    ));
}

#[test]
fn truncation_ends_at_the_context_length() {
    let clock = batching_types::ManualClock::new();
    let backend = sim_backend::SimBackend::new(sim_backend::SimConfig {
        max_context: 10,
        ..sim_config(&clock, 256)
    })
    .unwrap();
    let config = SchedulerConfig {
        context_overflow: batching_scheduler::ContextOverflow::Truncate,
        ..small(4, 64, 4)
    };
    let mut e = batching_scheduler::Engine::new(config, backend, clock).unwrap();
    let (_, mut rx) = e.submit(request(6, 100, Priority::Normal)).unwrap();
    run_to_idle(&mut e, 20);
    let (tokens, reason) = tokens_and_finish(&drain(&mut rx));
    assert_eq!((tokens.len(), reason), (4, FinishReason::ContextLength));
}

#[test]
fn shutdown_cancels_waiting_requests_and_running_ones_after_the_grace_period() {
    let config = SchedulerConfig {
        shutdown_grace: Duration::from_millis(30),
        ..small(1, 16, 4)
    };
    let (mut e, _clock) = engine(config, 256);
    let (_, mut running) = e.submit(request(2, 100, Priority::Normal)).unwrap();
    let (_, mut waiting) = e.submit(request(2, 2, Priority::Normal)).unwrap();
    e.step();
    e.begin_shutdown();
    assert_eq!(
        e.submit(request(2, 2, Priority::Normal)).unwrap_err(),
        SchedulerError::ShuttingDown
    );
    let lines = run_to_idle(&mut e, 20);
    insta::assert_snapshot!(lines.join("\n"));
    assert_eq!(
        tokens_and_finish(&drain(&mut waiting)),
        (vec![], FinishReason::Cancelled)
    );
    let (tokens, reason) = tokens_and_finish(&drain(&mut running));
    assert_eq!(reason, FinishReason::Cancelled);
    assert!(tokens.len() > 1 && tokens.len() < 100);
}
