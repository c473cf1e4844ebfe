//! The simulated backend's behaviour through the public `Backend` API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::HashMap, time::Duration};

use batching_types::{
    Backend, Clock, KvBlocks, ManualClock, RequestId, SamplingParams, SequenceOutcome, StepItem,
    StepPlan, WorkKind,
};
use sim_backend::{tokens::expected_tokens, SimBackend, SimConfig, SimError, TimeMode};

/// Block tables for direct backend calls: each sequence gets fresh blocks
/// as it grows, from a counter, the way the scheduler's allocator would.
struct Tables {
    block_size: usize,
    next: u32,
    held: HashMap<u64, (Vec<u32>, usize)>,
}

impl Tables {
    /// Configures `backend` with blocks of `block_size` over its whole KV.
    fn configure(backend: &mut SimBackend, block_size: usize) -> Self {
        let num_blocks = backend.config().kv_tokens / block_size;
        backend
            .configure_kv(KvBlocks {
                block_size,
                num_blocks,
            })
            .unwrap();
        Self {
            block_size,
            next: 0,
            held: HashMap::new(),
        }
    }

    fn plan(&mut self, items: &[(u64, WorkKind)]) -> StepPlan {
        let mut block_tables = vec![];
        for &(id, kind) in items {
            let (table, len) = self.held.entry(id).or_default();
            *len += kind.tokens();
            while table.len() * self.block_size < *len {
                table.push(self.next);
                self.next += 1;
            }
            block_tables.push(table.clone());
        }
        StepPlan {
            items: items
                .iter()
                .map(|&(id, kind)| StepItem {
                    id: RequestId::from(id),
                    kind,
                })
                .collect(),
            block_tables,
        }
    }

    /// A released sequence starts with an empty table when added again.
    fn forget(&mut self, id: u64) {
        self.held.remove(&id);
    }

