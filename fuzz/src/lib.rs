//! The fuzz harness for the OpenAI request path: body limit, JSON parsing, parameter
//! validation, chat templating, generation and the response encoders.
//!
//! Each input is one HTTP request sent through the real router, in process,
//! over the real scheduler and the simulated backend in virtual time, so an
//! input runs in microseconds and a crash is replayed exactly. The design
//! decision is to fuzz the whole handler rather than the parser alone: the
//! contract a user sees is the response, and what must never happen is a
//! panic, a hang, a 5xx or an error that is not OpenAI-shaped.
//!
//! The harness is a library so that the committed seeds and every crash
//! ever found are replayed by `cargo test -p mlx-batch-fuzz` on stable Rust
//! (a step of `cargo xtask ci`); the `cargo fuzz` target is one line over
//! it. Test it alone, not with `--workspace`: a workspace build turns on
//! the server's `mlx` feature, and this crate sets no rpath to libmlx.
//!
//! Input layout: the first byte picks the route (bit 0) and whether the next
//! bytes, up to a NUL, are an `x-priority` header (bit 1); the rest is the
//! body.

// A panic is how a fuzz harness reports a broken contract.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::{Arc, OnceLock};

use axum::{
    body::Body,
    http::{header, HeaderValue, Request, StatusCode},
    Router,
};
use batching_scheduler::{SchedulerConfig, SchedulerHandle};
use batching_types::SystemClock;
use http_body_util::BodyExt;
use serde_json::Value;
use server::{
    app::{router, AppState, ServerConfig},
    byte_model::ByteTextModel,
    prepare::PRIORITY_HEADER,
    scheduler_service::SchedulerService,
    telemetry,
};
use sim_backend::{SimBackend, SimConfig, StopRule, TimeMode};

/// The served model's id; bodies that name another get a 404.
const MODEL: &str = "sim-byte";
/// A small context, so that the context checks are reachable.
const MAX_CONTEXT: usize = 512;
/// A small body limit, so that the 413 path is reachable with short inputs.
const BODY_LIMIT: usize = 2048;

/// The router and the runtime, built once per process.
struct Harness {
    runtime: tokio::runtime::Runtime,
    router: Router,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let sim = SimConfig {
            kv_tokens: 8192,
            max_context: MAX_CONTEXT,
            vocab: 128,
            // The byte model's end-of-sequence id, so that grammars
            // (`response_format`, tool choices) can finish.
            stop: Some(StopRule {
                token: 256,
                one_in: 1000,
            }),
            time: TimeMode::Virtual,
            ..SimConfig::default()
        };
        let backend = SimBackend::new(sim.clone()).expect("a valid simulated backend");
        let scheduler =
            SchedulerHandle::spawn(SchedulerConfig::default(), SystemClock, move || Ok(backend))
                .expect("the engine thread starts");
        let engine = SchedulerService::new(scheduler, sim.kv_tokens);
        let model = ByteTextModel::new(MODEL, MAX_CONTEXT, vec![256]);
        let state = AppState::new(
            Arc::new(engine),
            Arc::new(model),
            telemetry::prometheus().expect("the metrics recorder installs"),
            ServerConfig {
                request_timeout: None,
                body_limit: BODY_LIMIT,
                ..ServerConfig::default()
            },
        );
        Harness {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
            router: router(state),
        }
    })
}

/// Splits an input into the route, an optional priority header and a body;
/// returns the request and its body.
fn request(data: &[u8]) -> Option<(Request<Body>, &[u8])> {
    let (&flags, mut rest) = data.split_first()?;
    let path = if flags & 1 == 0 {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let mut builder = Request::post(path).header(header::CONTENT_TYPE, "application/json");
    if flags & 2 != 0 {
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        // A value that HTTP itself forbids never reaches a server.
        if let Ok(value) = HeaderValue::from_bytes(&rest[..end]) {
            builder = builder.header(PRIORITY_HEADER, value);
        }
        rest = rest.get(end + 1..).unwrap_or_default();
    }
    let req = builder.body(Body::from(rest.to_vec())).ok()?;
    Some((req, rest))
}

/// The output-token limit the body asks for, when it is readable.
fn requested_max_tokens(body: &[u8]) -> Option<u64> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("max_completion_tokens")
        .or_else(|| v.get("max_tokens"))?
        .as_u64()
}

/// Checks an error body: OpenAI's shape, with a message a person can read.
fn check_error(status: StatusCode, body: &[u8]) {
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{status}: the error body is not JSON ({e})"));
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{status}: no error message: {v}");
    assert!(
        v["error"]["type"].is_string(),
        "{status}: no error type: {v}"
    );
}

/// Checks a stream: JSON events, then `[DONE]`, and nothing after it.
fn check_stream(body: &[u8]) {
    let text = std::str::from_utf8(body).expect("a stream is UTF-8");
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    let (last, chunks) = events.split_last().expect("a stream has events");
    assert_eq!(*last, "data: [DONE]", "the stream ends with [DONE]");
    for chunk in chunks {
        let payload = chunk.strip_prefix("data: ").expect("every event is data");
        let v: Value = serde_json::from_str(payload).expect("every chunk is JSON");
        assert!(v.get("error").is_none(), "no error inside a stream: {v}");
    }
}

/// Checks a whole answer against the limit the request gave.
fn check_answer(body: &[u8], max_tokens: Option<u64>) {
    let v: Value = serde_json::from_slice(body).expect("an answer is JSON");
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(1), "{v}");
    let generated = v["usage"]["completion_tokens"]
        .as_u64()
        .expect("usage counts the output");
    if let Some(max) = max_tokens {
        assert!(generated <= max, "{generated} tokens over max {max}");
    }
}

/// Sends one fuzz input through the router and checks the response; panics
/// when the server breaks its contract. Returns the status, or `None` when
/// the input is too short to be a request.
pub fn run_one(data: &[u8]) -> Option<StatusCode> {
    let (req, body_sent) = request(data)?;
    let max_tokens = requested_max_tokens(body_sent);
    let h = harness();
    let status = h.runtime.block_on(async {
        let response = tower::ServiceExt::oneshot(h.router.clone(), req)
            .await
            .expect("the router is infallible");
        let status = response.status();
        let streaming = response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let body = response
            .into_body()
            .collect()
            .await
            .expect("the response body completes")
            .to_bytes();
        assert!(
            !status.is_server_error(),
            "{status} for {:?}: {}",
            String::from_utf8_lossy(body_sent),
            String::from_utf8_lossy(&body)
        );
        if !status.is_success() {
            check_error(status, &body);
        } else if streaming {
            check_stream(&body);
        } else {
            check_answer(&body, max_tokens);
        }
        status
    });
    Some(status)
}
