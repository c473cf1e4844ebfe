//! A soak of the real server on the real default model: two rounds of more
//! than a hundred concurrent clients over real HTTP, mixing streams,
//! hang-ups at random points, malformed and oversized bodies, random
//! priorities, stop strings and deadlines.
//!
//! Every well-formed request must end exactly once with the finish reason
//! its client saw (checked against the server's finish counters), the
//! engine must return to idle (no KV block, running or paused request
//! left) after each round, the process must not grow from one round to the
//! next, and liveness must answer 200 throughout. The KV budget is small
//! enough (64 MiB) that the first round fills the block pool, which then
//! stays allocated by design (it holds the prefix cache), and MLX's buffer
//! cache is bounded likewise: so growth between the rounds is a leak.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod default_model;
mod real;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use default_model::model_or_skip;
use futures::StreamExt;
use rand::{rngs::StdRng, Rng, SeedableRng};
use real::{counter, RealServer};
use serde_json::{json, Value};

const MODEL: &str = "SmolLM2-135M-Instruct";
const CLIENTS: usize = 110;
const ROUNDS: usize = 2;

/// What one client did and saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    /// A well-formed request that finished with this reason.
    Finished(&'static str),
    /// A well-formed request whose client hung up before its end.
    HungUp,
    /// Refused for waiting past its deadline (504).
    TimedOut,
    /// A malformed body, refused with 400.
    Malformed,
    /// A body over the limit, refused with 413.
    Oversized,
}

const WORDS: [&str; 12] = [
    "river", "stone", "quiet", "lantern", "orbit", "meadow", "copper", "signal", "harbor",
    "thistle", "ember", "tide",
];

fn prompt(rng: &mut StdRng) -> String {
    let n = rng.random_range(3..20);
    (0..n)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

fn finish_of(answer: &Value) -> &'static str {
    match answer["choices"][0]["finish_reason"].as_str() {
        Some("stop") => "stop",
        Some("length") => "length",
        other => panic!("unexpected finish {other:?}: {answer}"),
    }
}

