//! The simulated backend's behaviour through the public `Backend` API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use batching_types::{
    Backend, Clock, ManualClock, RequestId, SamplingParams, SequenceOutcome, StepItem, StepPlan,
    WorkKind,
};
use sim_backend::{tokens::expected_tokens, SimBackend, SimConfig, SimError, TimeMode};

fn plan(items: &[(u64, WorkKind)]) -> StepPlan {
    StepPlan {
        items: items
            .iter()
            .map(|&(id, kind)| StepItem {
                id: RequestId(id),
                kind,
            })
            .collect(),
    }
}

fn token(outcome: &SequenceOutcome) -> u32 {
    match outcome {
        SequenceOutcome::Token(t) => *t,
        other => panic!("expected a token, got {other:?}"),
    }
}

#[test]
fn chunked_prefill_batching_and_recomputation_give_the_same_tokens() {
    let sampling = SamplingParams {
        seed: Some(42),
        ..Default::default()
    };
    let prompt = [10, 11, 12, 13, 14];
    let config = SimConfig::free();
    let alone = expected_tokens(&prompt, Some(42), 4, config.vocab, None);

    let mut b = SimBackend::new(config).unwrap();
    b.add_sequence(RequestId(1), &prompt, &sampling).unwrap();
    b.add_sequence(RequestId(2), &[1], &SamplingParams::default())
        .unwrap();
    let out = b
        .step(&plan(&[
            (1, WorkKind::Prefill { len: 3 }),
            (2, WorkKind::Prefill { len: 1 }),
        ]))
        .unwrap();
    assert_eq!(out.results[0].outcome, SequenceOutcome::Pending);
    let mut got = vec![];
    let out = b.step(&plan(&[
        (1, WorkKind::Prefill { len: 2 }),
        (2, WorkKind::Decode),
    ]));
    got.push(token(&out.unwrap().results[0].outcome));
    got.push(token(
        &b.step(&plan(&[(1, WorkKind::Decode)])).unwrap().results[0].outcome,
    ));
    assert_eq!(got, alone[..2]);

    // Preempt and rebuild from prompt + generated: the next tokens continue.
    b.release(RequestId(1));
    let context: Vec<u32> = prompt.iter().copied().chain(got.iter().copied()).collect();
    b.add_sequence(RequestId(1), &context, &sampling).unwrap();
    let out = b
        .step(&plan(&[(1, WorkKind::Prefill { len: context.len() })]))
        .unwrap();
    got.push(token(&out.results[0].outcome));
    got.push(token(
        &b.step(&plan(&[(1, WorkKind::Decode)])).unwrap().results[0].outcome,
    ));
    assert_eq!(got, alone);
}

#[test]
fn contract_violations_are_refused_and_recorded_without_side_effects() {
    let mut b = SimBackend::new(SimConfig {
        kv_tokens: 4,
        ..SimConfig::free()
    })
    .unwrap();
    let control = b.control();
    let s = SamplingParams::default();
    assert!(matches!(
        b.step(&plan(&[(9, WorkKind::Decode)])),
        Err(SimError::ContractViolation(_))
    ));
    b.add_sequence(RequestId(1), &[1, 2, 3], &s).unwrap();
    assert!(b.step(&plan(&[(1, WorkKind::Decode)])).is_err());
    assert!(b.step(&plan(&[(1, WorkKind::Prefill { len: 4 })])).is_err());
    assert!(b
        .step(&plan(&[
            (1, WorkKind::Prefill { len: 1 }),
            (1, WorkKind::Prefill { len: 1 })
        ]))
        .is_err());
    b.add_sequence(RequestId(2), &[1, 2], &s).unwrap();
    assert!(
        b.step(&plan(&[
            (1, WorkKind::Prefill { len: 3 }),
            (2, WorkKind::Prefill { len: 2 })
        ]))
        .is_err(),
        "5 slots exceed the 4 the backend holds"
    );
    assert_eq!(control.stats().violations.len(), 5);
    assert_eq!(control.stats().steps, 0, "refused plans do not run");
    assert!(b.step(&plan(&[(1, WorkKind::Prefill { len: 3 })])).is_ok());
    assert_eq!(control.stats().kv_in_use, 3);
    b.release(RequestId(1));
    b.release(RequestId(1));
    assert_eq!(control.stats().released, 1, "unknown ids are a no-op");
}

#[test]
fn injected_faults_hit_once_and_leave_others_running() {
    let mut b = SimBackend::new(SimConfig::free()).unwrap();
    let control = b.control();
    let s = SamplingParams::default();
    b.add_sequence(RequestId(1), &[1], &s).unwrap();
    b.add_sequence(RequestId(2), &[2], &s).unwrap();
    control.fail_next_steps(1);
    let both = plan(&[
        (1, WorkKind::Prefill { len: 1 }),
        (2, WorkKind::Prefill { len: 1 }),
    ]);
    assert_eq!(b.step(&both), Err(SimError::InjectedStepFailure));
    control.fail_sequence(RequestId(2));
    let out = b.step(&both).unwrap();
    assert!(matches!(out.results[0].outcome, SequenceOutcome::Token(_)));
    assert!(matches!(out.results[1].outcome, SequenceOutcome::Failed(_)));
    control.fail_add(RequestId(3));
    assert_eq!(
        b.add_sequence(RequestId(3), &[1], &s),
        Err(SimError::InjectedAddFailure(RequestId(3)))
    );
    assert!(b.add_sequence(RequestId(3), &[1], &s).is_ok());
    let stats = control.stats();
    assert_eq!((stats.steps, stats.failed_steps), (2, 1));
}

#[test]
fn the_cost_model_advances_a_manual_clock() {
    let clock = ManualClock::new();
    let t0 = clock.now();
    let mut b = SimBackend::new(SimConfig {
        step_cost: Duration::from_millis(10),
        prefill_token_cost: Duration::from_millis(1),
        decode_token_cost: Duration::from_millis(2),
        time: TimeMode::Advance(clock.clone()),
        ..SimConfig::default()
    })
    .unwrap();
    let s = SamplingParams::default();
    b.add_sequence(RequestId(1), &[1, 2, 3], &s).unwrap();
    b.add_sequence(RequestId(2), &[4], &s).unwrap();
    b.step(&plan(&[(1, WorkKind::Prefill { len: 3 })])).unwrap();
    assert_eq!(clock.now() - t0, Duration::from_millis(13));
    b.step(&plan(&[
        (1, WorkKind::Decode),
        (2, WorkKind::Prefill { len: 1 }),
    ]))
    .unwrap();
    assert_eq!(clock.now() - t0, Duration::from_millis(13 + 13));
    b.step(&StepPlan::default()).unwrap();
    assert_eq!(
        clock.now() - t0,
        Duration::from_millis(26),
        "empty steps are free"
    );
    assert_eq!(b.control().stats().virtual_time, Duration::from_millis(26));
}

#[test]
fn invalid_configs_are_refused() {
    assert!(SimBackend::new(SimConfig {
        vocab: 0,
        ..SimConfig::default()
    })
    .is_err());
    assert!(SimBackend::new(SimConfig {
        kv_tokens: 0,
        ..SimConfig::default()
    })
    .is_err());
}
