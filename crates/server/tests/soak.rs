//! A bounded soak and fault test over real HTTP on loopback: hundreds of
//! concurrent requests with random priorities, clients that hang up
//! mid-stream, and malformed, invalid and oversized requests mixed in. It
//! checks that the server stays up, that every well-formed request either
//! completes with exactly the tokens it would get alone or fails with a
//! proper error, that the engine finishes each request exactly once, and
//! that nothing leaks: running requests, waiting requests, KV blocks and
//! backend sequences all return to zero, and the heap is as large after the
//! last round of the burst as after the first.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicIsize, Ordering},
    time::{Duration, Instant},
};

use common::{expected_text, Options, SseReader, TestServer, MODEL};
use serde_json::{json, Value};

/// How many requests each round of the soak sends, all at once.
const REQUESTS_PER_ROUND: u64 = 300;
/// How many rounds run on the same server. The first one warms up every
/// pool and table; the others must not grow the heap.
const ROUNDS: u64 = 3;
/// How much the live heap may grow from the end of the first round to the
/// end of the last one. Found by measurement: the growth is a few KiB, so
/// this catches a leak of about 200 bytes per request.
const HEAP_GROWTH_LIMIT: isize = 128 * 1024;

/// Bytes allocated and not yet freed, over the whole test process.
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

/// The system allocator, counting live bytes. Resident memory would also
/// show a leak, but the allocator keeps freed pages, so its noise hides a
/// small one; live bytes are exact.
struct CountingAllocator;

// SAFETY: every method forwards to `System` with the caller's arguments,
// unchanged, and only adds bookkeeping on an atomic.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded from the caller, who upholds `alloc`'s contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, which is `System`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator, which is `System`.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE_BYTES.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// A small deterministic generator, so a failure can be replayed.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// What one simulated client does.
#[derive(Debug, Clone, Copy)]
enum Client {
    /// Streams to the end and checks the text.
    Stream,
    /// Reads a few events, then hangs up.
    HangUp { after: u64 },
    /// Waits for the whole answer and checks the text.
    Plain,
    /// Sends broken JSON.
    Malformed,
    /// Sends a parameter out of range.
    Invalid,
    /// Sends a body over the size limit.
    Oversized,
}

async fn run_client(s: &TestServer, i: u64, client: Client, priority: &str) -> Result<(), String> {
    let prompt = format!("soak request {i}");
    let max_tokens = 8 + (i % 24) as usize;
    let body = |stream: bool| {
        json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
               "stream": stream, "priority": priority})
    };
    let url = s.url("/v1/completions");
    match client {
        Client::Stream => {
            let resp = s.client.post(&url).json(&body(true)).send().await;
            let resp = resp.map_err(|e| format!("{i}: {e}"))?;
            if resp.status() != 200 {
                return Err(format!("{i}: stream refused with {}", resp.status()));
            }
            let events = SseReader::new(resp).all().await;
            let (last, chunks) = events.split_last().ok_or(format!("{i}: empty stream"))?;
            if last != "[DONE]" {
                return Err(format!("{i}: stream did not end with [DONE]: {last}"));
            }
            let text: String = chunks
                .iter()
                .map(|c| serde_json::from_str::<Value>(c).unwrap())
                .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_owned))
                .collect();
            if text != expected_text(&prompt, max_tokens) {
                return Err(format!("{i}: streamed text differs from running alone"));
            }
        }
        Client::HangUp { after } => {
            let resp = s.client.post(&url).json(&body(true)).send().await;
            let mut reader = SseReader::new(resp.map_err(|e| format!("{i}: {e}"))?);
            for _ in 0..after {
                if reader.next().await.is_none() {
                    break;
                }
            }
            drop(reader);
        }
        Client::Plain => {
            let (status, _, v) = s.post("/v1/completions", &body(false)).await;
            if status != 200 {
                return Err(format!("{i}: plain request failed with {status}: {v}"));
            }
            if v["choices"][0]["text"] != expected_text(&prompt, max_tokens) {
                return Err(format!("{i}: text differs from running alone"));
            }
        }
        Client::Malformed => {
            let resp = s
                .client
                .post(&url)
                .header("content-type", "application/json")
                .body("{\"model\": ")
                .send()
                .await
                .map_err(|e| format!("{i}: {e}"))?;
            expect_error(i, resp, 400).await?;
        }
        Client::Invalid => {
            let mut b = body(false);
            b["temperature"] = json!(7.5);
            let resp = s.client.post(&url).json(&b).send().await;
            expect_error(i, resp.map_err(|e| format!("{i}: {e}"))?, 400).await?;
        }
        Client::Oversized => {
            let mut b = body(false);
            b["prompt"] = json!("x".repeat(server::openai::extract::DEFAULT_BODY_LIMIT + 1));
            let resp = s.client.post(&url).json(&b).send().await;
            expect_error(i, resp.map_err(|e| format!("{i}: {e}"))?, 413).await?;
        }
    }
    Ok(())
}