/// One client's single request, chosen by `kind` (0..100).
async fn client(server: Arc<RealServer>, seed: u64) -> Seen {
    let mut rng = StdRng::seed_from_u64(seed);
    let kind = rng.random_range(0..100);
    let http = &server.client;
    let priority = ["high", "normal", "low"][rng.random_range(0..3)];
    if kind < 12 {
        let resp = http
            .post(server.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body("{\"model\": \"SmolLM2-135M-Instruct\", \"messages\": [")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        return Seen::Malformed;
    }
    if kind < 16 {
        let big = "x".repeat(5 << 20);
        let body = json!({"model": MODEL, "prompt": big, "max_tokens": 2});
        let resp = http
            .post(server.url("/v1/completions"))
            .json(&body)
            .send()
            .await;
        // The server may answer before it has read the body and close.
        if let Ok(resp) = resp {
            assert_eq!(resp.status(), 413);
        }
        return Seen::Oversized;
    }
    let stream = rng.random_bool(0.5);
    let hang_up = kind < 32;
    let stop = (32..52).contains(&kind);
    let max_tokens = if hang_up {
        200
    } else {
        rng.random_range(4..20)
    };
    let mut body = if rng.random_bool(0.5) {
        json!({"model": MODEL, "messages": [{"role": "user", "content": prompt(&mut rng)}]})
    } else {
        json!({"model": MODEL, "prompt": prompt(&mut rng)})
    };
    let chat = body.get("messages").is_some();
    body["max_tokens"] = json!(max_tokens);
    body["stream"] = json!(stream || hang_up);
    if stop {
        body["stop"] = json!(["e", "\n"]);
    }
    let path = if chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let resp = http
        .post(server.url(path))
        .header("x-priority", priority)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    if status == 504 {
        return Seen::TimedOut;
    }
    assert_eq!(status, 200, "{}", resp.text().await.unwrap_or_default());
    if !(stream || hang_up) {
        let answer: Value = resp.json().await.unwrap();
        return Seen::Finished(finish_of(&answer));
    }
    // Server-sent events: read until the finish, or hang up after a few.
    let hang_after = if hang_up {
        rng.random_range(1..4)
    } else {
        usize::MAX
    };
    let mut events = resp.bytes_stream();
    let mut buffer = String::new();
    let mut chunks = 0;
    while let Some(piece) = events.next().await {
        buffer.push_str(std::str::from_utf8(&piece.unwrap()).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let event = buffer[..end].trim_start_matches("data: ").to_owned();
            buffer.drain(..end + 2);
            if event == "[DONE]" {
                panic!("the stream ended without a finish reason");
            }
            let chunk: Value = serde_json::from_str(&event).unwrap();
            assert!(chunk.get("error").is_none(), "{chunk}");
            if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str() {
                return Seen::Finished(finish_of(&json!({"choices": [{"finish_reason": reason}]})));
            }
            chunks += 1;
            if chunks >= hang_after {
                return Seen::HungUp;
            }
        }
    }
    panic!("the stream closed without a finish");
}

fn finished(metrics: &str, reason: &str) -> f64 {
    counter(
        metrics,
        "mlx_batch_requests_finished_total",
        &format!("reason=\"{reason}\""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rounds_of_a_hundred_mixed_clients_end_every_request_once_and_leak_nothing() {
    if model_or_skip().is_none() {
        return;
    }
    let started = Instant::now();
    let server = Arc::new(
        RealServer::start(
            &[
                "--request-timeout",
                "30s",
                "--kv-memory",
                "64MiB",
                "--mlx-cache-limit",
                "64MiB",
                "--max-batch-size",
                "32",
            ],
            None,
        )
        .await,
    );
    // Liveness is watched throughout, every 250 ms.
    let done = Arc::new(AtomicBool::new(false));
    let unhealthy = Arc::new(AtomicUsize::new(0));
    let probes = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (server, done, unhealthy, probes) = (
            Arc::clone(&server),
            Arc::clone(&done),
            Arc::clone(&unhealthy),
            Arc::clone(&probes),
        );
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let (status, _) = server.health().await;
                probes.fetch_add(1, Ordering::Relaxed);
                if status != 200 {
                    unhealthy.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let mut rss = Vec::new();
    for round in 0..ROUNDS {
        let before = server.metrics().await;
        let t = Instant::now();
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|i| tokio::spawn(client(Arc::clone(&server), (round * 1000 + i) as u64)))
            .collect();
        let mut seen: BTreeMap<Seen, usize> = BTreeMap::new();
        for task in tasks {
            *seen.entry(task.await.unwrap()).or_default() += 1;
        }
        let idle = server.wait_idle().await;
        let after = server.metrics().await;
        let delta = |reason: &str| finished(&after, reason) - finished(&before, reason);
        let count = |s: Seen| seen.get(&s).copied().unwrap_or(0) as f64;
        assert_eq!(delta("stop"), count(Seen::Finished("stop")), "{seen:?}");
        assert_eq!(delta("length"), count(Seen::Finished("length")), "{seen:?}");
        assert_eq!(delta("cancelled"), count(Seen::HungUp), "{seen:?}");
        assert_eq!(delta("timeout"), count(Seen::TimedOut), "{seen:?}");
        assert_eq!(delta("error"), 0.0, "no request failed");
        let e = &idle["engine"];
        assert_eq!(
            (&e["kv_blocks_used"], &e["running"], &e["paused"]),
            (&json!(0), &json!(0), &json!(0))
        );
        rss.push(server.status_kib("VmRSS:"));
        let mib = |name: &str| counter(&after, name, "") / f64::from(1 << 20);
        eprintln!(
            "round {}: {CLIENTS} clients in {:.1} s: {seen:?}; RSS {} MiB (MLX active {:.0}, cache {:.0}, KV pool {:.0} MiB)",
            round + 1,
            t.elapsed().as_secs_f64(),
            rss[round] / 1024,
            mib("mlx_batch_memory_active_bytes"),
            mib("mlx_batch_memory_cache_bytes"),
            mib("mlx_batch_kv_pool_bytes"),
        );
    }
    done.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    let (first, last) = (rss[0] as f64, rss[ROUNDS - 1] as f64);
    eprintln!(
        "soak: {} health probes, {} not 200; RSS {:.0} -> {:.0} MiB ({:+.1}%); {:.0} s in all",
        probes.load(Ordering::Relaxed),
        unhealthy.load(Ordering::Relaxed),
        first / 1024.0,
        last / 1024.0,
        100.0 * (last - first) / first,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(unhealthy.load(Ordering::Relaxed), 0, "/health stayed 200");
    assert!(
        (last - first).abs() <= 0.05 * first,
        "RSS after round 2 is within 5% of round 1: {first} -> {last} KiB"
    );
}
