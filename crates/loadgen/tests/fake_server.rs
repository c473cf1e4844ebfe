//! The load generator against a fake OpenAI server with known timings.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;

use common::{FIRST_MS, GAP_MS};
use loadgen::{poisson_schedule, run_report, BenchArgs, Endpoint, LengthSpec, RequestRecord};

fn args(url: &str, model: &str) -> BenchArgs {
    BenchArgs {
        url: url.to_owned(),
        model: Some(model.to_owned()),
        concurrency: Some("2".to_owned()),
        requests: 4,
        prompt_tokens: LengthSpec::fixed(16),
        max_tokens: LengthSpec::fixed(8),
        no_progress: true,
        request_timeout_s: 10.0,
        max_duration_s: 30.0,
        ..BenchArgs::default()
    }
}

async fn records(a: &BenchArgs) -> Vec<RequestRecord> {
    let report = run_report(a, "").await.unwrap();
    assert_eq!(report.levels.len(), 1);
    report.levels[0].records.clone()
}

// The machine is shared and slow, so upper bounds are generous; lower bounds
// are exact, since the server cannot send sooner than it sleeps.
const SLACK_MS: f64 = 1500.0;

#[tokio::test]
async fn counts_tokens_and_times_them() {
    let (url, seen) = common::start().await;
    for endpoint in [Endpoint::Chat, Endpoint::Completions] {
        let a = BenchArgs {
            endpoint,
            ..args(&url, "ok")
        };
        let recs = records(&a).await;
        assert_eq!(recs.len(), 4);
        for r in &recs {
            assert!(r.ok, "{r:?}");
            assert_eq!(r.status, Some(200));
            assert_eq!(r.output_tokens, 8);
            assert_eq!(r.chunks, 8);
            assert_eq!(r.usage_completion_tokens, Some(8));
            assert_eq!(r.usage_prompt_tokens, Some(10));
            assert_eq!(r.finish_reason.as_deref(), Some("length"));
            let ttft = r.ttft_ms.unwrap();
            assert!(
                ttft >= FIRST_MS as f64 && ttft < FIRST_MS as f64 + SLACK_MS,
                "ttft {ttft}"
            );
            assert_eq!(r.itl_gaps_ms.len(), 7);
            // One gap can be short when the chunk before it was delivered
            // late, but the last chunk cannot arrive before it was sent.
            for gap in &r.itl_gaps_ms {
                assert!(*gap >= 0.0 && *gap < SLACK_MS, "gap {gap}");
            }
            let last_chunk = ttft + r.itl_gaps_ms.iter().sum::<f64>();
            assert!(
                last_chunk >= (FIRST_MS + 7 * GAP_MS) as f64,
                "last chunk {last_chunk}"
            );
            let itl = r.itl_mean_ms.unwrap();
            assert!((itl - (last_chunk - ttft) / 7.0).abs() < 1e-9, "itl {itl}");
            assert!(itl < SLACK_MS, "itl {itl}");
            let min_e2e = (FIRST_MS + 7 * GAP_MS) as f64;
            assert!(r.e2e_ms >= min_e2e && r.e2e_ms >= ttft, "e2e {}", r.e2e_ms);
        }
    }
    // Every body asked for greedy streaming with usage, and carried no
    // priority since no mix was given.
    for body in seen.bodies.lock().unwrap().iter() {
        assert_eq!(body["temperature"], 0.0);
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["max_tokens"], 8);
        assert!(body.get("priority").is_none());
    }
}

#[tokio::test]
async fn counts_chunks_without_usage() {
    let (url, _) = common::start().await;
    let recs = records(&args(&url, "nousage")).await;
    for r in &recs {
        assert!(r.ok);
        assert_eq!(r.usage_completion_tokens, None);
        assert_eq!(r.output_tokens, 8);
    }
}

#[tokio::test]
async fn bad_answers_are_failed_requests() {
    let (url, _) = common::start().await;
    let cases = [
        ("fail500", "HTTP 500: boom: out of memory"),
        ("malformed", "malformed SSE data"),
        ("disconnect", "stream broke"),
    ];
    for (model, expected) in cases {
        let a = args(&url, model);
        let report = run_report(&a, "").await.unwrap();
        let level = &report.levels[0];
        assert_eq!(level.records.len(), 4);
        for r in &level.records {
            assert!(!r.ok, "{model}: {r:?}");
            let err = r.error.as_deref().unwrap();
            assert!(err.starts_with(expected), "{model}: {err}");
        }
        assert_eq!(level.summary.all.failed, 4);
        assert_eq!(level.summary.output_tokens, 0);
        assert!(level.summary.all.ttft_ms.is_none());
        assert_eq!(level.summary.errors.values().sum::<usize>(), 4);
    }
    let r = &records(&args(&url, "fail500")).await[0];
    assert_eq!(r.status, Some(500));
    // A stream cut after two tokens keeps what was measured before the cut.
    let r = &records(&args(&url, "disconnect")).await[0];
    assert_eq!(r.chunks, 2);
    assert!(r.ttft_ms.unwrap() >= FIRST_MS as f64);
}

