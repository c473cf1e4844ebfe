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
        if e.health().waiting < HIGH_BACKLOG + 1 {
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
