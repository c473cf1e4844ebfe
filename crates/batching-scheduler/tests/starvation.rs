//! Aging keeps LOW requests from starving under an endless stream of HIGH
//! ones, within the bound that aging promises.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use batching_scheduler::SchedulerConfig;
use batching_types::{Clock, FinishReason, Priority};
use common::*;

/// HIGH requests kept waiting at all times, on top of the one running.
const HIGH_BACKLOG: usize = 3;

/// Runs a batch of one under a HIGH backlog that never drains and returns
/// how long a LOW request submitted at the start waited for admission, or
/// `None` if it was not admitted within `horizon` of virtual time.
fn low_wait(aging_rate: f64, horizon: Duration) -> Option<Duration> {
    let config = SchedulerConfig {
        max_batch_size: 1,
        max_batch_tokens: 16,
        block_size: 4,
        aging_rate,
        max_queue: None,
        ..SchedulerConfig::default()
    };
    let (mut e, clock) = engine(config, 1024);
    let mut highs = vec![];
    for _ in 0..HIGH_BACKLOG {
        highs.push(e.submit(request(4, 5, Priority::High)).unwrap().1);
    }
    let t0 = clock.now();
    let (low_id, mut low) = e.submit(request(4, 5, Priority::Low)).unwrap();
    let mut admitted_at = None;
    while clock.now() - t0 < horizon {
        if e.status().waiting < HIGH_BACKLOG + 1 {
            highs.push(e.submit(request(4, 5, Priority::High)).unwrap().1);
        }
        let started = clock.now();
        let trace = e.step();
        if trace.admitted.contains(&low_id) {
            admitted_at = Some(started - t0);
            break;
        }
    }
    if admitted_at.is_some() {
        while e.has_work() {
            e.step();
        }
        assert_eq!(tokens_and_finish(&drain(&mut low)).1, FinishReason::Length);
    }
    admitted_at
}

#[test]
fn a_low_request_is_served_within_the_aging_bound_under_endless_high_load() {
    let rate = 0.5;
    // One request: a prefill step (10 ms + 4 x 0.1 ms) and four decode
    // steps (10 ms + 1 ms each) on the sim's cost model.
    let service = Duration::from_micros(10_400 + 4 * 11_000);
    // LOW (2) overtakes a HIGH (0) that arrived 2/r seconds after it; until
    // then it waits for at most the backlog queued ahead plus the running one.
    let aging = Duration::from_secs_f64(2.0 / rate);
    let bound = aging + service * (HIGH_BACKLOG as u32 + 1);
    let wait = low_wait(rate, bound * 3).expect("LOW was admitted");
    println!(
        "aging rate {rate}/s: LOW waited {:.3} s for admission; bound {:.3} s (2/r = {:.1} s + {} x {:.4} s)",
        wait.as_secs_f64(),
        bound.as_secs_f64(),
        aging.as_secs_f64(),
        HIGH_BACKLOG + 1,
        service.as_secs_f64()
    );
    assert!(
        wait <= bound,
        "waited {wait:?}, more than the bound {bound:?}"
    );
    assert!(
        wait + service * (HIGH_BACKLOG as u32 + 1) >= aging,
        "LOW overtook HIGH before aging allowed it: {wait:?}"
    );
}

#[test]
fn without_aging_the_same_load_starves_the_low_request() {
    assert_eq!(low_wait(0.0, Duration::from_secs(12)), None);
}

mod bound {
    //! The wait bound of `batching_scheduler::bound`, checked over random
    //! workloads with a continuous stream of HIGH work.

    use std::{collections::HashMap, time::Duration};

    use batching_scheduler::{SchedulerConfig, WaitBoundInputs};
    use batching_types::{Clock, Priority, RequestId};
    use proptest::prelude::*;
    use sim_backend::tokens::expected_tokens;

    use super::common::*;

    #[derive(Debug, Clone)]
    struct Background {
        prompt_len: usize,
        max_tokens: usize,
        low: bool,
        arrive_at: usize,
    }

    #[derive(Debug, Clone)]
    struct Workload {
        batch: usize,
        extra_tokens: usize,
        chunk: usize,
        aging_rate: f64,
        max_preemptions: u32,
        preemption: bool,
        backlog: usize,
        high_steps: usize,
        background: Vec<Background>,
    }

    fn workload() -> impl Strategy<Value = Workload> {
        let background = (1usize..30, 1usize..12, any::<bool>(), 0usize..20).prop_map(
            |(prompt_len, max_tokens, low, arrive_at)| Background {
                prompt_len,
                max_tokens,
                low,
                arrive_at,
            },
        );
        (
            1usize..5,
            0usize..24,
            1usize..32,
            prop_oneof![Just(0.5), Just(1.0), Just(4.0)],
            0u32..4,
            prop::bool::weighted(0.8),
            1usize..4,
            50usize..300,
            prop::collection::vec(background, 1..8),
        )
            .prop_map(
                |(
                    batch,
                    extra_tokens,
                    chunk,
                    aging_rate,
                    max_preemptions,
                    preemption,
                    backlog,
                    high_steps,
                    background,
                )| Workload {
                    batch,
                    extra_tokens,
                    chunk,
                    aging_rate,
                    max_preemptions,
                    preemption,
                    backlog,
                    high_steps,
                    background,
                },
            )
    }

