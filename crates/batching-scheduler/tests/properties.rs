//! Invariants over random workloads, with proptest.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use batching_scheduler::{Scheduler, SchedulerConfig};
use batching_types::{
    FinishReason, ManualClock, NewRequest, OutputEvent, Priority, SamplingParams,
};
use common::*;
use proptest::prelude::*;
use sim_backend::{tokens::expected_tokens, SimBackend, SimConfig, StopRule};

#[derive(Debug, Clone)]
struct Spec {
    prompt_len: usize,
    max_tokens: usize,
    priority: Priority,
    seed: u64,
    arrive_at: usize,
    cancel_at: Option<usize>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        1usize..40,
        1usize..20,
        prop_oneof![
            Just(Priority::High),
            Just(Priority::Normal),
            Just(Priority::Low)
        ],
        any::<u64>(),
        0usize..15,
        prop::option::weighted(0.2, 0usize..30),
    )
        .prop_map(
            |(prompt_len, max_tokens, priority, seed, arrive_at, cancel_at)| Spec {
                prompt_len,
                max_tokens,
                priority,
                seed,
                arrive_at,
                cancel_at,
            },
        )
}

#[derive(Debug, Clone)]
struct Setup {
    max_batch_size: usize,
    extra_tokens: usize,
    block_size: usize,
    extra_kv: usize,
    stop: bool,
    fail_steps: Vec<usize>,
    preemption: bool,
    max_preemptions: u32,
    max_prefill_chunk: usize,
    prefix_cache: bool,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        1usize..6,
        0usize..40,
        1usize..9,
        0usize..120,
        any::<bool>(),
        prop::collection::vec(0usize..60, 0..3),
        (any::<bool>(), 0u32..4, 1usize..48, any::<bool>()),
    )
        .prop_map(
            |(
                max_batch_size,
                extra_tokens,
                block_size,
                extra_kv,
                stop,
                fail_steps,
                (preemption, max_preemptions, max_prefill_chunk, prefix_cache),
            )| Setup {
                max_batch_size,
                extra_tokens,
                block_size,
                extra_kv,
                stop,
                fail_steps,
                preemption,
                max_preemptions,
                max_prefill_chunk,
                prefix_cache,
            },
        )
}

const VOCAB: u32 = 500;
const STOP: StopRule = StopRule {
    token: 3,
    one_in: 9,
};

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_workloads_keep_every_invariant(setup in setup(), specs in prop::collection::vec(spec(), 1..12)) {
        let clock = ManualClock::new();
        // Enough KV for the largest request alone, plus some slack, so that
        // submit accepts everything but the batch still runs out of blocks.
        let largest = specs.iter().map(|s| s.prompt_len + s.max_tokens).max().unwrap_or(1);
        let kv_tokens = largest.div_ceil(setup.block_size) * setup.block_size + setup.extra_kv;
        let stop = setup.stop.then_some(STOP);
        let backend = SimBackend::new(SimConfig {
            vocab: VOCAB,
            stop,
            kv_tokens,
            ..sim_config(&clock, kv_tokens)
        }).unwrap();
        let control = backend.control();
        let config = SchedulerConfig {
            max_batch_size: setup.max_batch_size,
            max_batch_tokens: setup.max_batch_size + setup.extra_tokens,
            block_size: setup.block_size,
            max_queue: None,
            preemption: setup.preemption,
            max_preemptions: setup.max_preemptions,
            max_prefill_chunk: setup.max_prefill_chunk,
            prefix_cache: setup.prefix_cache,
            ..SchedulerConfig::default()
        };
        let total_blocks = kv_tokens / setup.block_size;
        let mut engine = Scheduler::new(config.clone(), backend, clock).unwrap();
        let mut streams = vec![None; specs.len()].into_iter().map(|_: Option<()>| None).collect::<Vec<_>>();
        let mut step = 0usize;
        loop {
            for (i, s) in specs.iter().enumerate() {
                if s.arrive_at == step {
                    let request = NewRequest {
                        prompt_tokens: (0..s.prompt_len as u32).map(|t| t * 7 + 1).collect(),
                        max_tokens: s.max_tokens,
                        priority: s.priority,
                        sampling: SamplingParams {
                            seed: Some(s.seed),
                            stop_token_ids: if stop.is_some() { vec![STOP.token] } else { vec![] },
                            ..SamplingParams::default()
                        },
                        ..request(1, 1, Priority::Normal)
                    };
                    streams[i] = Some(engine.submit(request).unwrap().1);
                }
                if s.cancel_at == Some(step) {
                    if let Some(rx) = streams[i].as_mut() {
                        rx.close();
                    }
                }
            }
            if setup.fail_steps.contains(&step) {
                control.fail_next_steps(1);
            }
            let all_arrived = specs.iter().all(|s| s.arrive_at <= step);
            if all_arrived && !engine.has_work() {
                break;
            }
            let t = engine.step();
            prop_assert!(t.items.len() <= config.max_batch_size, "{}", t);
            prop_assert!(t.num_tokens() <= config.max_batch_tokens, "{}", t);
            prop_assert_eq!(t.blocks_used + t.blocks_free, total_blocks);
            prop_assert!(t.running <= config.max_batch_size, "{}", t);
            for item in &t.items {
                if let batching_types::WorkKind::Prefill { len } = item.kind {
                    prop_assert!(len <= config.max_prefill_chunk, "{}", t);
                }
            }
            step += 1;
            prop_assert!(step < 5000, "no progress");
        }
        let stats = control.stats();
        prop_assert_eq!(stats.violations, Vec::<String>::new());
        prop_assert_eq!(stats.live_sequences, 0);
        prop_assert_eq!(stats.kv_in_use, 0);
        prop_assert_eq!(stats.blocks_in_use, 0);
        prop_assert!(stats.max_blocks_in_use <= total_blocks);
        let health = engine.status();
        prop_assert_eq!((health.kv_blocks_used, health.running, health.waiting, health.paused, health.pending), (0, 0, 0, 0, 0));
        for (s, rx) in specs.iter().zip(streams.iter_mut()) {
            let rx = rx.as_mut().unwrap();
            let prompt: Vec<u32> = (0..s.prompt_len as u32).map(|t| t * 7 + 1).collect();
            let alone = expected_tokens(&prompt, Some(s.seed), s.max_tokens, VOCAB, stop);
            let events = drain(rx);
            if s.cancel_at.is_some_and(|c| c < step) {
                // Closed streams may miss their finish event; what arrived
                // is still an in-order prefix of the tokens it would get alone.
                let tokens: Vec<u32> = events.iter().filter_map(|e| match e {
                    OutputEvent::Token { token, .. } => Some(*token),
                    OutputEvent::Finished { .. } => None,
                }).collect();
                prop_assert!(alone.starts_with(&tokens));
                continue;
            }
            let (tokens, reason) = tokens_and_finish(&events);
            match reason {
                FinishReason::Length => prop_assert_eq!(&tokens, &alone),
                FinishReason::Stop => {
                    prop_assert_eq!(&tokens, &alone);
                    prop_assert_eq!(tokens.last(), Some(&STOP.token));
                }
                FinishReason::Error => {
                    prop_assert!(!setup.fail_steps.is_empty(), "errors only come from injected failures");
                    prop_assert!(alone.starts_with(&tokens));
                }
                other => prop_assert!(false, "unexpected finish {other}"),
            }
        }
    }
}
