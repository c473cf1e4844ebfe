//! A tiny OpenAI-style SSE server for the tests, on 127.0.0.1:0.
//!
//! The `model` field picks its behaviour, so one server covers every case:
//! `ok` streams `max_tokens` tokens (first after `FIRST_MS`, then one every
//! `GAP_MS`) with usage; `nousage` does the same without usage; `fail500`
//! answers HTTP 500; `malformed` sends two tokens then broken JSON;
//! `disconnect` sends two tokens then drops the connection; `stall` sends one
//! token and then nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use futures::StreamExt;
use serde_json::{json, Value};

/// Delay before the first token.
pub const FIRST_MS: u64 = 60;
/// Delay between tokens.
pub const GAP_MS: u64 = 15;

/// What the fake server saw.
#[derive(Default)]
pub struct Seen {
    /// Every request body, in arrival order.
    pub bodies: Mutex<Vec<Value>>,
    /// Requests streaming right now.
    pub in_flight: AtomicUsize,
    /// The most requests that streamed at once.
    pub max_in_flight: AtomicUsize,
}

/// Decrements the in-flight count when the response stream is dropped.
struct InFlight(Arc<Seen>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

enum Item {
    Data(String),
    Sleep(u64),
    Break,
}

fn chunk(chat: bool, text: &str, finish: Option<&str>) -> String {
    let v = if chat {
        json!({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})
    } else {
        json!({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})
    };
    v.to_string()
}

async fn handle(State(seen): State<Arc<Seen>>, chat: bool, Json(body): Json<Value>) -> Response {
    seen.bodies.lock().unwrap().push(body.clone());
    let model = body["model"].as_str().unwrap_or("ok").to_owned();
    let n = body["max_tokens"].as_u64().unwrap_or(4);
    if model == "fail500" {
        return (StatusCode::INTERNAL_SERVER_ERROR, "boom: out of memory").into_response();
    }
    let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    seen.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let guard = InFlight(seen.clone());

    let mut items = Vec::new();
    if chat {
        // Real servers open with a role-only chunk that carries no text.
        items.push(Item::Data(
            json!({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": null}]}).to_string(),
        ));
    }
    items.push(Item::Sleep(FIRST_MS));
    let tokens = match model.as_str() {
        "malformed" | "disconnect" => 2,
        "stall" => 1,
        _ => n,
    };
    for i in 0..tokens {
        if i > 0 {
            items.push(Item::Sleep(GAP_MS));
        }
        items.push(Item::Data(chunk(chat, " tok", None)));
    }
    match model.as_str() {
        "malformed" => items.push(Item::Data("{not json".to_owned())),
        "disconnect" => {
            // The pause lets the last token leave the server's write buffer
            // before the connection is dropped.
            items.push(Item::Sleep(GAP_MS));
            items.push(Item::Break);
        }
        "stall" => items.push(Item::Sleep(60_000)),
        _ => {
            items.push(Item::Data(chunk(chat, "", Some("length"))));
            if model != "nousage" {
                items.push(Item::Data(
                    json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}})
                        .to_string(),
                ));
            }
            items.push(Item::Data("[DONE]".to_owned()));
        }
    }
    let stream = futures::stream::iter(items).then(move |item| {
        let _keep = &guard;
        async move {
            match item {
                Item::Sleep(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(Bytes::new())
                }
                Item::Data(d) => Ok::<Bytes, std::io::Error>(Bytes::from(format!("data: {d}\n\n"))),
                Item::Break => Err(std::io::Error::other("dropped on purpose")),
            }
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// Starts the fake server and returns its base URL and what it records.
pub async fn start() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(|s: State<Arc<Seen>>, b: Json<Value>| handle(s, true, b)),
        )
        .route(
            "/v1/completions",
            post(|s: State<Arc<Seen>>, b: Json<Value>| handle(s, false, b)),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), seen)
}
