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
    assert!(preempted.contains(&low_id.seq()), "LOW is the victim");
    assert!(!preempted.contains(&high_id.seq()));
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
    assert_eq!(e.status().kv_blocks_used, 0);
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
    assert_eq!(e.status().kv_blocks_used, 0);
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
            ..request(2, 2, Priority::Normal)
        })
        .unwrap();
    // The batch of one is busy with a request of the same priority, which
    // the newcomer does not outrank, so it waits until its deadline.
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
    let health = e.status();
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
    assert_eq!(e.status().step_failures, 2);
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
    let mut e = batching_scheduler::Scheduler::new(config, backend, clock).unwrap();
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

#[test]
fn a_high_request_overtakes_a_full_batch_and_the_paused_request_resumes_without_gaps() {
    // Two LOW requests fill a batch of two; HIGH arrives while they decode.
    let (mut e, _clock) = engine(small(2, 16, 4), 256);
    let (_, mut rx1) = e.submit(request(4, 8, Priority::Low)).unwrap();
    let (low2, mut rx2) = e.submit(request(6, 10, Priority::Low)).unwrap();
    let mut lines = vec![e.step().to_string(), e.step().to_string()];
    let (high, mut rxh) = e.submit(request(3, 3, Priority::High)).unwrap();
    let overtaking = e.step();
    // Within one step HIGH is in the batch, in place of the newest LOW.
    assert_eq!(ids(&overtaking.admitted), vec![high.seq()]);
    assert_eq!(ids(&overtaking.paused), vec![low2.seq()]);
    lines.push(overtaking.to_string());
    lines.extend(run_to_idle(&mut e, 60));
    insta::assert_snapshot!(lines.join("\n"));
    for (rx, prompt, n) in [(&mut rx1, 4, 8), (&mut rx2, 6, 10), (&mut rxh, 3, 3)] {
        let prompt: Vec<u32> = (1..=prompt).collect();
        assert_eq!(
            tokens_and_finish(&drain(rx)),
            (
                expected_tokens(&prompt, None, n, 1000, None),
                FinishReason::Length
            )
        );
    }
    // Paused, not recomputed: every request was added once and its prompt
    // fed once.
    let stats = e.backend().control().stats();
    assert_eq!(stats.added, 3);
    assert_eq!(stats.prefill_tokens, 4 + 6 + 3);
    assert_eq!(e.status().kv_blocks_used, 0);
}

#[test]
fn a_request_aged_past_high_is_not_preempted_and_the_limit_makes_one_unpreemptible() {
    // Aging 1/s: a LOW request queued more than 2 s ago outranks any new
    // HIGH one, so HIGH waits for its slot.
    let config = SchedulerConfig {
        aging_rate: 1.0,
        ..small(1, 16, 4)
    };
    let (mut e, clock) = engine(config.clone(), 256);
    let (_, mut low) = e.submit(request(4, 40, Priority::Low)).unwrap();
    e.step();
    clock.advance(Duration::from_millis(2100));
    let (_, mut high) = e.submit(request(2, 2, Priority::High)).unwrap();
    let t = e.step();
    assert!(t.paused.is_empty() && t.admitted.is_empty(), "{t}");
    run_to_idle(&mut e, 100);
    assert_eq!(tokens_and_finish(&drain(&mut low)).0.len(), 40);
    assert_eq!(tokens_and_finish(&drain(&mut high)).0.len(), 2);

    // With a limit of one, the first HIGH pauses the LOW request, and the
    // second, arriving after it resumed, does not.
    let config = SchedulerConfig {
        max_preemptions: 1,
        ..small(1, 16, 4)
    };
    let (mut e, _clock) = engine(config, 256);
    let (low, mut rx) = e.submit(request(4, 30, Priority::Low)).unwrap();
    e.step();
    let (_, mut h1) = e.submit(request(2, 2, Priority::High)).unwrap();
    let mut lines = vec![e.step().to_string()];
    loop {
        let t = e.step();
        lines.push(t.to_string());
        if t.resumed.contains(&low) {
            break;
        }
        assert!(lines.len() < 20, "LOW never resumed");
    }
    let (_, mut h2) = e.submit(request(2, 2, Priority::High)).unwrap();
    let t = e.step();
    assert!(t.paused.is_empty(), "the limit was reached: {t}");
    lines.push(t.to_string());
    lines.extend(run_to_idle(&mut e, 100));
    insta::assert_snapshot!(lines.join("\n"));
    assert_eq!(tokens_and_finish(&drain(&mut rx)).0.len(), 30);
    assert_eq!(tokens_and_finish(&drain(&mut h1)).0.len(), 2);
    assert_eq!(tokens_and_finish(&drain(&mut h2)).0.len(), 2);
}

