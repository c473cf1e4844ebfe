//! A bounded soak and fault test over real HTTP on loopback: hundreds of
//! concurrent requests with random priorities, clients that hang up
//! mid-stream, and malformed, invalid and oversized requests mixed in. It
//! checks that the server stays up, that every well-formed request either
//! completes with exactly the tokens it would get alone or fails with a
//! proper error, and that nothing leaks: running requests, waiting requests,
//! KV blocks and backend sequences all return to zero.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{expected_text, Options, SseReader, TestServer, MODEL};
use serde_json::{json, Value};

/// How many requests the soak sends, all at once.
const REQUESTS: u64 = 300;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_survives_a_burst_of_mixed_and_faulty_clients() {
    let s = std::sync::Arc::new(TestServer::start(Options::default()).await);
    let mut rng = Lcg(0x5eed);
    let mut tasks = Vec::new();
    for i in 0..REQUESTS {
        let client = match rng.below(10) {
            0..=3 => Client::Stream,
            4..=5 => Client::HangUp {
                after: rng.below(6),
            },
            6..=7 => Client::Plain,
            8 => [Client::Malformed, Client::Invalid][rng.below(2) as usize],
            _ => Client::Oversized,
        };
        let priority = ["high", "normal", "low"][rng.below(3) as usize];
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            run_client(&s, i, client, priority).await
        }));
    }
    let all = futures::future::join_all(tasks);
    let results = tokio::time::timeout(Duration::from_secs(240), all)
        .await
        .expect("the soak is bounded in time");
    let failures: Vec<String> = results
        .into_iter()
        .map(|r| r.expect("no client task panics"))
        .filter_map(Result::err)
        .collect();
    assert!(
        failures.is_empty(),
        "{} failures: {failures:#?}",
        failures.len()
    );

    // Nothing leaks and the server still answers.
    s.wait_idle().await;
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
}
