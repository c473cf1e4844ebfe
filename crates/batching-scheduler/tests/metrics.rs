//! The documented metrics are recorded with the right values and labels.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use batching_scheduler::{metrics as names, SchedulerConfig};
use batching_types::Priority;
use common::*;
use metrics_util::{
    debugging::{DebugValue, DebuggingRecorder},
    MetricKind,
};

#[test]
fn a_run_records_counters_gauges_and_labelled_histograms() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        // Small KV so the LOW request gets preempted; one client leaves.
        let config = SchedulerConfig {
            max_batch_size: 4,
            max_batch_tokens: 32,
            block_size: 4,
            ..SchedulerConfig::default()
        };
        let (mut e, _clock) = engine(config, 24);
        let (_, mut low) = e.submit(request(8, 12, Priority::Low)).unwrap();
        let (_, mut high) = e.submit(request(8, 12, Priority::High)).unwrap();
        let (_, gone) = e.submit(request(2, 3, Priority::Normal)).unwrap();
        drop(gone);
        e.backend().control().fail_next_steps(1);
        run_to_idle(&mut e, 100);
        drain(&mut low);
        drain(&mut high);
    });
    let mut values: HashMap<(MetricKind, String, Vec<String>), DebugValue> = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let labels = key
            .key()
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        values.insert((key.kind(), key.key().name().to_owned(), labels), value);
    }
    let counter = |name: &str, labels: &[&str]| match values.get(&(
        MetricKind::Counter,
        name.to_owned(),
        labels.iter().map(|s| s.to_string()).collect(),
    )) {
        Some(DebugValue::Counter(n)) => *n,
        _ => 0,
    };
    let samples = |name: &str, priority: &str| match values.get(&(
        MetricKind::Histogram,
        name.to_owned(),
        vec![format!("priority={priority}")],
    )) {
        Some(DebugValue::Histogram(v)) => v.len(),
        _ => 0,
    };
    assert_eq!(counter(names::TOKENS_GENERATED, &[]), 24);
    assert_eq!(counter(names::CANCELLATIONS, &[]), 1);
    assert_eq!(counter(names::STEP_FAILURES, &["kind=internal"]), 1);
    assert!(counter(names::PREEMPTIONS, &["reason=memory"]) >= 1);
    assert!(
        counter(names::PREEMPTIONS, &["reason=retry"]) >= 1,
        "the failed step re-queues its requests"
    );
    assert_eq!(counter(names::PREEMPTIONS, &["reason=priority"]), 0);
    assert_eq!(counter(names::REQUESTS_FINISHED, &["reason=length"]), 2);
    assert_eq!(counter(names::REQUESTS_FINISHED, &["reason=cancelled"]), 1);
    assert_eq!(samples(names::TIME_TO_FIRST_TOKEN, "low"), 1);
    assert_eq!(samples(names::TIME_TO_FIRST_TOKEN, "high"), 1);
    assert_eq!(samples(names::INTER_TOKEN_LATENCY, "high"), 11);
    assert_eq!(
        samples(names::QUEUE_TIME, "normal"),
        0,
        "it left before admission"
    );
    assert!(matches!(
        values.get(&(MetricKind::Gauge, names::KV_BLOCKS_USED.to_owned(), vec![])),
        Some(DebugValue::Gauge(v)) if v.into_inner() == 0.0
    ));
    assert!(names::ALL.iter().all(|n| n.starts_with("mlx_batch_")));
}

#[test]
fn a_pause_for_priority_is_counted_timed_and_shown_while_it_lasts() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let paused_gauge = || {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find_map(|(key, _, _, value)| (key.key().name() == names::PAUSED).then_some(value))
    };
    let mut seen_paused = false;
    let mut values = vec![];
    metrics::with_local_recorder(&recorder, || {
        let config = SchedulerConfig {
            max_batch_size: 1,
            max_batch_tokens: 16,
            block_size: 4,
            ..SchedulerConfig::default()
        };
        let (mut e, _clock) = engine(config, 256);
        let (_, mut low) = e.submit(request(4, 6, Priority::Low)).unwrap();
        e.step();
        e.step();
        let (_, mut high) = e.submit(request(4, 3, Priority::High)).unwrap();
        e.step();
        // A snapshot resets the debugging recorder's counters, so the gauge
        // is read from the engine's health, which publishes the same value.
        seen_paused = e.status().paused == 1;
        run_to_idle(&mut e, 100);
        drain(&mut low);
        drain(&mut high);
    });
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let labels: Vec<String> = key
            .key()
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        values.push((key.key().name().to_owned(), labels, value));
    }
    assert!(seen_paused, "the paused gauge showed the paused request");
    let find = |name: &str, label: &str| {
        values
            .iter()
            .find(|(n, l, _)| n == name && l.iter().any(|x| x == label))
            .map(|(_, _, v)| v)
    };
    assert!(matches!(
        find(names::PREEMPTIONS, "reason=priority"),
        Some(DebugValue::Counter(1))
    ));
    assert!(matches!(
        find(names::PAUSE_TIME, "priority=low"),
        Some(DebugValue::Histogram(v)) if v.len() == 1 && v[0].into_inner() > 0.0
    ));
    assert!(matches!(
        paused_gauge(),
        Some(DebugValue::Gauge(v)) if v.into_inner() == 0.0
    ));
}