#[test]
fn without_preemption_high_waits_for_a_free_slot() {
    let config = SchedulerConfig {
        preemption: false,
        ..small(1, 16, 4)
    };
    let (mut e, _clock) = engine(config, 256);
    let (low, _rx) = e.submit(request(4, 5, Priority::Low)).unwrap();
    e.step();
    let (high, _h) = e.submit(request(2, 2, Priority::High)).unwrap();
    let mut admitted_after = None;
    for n in 1..20 {
        let t = e.step();
        assert!(t.paused.is_empty(), "{t}");
        if t.admitted.contains(&high) {
            admitted_after = Some(n);
            assert!(t.finished.is_empty() || t.finished.iter().all(|f| f.0 != low));
            break;
        }
    }
    assert_eq!(admitted_after, Some(5), "after LOW's five tokens");
}

#[test]
fn high_needing_blocks_held_by_low_work_drops_their_caches_which_are_recomputed() {
    // 8 blocks of 4 tokens: two LOW requests of 12 prompt tokens take 6.
    // HIGH needs 4, so one LOW cache is dropped; the batch has a free slot,
    // so nobody is paused.
    let (mut e, _clock) = engine(small(3, 32, 4), 32);
    let (_, mut l1) = e.submit(request(12, 4, Priority::Low)).unwrap();
    let (low2, mut l2) = e.submit(request(12, 4, Priority::Low)).unwrap();
    let mut lines = vec![e.step().to_string()];
    let (_, mut h) = e.submit(request(16, 2, Priority::High)).unwrap();
    let t = e.step();
    assert_eq!(ids(&t.preempted), vec![low2.seq()], "{t}");
    lines.push(t.to_string());
    lines.extend(run_to_idle(&mut e, 60));
    insta::assert_snapshot!(lines.join("\n"));
    for (rx, prompt, n) in [(&mut l1, 12, 4), (&mut l2, 12, 4), (&mut h, 16, 2)] {
        let prompt: Vec<u32> = (1..=prompt).collect();
        assert_eq!(
            tokens_and_finish(&drain(rx)).0,
            expected_tokens(&prompt, None, n, 1000, None)
        );
    }
    assert_eq!(
        e.backend().control().stats().violations,
        Vec::<String>::new()
    );
}

#[test]
fn short_requests_start_beside_a_long_prompt_whose_chunks_are_capped() {
    let config = SchedulerConfig {
        max_prefill_chunk: 8,
        ..small(4, 16, 4)
    };
    let (mut e, _clock) = engine(config, 512);
    let (_, mut long) = e.submit(request(40, 2, Priority::Normal)).unwrap();
    let mut lines = vec![e.step().to_string()];
    let mut shorts = vec![];
    for _ in 0..2 {
        shorts.push(e.submit(request(3, 2, Priority::Normal)).unwrap());
    }
    let t = e.step();
    // Both short prompts start beside the long prompt's next chunk.
    assert_eq!(t.admitted.len(), 2, "{t}");
    lines.push(t.to_string());
    lines.extend(run_to_idle(&mut e, 40));
    insta::assert_snapshot!(lines.join("\n"));
    assert_eq!(tokens_and_finish(&drain(&mut long)).0.len(), 2);
    for (_, rx) in &mut shorts {
        assert_eq!(tokens_and_finish(&drain(rx)).0.len(), 2);
    }
}