#[tokio::test]
async fn stalled_stream_times_out() {
    let (url, _) = common::start().await;
    let a = BenchArgs {
        request_timeout_s: 0.5,
        requests: 2,
        ..args(&url, "stall")
    };
    let start = std::time::Instant::now();
    let recs = records(&a).await;
    assert!(start.elapsed().as_secs_f64() < 10.0);
    for r in &recs {
        assert!(!r.ok);
        assert_eq!(r.error.as_deref(), Some("timeout while streaming"));
        assert_eq!(r.chunks, 1);
        assert!(r.e2e_ms >= 500.0);
    }
}

#[tokio::test]
async fn concurrency_is_held_and_swept() {
    let (url, seen) = common::start().await;
    let a = BenchArgs {
        concurrency: Some("1,3".to_owned()),
        requests: 9,
        ..args(&url, "ok")
    };
    let report = run_report(&a, "x").await.unwrap();
    let labels: Vec<&str> = report
        .levels
        .iter()
        .map(|l| l.summary.label.as_str())
        .collect();
    assert_eq!(labels, ["x c=1", "x c=3"]);
    assert_eq!(seen.max_in_flight.load(Ordering::SeqCst), 3);
    let serial = &report.levels[0].summary;
    let parallel = &report.levels[1].summary;
    assert_eq!(serial.output_tokens, 72);
    assert_eq!(serial.all.requests, 9);
    // Three streams at once finish the same work in about a third of the time.
    assert!(
        parallel.duration_s < serial.duration_s * 0.75,
        "{} vs {}",
        parallel.duration_s,
        serial.duration_s
    );
    assert!(parallel.output_tokens_per_s > serial.output_tokens_per_s);
    let expected = serial.output_tokens as f64 / serial.duration_s;
    assert!((serial.output_tokens_per_s - expected).abs() < 1e-9);
}

#[tokio::test]
async fn open_loop_follows_the_poisson_schedule() {
    let (url, _) = common::start().await;
    let a = BenchArgs {
        concurrency: None,
        rate: Some("20".to_owned()),
        requests: 10,
        seed: 42,
        ..args(&url, "ok")
    };
    let report = run_report(&a, "").await.unwrap();
    let schedule = poisson_schedule(20.0, 10, 42);
    let level = &report.levels[0];
    assert_eq!(level.summary.rate, Some(20.0));
    for r in &level.records {
        let planned = schedule[r.index].as_secs_f64() * 1000.0;
        assert!(
            r.start_ms >= planned && r.start_ms < planned + 500.0,
            "{} vs {planned}",
            r.start_ms
        );
    }
}

#[tokio::test]
async fn priorities_and_probes_are_sent_and_reported() {
    let (url, seen) = common::start().await;
    let a = BenchArgs {
        priority_mix: Some("normal=1,low=1".parse().unwrap()),
        probe_high: 2,
        probe_interval_ms: 20,
        requests: 8,
        max_tokens: LengthSpec::fixed(20),
        ..args(&url, "ok")
    };
    let report = run_report(&a, "").await.unwrap();
    let level = &report.levels[0];
    let probes: Vec<&RequestRecord> = level.records.iter().filter(|r| r.probe).collect();
    assert_eq!(probes.len(), 2);
    assert!(probes
        .iter()
        .all(|r| r.priority.as_deref() == Some("high") && r.ok));
    let probe = level.summary.probe.as_ref().unwrap();
    assert_eq!((probe.requests, probe.failed), (2, 0));
    // The load's groups cover exactly the load's requests.
    let names: Vec<&str> = level
        .summary
        .by_priority
        .iter()
        .map(|g| g.name.as_str())
        .collect();
    assert!(names.iter().all(|n| *n == "normal" || *n == "low"));
    assert_eq!(
        level
            .summary
            .by_priority
            .iter()
            .map(|g| g.requests)
            .sum::<usize>(),
        8
    );
    let bodies = seen.bodies.lock().unwrap();
    let highs = bodies.iter().filter(|b| b["priority"] == "high").count();
    assert_eq!(highs, 2);
    assert_eq!(
        bodies
            .iter()
            .filter(|b| b.get("priority").is_some())
            .count(),
        10
    );
}