/// Checks the status and OpenAI's error shape.
async fn expect_error(i: u64, resp: reqwest::Response, status: u16) -> Result<(), String> {
    let got = resp.status().as_u16();
    let v: Value = resp.json().await.map_err(|e| format!("{i}: {e}"))?;
    if got != status || !v["error"]["message"].is_string() {
        return Err(format!(
            "{i}: expected {status} with an error body, got {got}: {v}"
        ));
    }
    Ok(())
}

/// The kinds of client in one round, drawn from `rng`.
fn draw_round(rng: &mut Lcg) -> Vec<(Client, &'static str)> {
    (0..REQUESTS_PER_ROUND)
        .map(|_| {
            let client = match rng.below(10) {
                0..=3 => Client::Stream,
                4..=5 => Client::HangUp {
                    after: rng.below(6),
                },
                6..=7 => Client::Plain,
                8 => [Client::Malformed, Client::Invalid][rng.below(2) as usize],
                _ => Client::Oversized,
            };
            (client, ["high", "normal", "low"][rng.below(3) as usize])
        })
        .collect()
}

/// Whether a client's request is well-formed, so that the engine runs it.
fn reaches_engine(client: Client) -> bool {
    matches!(
        client,
        Client::Stream | Client::HangUp { .. } | Client::Plain
    )
}

/// Runs one round at once and returns every client's failure.
async fn run_round(
    s: &std::sync::Arc<TestServer>,
    round: u64,
    clients: &[(Client, &'static str)],
) -> Vec<String> {
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(k, &(client, priority))| {
            let s = s.clone();
            let i = round * REQUESTS_PER_ROUND + k as u64;
            tokio::spawn(async move { run_client(&s, i, client, priority).await })
        })
        .collect();
    let results = tokio::time::timeout(Duration::from_secs(240), futures::future::join_all(tasks))
        .await
        .expect("the soak is bounded in time");
    results
        .into_iter()
        .map(|r| r.expect("no client task panics"))
        .filter_map(Result::err)
        .collect()
}

/// The live heap once the server is idle and has settled: connection tasks
/// end a moment after their client hangs up, so this waits until two
/// readings 50 ms apart agree to within 4 KiB.
async fn settled_live_bytes(s: &TestServer) -> isize {
    s.wait_idle().await;
    // Rendering folds the histogram samples gathered since the last upkeep.
    let _ = s.get_text("/metrics").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = LIVE_BYTES.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = LIVE_BYTES.load(Ordering::Relaxed);
        if (now - last).abs() < 4096 || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// The sum of a Prometheus counter over all its label sets.
fn counter_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_survives_a_burst_of_mixed_and_faulty_clients() {
    let mut server = TestServer::start(Options::default()).await;
    // No kept-alive connections: idle ones would hold buffers on both sides
    // and blur the heap comparison between rounds.
    server.client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let s = std::sync::Arc::new(server);
    let mut rng = Lcg(0x5eed);
    let mut well_formed = 0;
    let mut heap = Vec::new();
    for round in 0..ROUNDS {
        let clients = draw_round(&mut rng);
        well_formed += clients.iter().filter(|(c, _)| reaches_engine(*c)).count();
        let failures = run_round(&s, round, &clients).await;
        assert!(
            failures.is_empty(),
            "round {round}: {} failures: {failures:#?}",
            failures.len()
        );
        heap.push(settled_live_bytes(&s).await);
    }

    // Nothing leaks and the server still answers.
    let stats = s.control.stats();
    assert_eq!(
        stats.live_sequences, 0,
        "every backend sequence was released"
    );
    assert!(stats.violations.is_empty(), "{:?}", stats.violations);
    let health = s.health().await;
    assert_eq!(health["status"], "ok", "{health}");
    let (status, v) = s.get_json("/v1/models").await;
    assert_eq!(status, 200, "{v}");

    // Each well-formed request finished exactly once: none was lost, none
    // was served twice. The other ones never reached the engine.
    let metrics = s.get_text("/metrics").await;
    let finished = counter_sum(&metrics, "mlx_batch_requests_finished_total");
    assert_eq!(finished, well_formed as f64, "{metrics}");

    // The heap is flat: what the first round built (pools, tables, metric
    // sketches) is reused by the others.
    let growth = heap[heap.len() - 1] - heap[0];
    eprintln!("soak: live heap after each round: {heap:?} bytes, growth {growth} bytes");
    assert!(
        growth < HEAP_GROWTH_LIMIT,
        "the live heap grew by {growth} bytes over {} rounds of {REQUESTS_PER_ROUND} requests: {heap:?}",
        ROUNDS - 1
    );
}