#[test]
fn a_shared_prefix_is_computed_once_survives_its_request_and_is_evicted_last() {
    // Blocks of 4; a 12-token "system prompt" is 3 blocks.
    let system: Vec<u32> = (100..112).collect();
    let with = |tail: &[u32]| -> Vec<u32> { system.iter().chain(tail).copied().collect() };
    let ask = |prompt: Vec<u32>| batching_types::NewRequest {
        prompt_tokens: prompt,
        ..request(1, 3, Priority::Normal)
    };
    let run = |prefix_cache: bool| {
        let config = SchedulerConfig {
            prefix_cache,
            ..small(2, 64, 4)
        };
        // 8 blocks: room for two requests and a little cache.
        let (mut e, _clock) = engine(config, 32);
        let mut lines = vec![];
        let mut results = vec![];
        for tail in [[1u32, 2].as_slice(), &[3, 4, 5], &[6], &[]] {
            let (_, mut rx) = e.submit(ask(with(tail))).unwrap();
            lines.extend(run_to_idle(&mut e, 20));
            let events = drain(&mut rx);
            let cached = events.iter().find_map(|ev| match ev {
                batching_types::OutputEvent::Finished { usage, .. } => Some(usage.cached_tokens),
                _ => None,
            });
            results.push((tokens_and_finish(&events).0, cached));
        }
        // Other work fills the pool and evicts the cached blocks.
        let (_, mut other) = e.submit(ask((500..528).collect())).unwrap();
        lines.extend(run_to_idle(&mut e, 20));
        tokens_and_finish(&drain(&mut other));
        let (_, mut again) = e.submit(ask(with(&[1, 2]))).unwrap();
        lines.extend(run_to_idle(&mut e, 20));
        let events = drain(&mut again);
        results.push((tokens_and_finish(&events).0, None));
        assert_eq!(
            e.backend().control().stats().violations,
            Vec::<String>::new()
        );
        (lines, results, e.backend().control().stats().cached_tokens)
    };
    let (lines, cached_run, cached_tokens) = run(true);
    insta::assert_snapshot!(lines.join("\n"));
    let (_, plain_run, plain_tokens) = run(false);
    // The same tokens with and without the cache, each its solo tokens.
    for ((with_cache, _), (without, _)) in cached_run.iter().zip(&plain_run) {
        assert_eq!(with_cache, without);
    }
    assert_eq!(
        cached_run[0].0,
        expected_tokens(&with(&[1, 2]), None, 3, 1000, None)
    );
    // The first request computes the prefix; the next three reuse its 3
    // blocks (the empty tail reuses 2, since its last token must be fed).
    let reported: Vec<_> = cached_run[..4].iter().map(|r| r.1).collect();
    assert_eq!(reported, vec![Some(0), Some(12), Some(12), Some(8)]);
    assert_eq!(plain_tokens, 0);
    assert!(cached_tokens >= 32);
}

#[test]
fn a_request_arriving_mid_prefill_shares_the_blocks_already_written() {
    let config = SchedulerConfig {
        max_prefill_chunk: 8,
        ..small(2, 16, 4)
    };
    let (mut e, _clock) = engine(config, 256);
    let long: Vec<u32> = (1..=40).collect();
    let ask = |prompt: Vec<u32>| batching_types::NewRequest {
        prompt_tokens: prompt,
        ..request(1, 2, Priority::Normal)
    };
    let (_, mut first) = e.submit(ask(long.clone())).unwrap();
    let mut lines = vec![e.step().to_string(), e.step().to_string()];
    // 16 tokens of the long prompt are in the cache now: 4 blocks.
    let mut second_prompt = long[..24].to_vec();
    second_prompt.push(99);
    let (_, mut second) = e.submit(ask(second_prompt.clone())).unwrap();
    lines.extend(run_to_idle(&mut e, 30));
    insta::assert_snapshot!(lines.join("\n"));
    assert_eq!(
        tokens_and_finish(&drain(&mut first)).0,
        expected_tokens(&long, None, 2, 1000, None)
    );
    let events = drain(&mut second);
    let cached = events.iter().find_map(|ev| match ev {
        batching_types::OutputEvent::Finished { usage, .. } => Some(usage.cached_tokens),
        _ => None,
    });
    assert_eq!(cached, Some(16), "the blocks the first had written by then");
    assert_eq!(
        tokens_and_finish(&events).0,
        expected_tokens(&second_prompt, None, 2, 1000, None)
    );
    assert_eq!(
        e.backend().control().stats().violations,
        Vec::<String>::new()
    );
}

#[test]
fn a_paused_request_behind_the_head_gives_up_its_blocks_even_on_a_tie() {
    // P and H arrive at the same instant with the same priority: the queue
    // serves H first once P has been paused and put back, though P is the
    // older request. H then needs blocks that only paused P holds.
    let (mut e, _clock) = engine(small(1, 16, 4), 16);
    let (_, mut p) = e.submit(request(12, 3, Priority::Normal)).unwrap();
    let (_, mut h) = e.submit(request(8, 3, Priority::Normal)).unwrap();
    let mut lines = vec![e.step().to_string()];
    let (_, mut w) = e.submit(request(2, 1, Priority::High)).unwrap();
    lines.extend(run_to_idle(&mut e, 40));
    insta::assert_snapshot!(lines.join("\n"));
    for (rx, prompt, n) in [(&mut p, 12, 3), (&mut h, 8, 3), (&mut w, 2, 1)] {
        let prompt: Vec<u32> = (1..=prompt).collect();
        assert_eq!(
            tokens_and_finish(&drain(rx)),
            (
                expected_tokens(&prompt, None, n, 1000, None),
                FinishReason::Length
            )
        );
    }
    assert_eq!(e.status().kv_blocks_used, 0);
}