    /// One submitted request as the bound sees it.
    struct Entry {
        priority: Priority,
        submitted: Duration,
        prompt_len: usize,
        max_tokens: usize,
        in_batch: Duration,
        finished: Option<Duration>,
        rx: batching_types::EventReceiver,
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn every_request_finishes_once_within_its_wait_bound(w in workload()) {
            let config = SchedulerConfig {
                max_batch_size: w.batch,
                max_batch_tokens: w.batch + w.extra_tokens,
                max_prefill_chunk: w.chunk,
                block_size: 4,
                aging_rate: w.aging_rate,
                max_preemptions: w.max_preemptions,
                preemption: w.preemption,
                max_queue: None,
                ..SchedulerConfig::default()
            };
            // KV never runs short: the bound's precondition.
            let (mut e, clock) = engine(config.clone(), 1 << 16);
            let t0 = clock.now();
            let mut entries: HashMap<RequestId, Entry> = HashMap::new();
            let mut highs = 0u32;
            let mut longest_step = Duration::ZERO;
            let mut step = 0usize;
            loop {
                let mut submit = |e: &mut SimEngine, prompt_len: usize, max_tokens: usize, priority: Priority| {
                    let (id, rx) = e.submit(request(prompt_len, max_tokens, priority)).unwrap();
                    entries.insert(id, Entry {
                        priority,
                        submitted: clock.now() - t0,
                        prompt_len,
                        max_tokens,
                        in_batch: Duration::ZERO,
                        finished: None,
                        rx,
                    });
                };
                for b in w.background.iter().filter(|b| b.arrive_at == step) {
                    let priority = if b.low { Priority::Low } else { Priority::Normal };
                    submit(&mut e, b.prompt_len, b.max_tokens, priority);
                }
                if step < w.high_steps {
                    while e.status().waiting < w.backlog {
                        highs += 1;
                        submit(&mut e, 1 + (highs as usize * 7) % 8, 1 + (highs as usize * 5) % 6, Priority::High);
                    }
                }
                let arrived = w.background.iter().all(|b| b.arrive_at <= step);
                if arrived && step >= w.high_steps && !e.has_work() {
                    break;
                }
                let before = clock.now();
                let trace = e.step();
                let after = clock.now();
                longest_step = longest_step.max(after - before);
                for item in &trace.items {
                    if let Some(entry) = entries.get_mut(&item.id) {
                        entry.in_batch += after - before;
                    }
                }
                for (id, _) in &trace.finished {
                    if let Some(entry) = entries.get_mut(id) {
                        prop_assert!(entry.finished.is_none(), "{id} finished twice");
                        entry.finished = Some(after - t0);
                    }
                }
                step += 1;
                prop_assert!(step < 200_000, "no progress");
            }
            let max_prompt_tokens = entries.values().map(|x| x.prompt_len).max().unwrap_or(0);
            let max_tokens = entries.values().map(|x| x.max_tokens).max().unwrap_or(0);
            // The fixed key of the queue's order: base + rate * enqueue time,
            // ties to the earlier arrival and then the older id.
            let key = |id: &RequestId, x: &Entry| {
                (f64::from(x.priority.value()) + w.aging_rate * x.submitted.as_secs_f64(), x.submitted, *id)
            };
            let keys: Vec<_> = entries.iter().map(|(id, x)| key(id, x)).collect();
            for (id, x) in entries.iter_mut() {
                let (tokens, _) = tokens_and_finish(&drain(&mut x.rx));
                let prompt: Vec<u32> = (1..=x.prompt_len as u32).collect();
                prop_assert_eq!(&tokens, &expected_tokens(&prompt, None, x.max_tokens, 1000, None), "{} lost or repeated tokens", id);
                let finished = x.finished.expect("every request finished");
                let waited = finished.saturating_sub(x.submitted).saturating_sub(x.in_batch);
                let mine = (f64::from(x.priority.value()) + w.aging_rate * x.submitted.as_secs_f64(), x.submitted, *id);
                let outranking = keys.iter().filter(|k| k.0.total_cmp(&mine.0).then(k.1.cmp(&mine.1)).then(k.2.cmp(&mine.2)).is_lt()).count();
                let bound = config.wait_bound(&WaitBoundInputs {
                    priority: x.priority,
                    outranking,
                    max_prompt_tokens,
                    max_tokens,
                }).unwrap().with_longest_step(longest_step);
                prop_assert!(
                    waited <= bound,
                    "{} ({}) waited {:?}, over its bound {:?} ({} outrank it)",
                    id, x.priority.as_str(), waited, bound, outranking
                );
            }
        }
    }
}