    /// Forgets every table, after refused plans that wrote nothing.
    fn reset(&mut self) {
        self.held.clear();
        self.next = 0;
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
    let mut t = Tables::configure(&mut b, 4);
    b.add_sequence(RequestId::from(1), &prompt, &sampling)
        .unwrap();
    b.add_sequence(RequestId::from(2), &[1], &SamplingParams::default())
        .unwrap();
    let out = b
        .step(&t.plan(&[
            (1, WorkKind::Prefill { len: 3 }),
            (2, WorkKind::Prefill { len: 1 }),
        ]))
        .unwrap();
    assert_eq!(out.results[0].outcome, SequenceOutcome::Pending);
    let mut got = vec![];
    let out = b.step(&t.plan(&[(1, WorkKind::Prefill { len: 2 }), (2, WorkKind::Decode)]));
    got.push(token(&out.unwrap().results[0].outcome));
    got.push(token(
        &b.step(&t.plan(&[(1, WorkKind::Decode)])).unwrap().results[0].outcome,
    ));
    assert_eq!(got, alone[..2]);

    // Preempt and rebuild from prompt + generated: the next tokens continue.
    b.release(RequestId::from(1));
    t.forget(1);
    let context: Vec<u32> = prompt.iter().copied().chain(got.iter().copied()).collect();
    b.add_sequence(RequestId::from(1), &context, &sampling)
        .unwrap();
    let out = b
        .step(&t.plan(&[(1, WorkKind::Prefill { len: context.len() })]))
        .unwrap();
    got.push(token(&out.results[0].outcome));
    got.push(token(
        &b.step(&t.plan(&[(1, WorkKind::Decode)])).unwrap().results[0].outcome,
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
    let mut t = Tables::configure(&mut b, 1);
    let control = b.control();
    let s = SamplingParams::default();
    assert!(matches!(
        b.step(&t.plan(&[(9, WorkKind::Decode)])),
        Err(SimError::ContractViolation(_))
    ));
    b.add_sequence(RequestId::from(1), &[1, 2, 3], &s).unwrap();
    assert!(b.step(&t.plan(&[(1, WorkKind::Decode)])).is_err());
    assert!(b
        .step(&t.plan(&[(1, WorkKind::Prefill { len: 4 })]))
        .is_err());
    assert!(b
        .step(&t.plan(&[
            (1, WorkKind::Prefill { len: 1 }),
            (1, WorkKind::Prefill { len: 1 })
        ]))
        .is_err());
    b.add_sequence(RequestId::from(2), &[1, 2], &s).unwrap();
    assert!(
        b.step(&t.plan(&[
            (1, WorkKind::Prefill { len: 3 }),
            (2, WorkKind::Prefill { len: 2 })
        ]))
        .is_err(),
        "5 slots exceed the 4 the backend holds"
    );
    assert_eq!(control.stats().violations.len(), 5);
    assert_eq!(control.stats().steps, 0, "refused plans do not run");
    t.reset();
    assert!(b
        .step(&t.plan(&[(1, WorkKind::Prefill { len: 3 })]))
        .is_ok());
    assert_eq!(control.stats().kv_in_use, 3);
    b.release(RequestId::from(1));
    b.release(RequestId::from(1));
    assert_eq!(control.stats().released, 1, "unknown ids are a no-op");
}

#[test]
fn block_tables_that_share_move_or_overrun_blocks_are_refused() {
    let mut b = SimBackend::new(SimConfig {
        kv_tokens: 16,
        ..SimConfig::free()
    })
    .unwrap();
    let s = SamplingParams::default();
    let prefill = |id, len| StepItem {
        id: RequestId::from(id),
        kind: WorkKind::Prefill { len },
    };
    let with = |items: Vec<StepItem>, block_tables: Vec<Vec<u32>>| StepPlan {
        items,
        block_tables,
    };
    b.add_sequence(RequestId::from(1), &[1, 2, 3, 4, 5], &s)
        .unwrap();
    assert!(
        b.step(&with(vec![prefill(1, 2)], vec![vec![0]])).is_err(),
        "a plan before configure_kv"
    );
    b.configure_kv(KvBlocks {
        block_size: 4,
        num_blocks: 4,
    })
    .unwrap();
    b.add_sequence(RequestId::from(2), &[6, 7], &s).unwrap();
    let refused = [
        with(vec![prefill(1, 5)], vec![vec![0]]),
        with(vec![prefill(1, 2)], vec![vec![4]]),
        with(vec![prefill(1, 2), prefill(2, 2)], vec![vec![0], vec![0]]),
        with(vec![prefill(1, 2)], vec![]),
    ];
    for plan in &refused {
        assert!(b.step(plan).is_err(), "{plan:?}");
    }
    b.step(&with(
        vec![prefill(1, 2), prefill(2, 2)],
        vec![vec![0], vec![1]],
    ))
    .unwrap();
    // Sequence 1 may not move its written block, nor write into 2's.
    assert!(b
        .step(&with(vec![prefill(1, 3)], vec![vec![2, 3]]))
        .is_err());
    assert!(b
        .step(&with(vec![prefill(1, 3)], vec![vec![0, 1]]))
        .is_err());
    b.step(&with(vec![prefill(1, 3)], vec![vec![0, 2]]))
        .unwrap();
    let stats = b.control().stats();
    assert_eq!(stats.violations.len(), 7, "{:?}", stats.violations);
    assert_eq!(stats.blocks_in_use, 3);
    // A released sequence's blocks are free for others.
    b.release(RequestId::from(2));
    b.add_sequence(RequestId::from(3), &[9], &s).unwrap();
    b.step(&with(vec![prefill(3, 1)], vec![vec![1]])).unwrap();
}

#[test]
fn injected_faults_hit_once_and_leave_others_running() {
    let mut b = SimBackend::new(SimConfig::free()).unwrap();
    let mut t = Tables::configure(&mut b, 4);
    let control = b.control();
    let s = SamplingParams::default();
    b.add_sequence(RequestId::from(1), &[1], &s).unwrap();
    b.add_sequence(RequestId::from(2), &[2], &s).unwrap();
    control.fail_next_steps(1);
    let both = t.plan(&[
        (1, WorkKind::Prefill { len: 1 }),
        (2, WorkKind::Prefill { len: 1 }),
    ]);
    assert_eq!(b.step(&both), Err(SimError::InjectedStepFailure));
    control.fail_sequence(RequestId::from(2));
    let out = b.step(&both).unwrap();
    assert!(matches!(out.results[0].outcome, SequenceOutcome::Token(_)));
    assert!(matches!(out.results[1].outcome, SequenceOutcome::Failed(_)));
    control.fail_add(RequestId::from(3));
    assert_eq!(
        b.add_sequence(RequestId::from(3), &[1], &s),
        Err(SimError::InjectedAddFailure(RequestId::from(3)))
    );
    assert!(b.add_sequence(RequestId::from(3), &[1], &s).is_ok());
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
    let mut t = Tables::configure(&mut b, 4);
    let s = SamplingParams::default();
    b.add_sequence(RequestId::from(1), &[1, 2, 3], &s).unwrap();
    b.add_sequence(RequestId::from(2), &[4], &s).unwrap();
    b.step(&t.plan(&[(1, WorkKind::Prefill { len: 3 })]))
        .unwrap();
    assert_eq!(clock.now() - t0, Duration::from_millis(13));
    b.step(&t.plan(&[(1, WorkKind::Decode), (2, WorkKind::Prefill { len: 1 })]))
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