#[test]
fn at_shutdown_a_paused_stream_finishes_within_the_grace_and_unstarted_work_is_cancelled() {
    let (mut e, _clock) = engine(small(1, 16, 4), 256);
    let (_, mut low) = e.submit(request(4, 6, Priority::Low)).unwrap();
    e.step();
    e.step();
    let (_, mut high) = e.submit(request(2, 2, Priority::High)).unwrap();
    let (_, mut queued) = e.submit(request(2, 2, Priority::Low)).unwrap();
    assert_eq!(e.step().paused.len(), 1);
    e.begin_shutdown();
    run_to_idle(&mut e, 40);
    assert_eq!(tokens_and_finish(&drain(&mut high)).1, FinishReason::Length);
    let (tokens, reason) = tokens_and_finish(&drain(&mut low));
    assert_eq!(
        (tokens.len(), reason),
        (6, FinishReason::Length),
        "it resumed and finished"
    );
    let events = drain(&mut queued);
    assert!(matches!(
        &events[..],
        [batching_types::OutputEvent::Finished {
            reason: FinishReason::Cancelled,
            message: Some(m),
            ..
        }] if m.contains("before the request started")
    ));
}

/// Stops after a fixed number of delivered tokens, like a stop string that
/// completes with the n-th token.
struct StopAfter(usize);

impl batching_types::StopCondition for StopAfter {
    fn on_token(&mut self, _token: u32) -> bool {
        self.0 = self.0.saturating_sub(1);
        self.0 == 0
    }
}

#[test]
fn a_stop_condition_ends_the_request_as_a_stop_in_the_step_that_matched() {
    let (mut e, _clock) = engine(small(2, 64, 4), 256);
    let mut req = request(4, 10, Priority::Normal);
    req.sampling.stop_condition = Some(batching_types::SharedStopCondition::new(StopAfter(3)));
    let (id, mut rx) = e.submit(req).unwrap();
    let mut steps = 0;
    while e.has_work() {
        let t = e.step();
        steps += 1;
        if steps == 3 {
            assert_eq!(t.finished, vec![(id, FinishReason::Stop)], "{t}");
        }
        assert!(steps <= 3, "a step ran after the match: {t}");
    }
    let (tokens, reason) = tokens_and_finish(&drain(&mut rx));
    assert_eq!((tokens.len(), reason), (3, FinishReason::Stop));
    assert_eq!(e.status().kv_blocks_used, 0);
}

#[test]
fn a_step_out_of_memory_sheds_new_work_retries_smaller_and_loses_nothing() {
    let (mut e, clock) = engine(small(8, 64, 4), 1024);
    let control = e.backend().control();
    // Steps of more than ten tokens do not fit for now.
    control.limit_step_tokens(Some(10));
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|r| (1..=8).map(|t| r * 100 + t).collect())
        .collect();
    let mut rxs = Vec::new();
    for p in &prompts {
        let mut req = request(8, 4, Priority::Normal);
        req.prompt_tokens.clone_from(p);
        rxs.push(e.submit(req).unwrap().1);
    }
    let first = e.step();
    assert!(
        first
            .failure
            .as_deref()
            .unwrap_or("")
            .contains("out of memory"),
        "{first}"
    );
    assert!(
        e.status().shedding,
        "new work is refused while memory is short"
    );
    assert_eq!(
        e.submit(request(2, 1, Priority::High)).unwrap_err(),
        SchedulerError::Shedding
    );
    assert_eq!(
        e.status().consecutive_step_failures,
        0,
        "running short of memory is not a liveness failure"
    );
    // Halving until the steps fit; nobody is failed or dropped.
    let mut steps = 1;
    while e.has_work() && steps < 200 {
        let t = e.step();
        assert!(t.num_tokens() <= 48, "{t}");
        steps += 1;
    }
    for (rx, p) in rxs.iter_mut().zip(&prompts) {
        let (tokens, reason) = tokens_and_finish(&drain(rx));
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(
            tokens,
            expected_tokens(p, None, 4, 1000, None),
            "same tokens as alone"
        );
    }
    // Pressure gone: the cap doubles back and new work is taken again.
    control.limit_step_tokens(None);
    clock.advance(Duration::from_secs(3));
    assert!(!e.status().shedding, "the hold lapses while idle");
    let (_, mut rx) = e.submit(request(4, 30, Priority::Normal)).unwrap();
    let mut largest = 0;
    while e.has_work() {
        largest = largest.max(e.step().num_tokens());
    }
    assert_eq!(tokens_and_finish(&drain(&mut rx)).0.len(), 30);
    assert!(largest >= 4, "the prompt fed in one step again");
}
