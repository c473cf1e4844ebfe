//! The real server at its limits: more slow clients than it has file
//! descriptors, and less memory than its work wants.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod default_model;
mod real;

use std::time::{Duration, Instant};

use default_model::model_or_skip;
use real::{counter, raise_own_file_limit, RealServer};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The file limit a common default gives (macOS's is lower still).
const FILE_LIMIT: u64 = 1024;
/// More slow connections than the server has descriptors.
const SLOW: usize = 1100;
/// The server's body deadline in this test.
const BODY_TIMEOUT: Duration = Duration::from_secs(3);

/// Opens a connection that sends its headers, then trickles its body one
/// byte every half second; returns whether the server closed it (rather
/// than the trickle ending first) and when.
async fn slow_client(addr: String, started: Instant) -> Option<Duration> {
    let mut stream = TcpStream::connect(&addr).await.ok()?;
    let head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n";
    if stream.write_all(head.as_bytes()).await.is_err() {
        return Some(started.elapsed());
    }
    let mut buf = [0u8; 512];
    for _ in 0..60 {
        if stream.write_all(b" ").await.is_err() {
            return Some(started.elapsed());
        }
        // The server closing shows up as a readable end of stream (after
        // any 408 it sent).
        match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {
                // The 408 answer: keep reading until the close.
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await
                {
                    if n == 0 {
                        break;
                    }
                }
                return Some(started.elapsed());
            }
            Err(_) => {}
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_slow_clients_than_file_descriptors_cannot_lock_out_normal_requests() {
    if model_or_skip().is_none() {
        return;
    }
    let own = raise_own_file_limit();
    assert!(
        own > SLOW as u64 + 100,
        "the test needs {SLOW} sockets, has {own}"
    );
    let server = RealServer::start(
        &[
            "--body-read-timeout",
            "3s",
            "--header-read-timeout",
            "3s",
            "--keep-alive-timeout",
            "2s",
        ],
        Some(FILE_LIMIT),
    )
    .await;
    let idle_fds = server.open_fds();
    let started = Instant::now();
    let slow: Vec<_> = (0..SLOW)
        .map(|_| tokio::spawn(slow_client(server.addr.clone(), started)))
        .collect();
    // Normal requests, one every 200 ms, from when the slow clients have
    // had time to connect, until one succeeds.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = server.open_fds().saturating_sub(idle_fds);
    let saturated_at = started.elapsed();
    eprintln!("the slow clients hold {held} connections");
    let normal = json!({"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 2});
    let mut served_after = None;
    let mut refused = 0;
    while started.elapsed() < Duration::from_secs(30) {
        let attempt = server
            .client
            .post(server.url("/v1/completions"))
            .json(&normal)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match attempt {
            Ok(resp) if resp.status() == 200 => {
                served_after = Some(started.elapsed());
                break;
            }
            _ => refused += 1,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let served_after = served_after.expect("no normal request was served within 30 s");
    let total = slow.len();
    let mut closed = 0;
    let mut early = 0;
    let mut last_close = Duration::ZERO;
    for task in slow {
        if let Some(at) = task.await.unwrap() {
            closed += 1;
            early += usize::from(at < Duration::from_secs(2));
            last_close = last_close.max(at);
        }
    }
    eprintln!("{early} slow connections were closed within 2 s (refused at the cap)");
    assert!(early > 0, "connections beyond the cap are refused at once");
    eprintln!(
        "slow clients: {SLOW} under a file limit of {FILE_LIMIT}; {closed} closed by the server, the last after {:.1} s; \
         {refused} normal attempts refused, the first served after {:.1} s",
        last_close.as_secs_f64(),
        served_after.as_secs_f64()
    );
    assert_eq!(
        closed, total,
        "every slow connection is closed by the server"
    );
    assert!(
        served_after < saturated_at + BODY_TIMEOUT + Duration::from_secs(5),
        "normal requests are served again within the read timeout plus a few seconds: {served_after:?}"
    );
    // Nothing leaks: descriptors and KV blocks go back to idle.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.open_fds() > idle_fds + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        server.open_fds() <= idle_fds + 2,
        "file descriptors: {} now, {idle_fds} before",
        server.open_fds()
    );
    server.wait_idle().await;
    let (status, _) = server.health().await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_small_memory_limit_work_waits_or_gets_503_and_none_is_lost() {
    if model_or_skip().is_none() {
        return;
    }
    const MIB: u64 = 1 << 20;
    let kv = 64 * MIB;
    // What the weights take, read off a server with room to spare.
    let weights = {
        let probe = RealServer::start(&["--kv-memory", "64MiB"], None).await;
        let body = json!({"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 1});
        let resp = probe
            .client
            .post(probe.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        // The gauges are published when the step has ended, which may be a
        // moment after the answer.
        let mut m = probe.metrics().await;
        for _ in 0..100 {
            if counter(&m, "mlx_batch_memory_active_bytes", "") > 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            m = probe.metrics().await;
        }
        let active = counter(&m, "mlx_batch_memory_active_bytes", "") as u64;
        let pool = counter(&m, "mlx_batch_kv_pool_bytes", "") as u64;
        assert!(active > pool, "no memory figures in:\n{m}");
        active - pool
    };
    // Room for a step of a few hundred tokens, not for a dozen prompts'
    // chunks at once.
    let limit = weights + kv + 48 * MIB;
    let limit_arg = format!("{}MiB", limit.div_ceil(MIB));
    let server = RealServer::start(
        &["--kv-memory", "64MiB", "--memory-limit", &limit_arg],
        None,
    )
    .await;
    let prompt = "the quick brown fox jumps over the lazy dog ".repeat(30);
    let sent = 12;
    let mut tasks = Vec::new();
    for i in 0..sent {
        let client = server.client.clone();
        let url = server.url("/v1/completions");
        let body = json!({
            "model": "SmolLM2-135M-Instruct",
            "prompt": format!("{i} {prompt}"),
            "max_tokens": 8,
        });
        tasks.push(tokio::spawn(async move {
            // A client that honours 503 + Retry-After, as the official
            // clients do.
            let mut shed = 0;
            loop {
                let resp = client.post(&url).json(&body).send().await.unwrap();
                let status = resp.status().as_u16();
                if status == 503 {
                    assert!(resp.headers().contains_key("retry-after"));
                    shed += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                let answer: serde_json::Value = resp.json().await.unwrap();
                return (status, answer, shed);
            }
        }));
    }
    let mut retried = 0;
    for task in tasks {
        let (status, answer, shed) = task.await.unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["usage"]["completion_tokens"], 8, "{answer}");
        retried += shed;
    }
    let m = server.metrics().await;
    let oom = counter(
        &m,
        "mlx_batch_step_failures_total",
        "kind=\"out_of_memory\"",
    );
    let errors = counter(&m, "mlx_batch_request_failures_total", "");
    eprintln!(
        "memory limit {limit_arg} (weights {} MiB + KV 64 MiB + 48 MiB): {sent} requests served, steps refused for memory: {oom}, submissions shed with 503: {retried}",
        weights / MIB
    );
    assert!(
        oom >= 1.0,
        "the limit was never reached; the test proves nothing:\n{m}"
    );
    assert_eq!(errors, 0.0, "no request failed");
    server.wait_idle().await;
    let (status, health) = server.health().await;
    assert_eq!(status, 200, "{health}");
    assert!(
        server.status_kib("VmRSS:") * 1024 < limit + 256 * MIB,
        "RSS {} KiB against a limit of {limit_arg}",
        server.status_kib("VmRSS:")
    );
}
