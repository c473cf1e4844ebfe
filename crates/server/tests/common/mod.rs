//! A real server on 127.0.0.1:0 over the scheduler and the simulated
//! backend, with a byte-level text model, and helpers to talk to it.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::{sync::Arc, time::Duration};

use batching_scheduler::{SchedulerConfig, SchedulerHandle};
use batching_types::SystemClock;
use futures::StreamExt;
use serde_json::Value;
use server::{
    app::{AppState, ServerConfig},
    byte_model::ByteTextModel,
    scheduler_service::SchedulerService,
    telemetry,
};
use sim_backend::{SimBackend, SimConfig, SimControl, StopRule, TimeMode};

/// The model id the test server serves.
pub const MODEL: &str = "sim-byte";
/// Sampled tokens are bytes below this, so every answer is ASCII.
pub const VOCAB: u32 = 128;
/// The end-of-sequence token of the byte model (not a byte).
pub const EOS: u32 = 256;
/// The simulated model's context.
pub const MAX_CONTEXT: usize = 512;

/// How to build a test server.
pub struct Options {
    pub sim: SimConfig,
    pub scheduler: SchedulerConfig,
    pub server: ServerConfig,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            sim: SimConfig {
                step_cost: Duration::from_millis(1),
                prefill_token_cost: Duration::ZERO,
                decode_token_cost: Duration::ZERO,
                kv_tokens: 4096,
                max_context: MAX_CONTEXT,
                vocab: VOCAB,
                stop: None,
                time: TimeMode::Sleep,
            },
            scheduler: SchedulerConfig::default(),
            server: ServerConfig::default(),
        }
    }
}

impl Options {
    /// A backend that stops on [`EOS`] about once in `one_in` tokens.
    pub fn with_eos(mut self, one_in: u32) -> Self {
        self.sim.stop = Some(StopRule { token: EOS, one_in });
        self
    }

    /// One sequence at a time, with `step` per token: easy to saturate.
    pub fn serial(mut self, step: Duration) -> Self {
        self.scheduler.max_batch_size = 1;
        self.sim.step_cost = step;
        self
    }
}

/// A running test server.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub control: SimControl,
    pub scheduler: SchedulerHandle,
    pub sim: SimConfig,
    _server: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(options: Options) -> Self {
        let sim = options.sim.clone();
        let backend = SimBackend::new(sim.clone()).unwrap();
        let control = backend.control();
        let scheduler =
            SchedulerHandle::spawn(options.scheduler, SystemClock, move || Ok(backend)).unwrap();
        let engine = SchedulerService::new(scheduler.clone(), sim.kv_tokens);
        let model = ByteTextModel::new(MODEL, MAX_CONTEXT, vec![EOS]);
        let state = AppState::new(
            Arc::new(engine),
            Arc::new(model),
            telemetry::prometheus().unwrap(),
            options.server,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            server::app::serve(listener, state, std::future::pending())
                .await
                .unwrap();
        });
        Self {
            base,
            client: reqwest::Client::new(),
            control,
            scheduler,
            sim,
            _server: server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs `body` as JSON and returns the status, headers and JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
        let resp = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status, headers, json)
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = self.client.get(self.url(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    /// GETs `path` and returns its body as text.
    pub async fn get_text(&self, path: &str) -> String {
        let resp = self.client.get(self.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "GET {path}");
        resp.text().await.unwrap()
    }

    pub async fn health(&self) -> Value {
        self.get_json("/health").await.1
    }

    /// Waits until the engine holds no request and no KV block.
    pub async fn wait_idle(&self) {
        for _ in 0..400 {
            let h = self.health().await;
            if h["engine"]["running"] == 0
                && h["engine"]["kv_blocks_used"] == 0
                && h["engine"]["waiting"] == 0
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the engine never became idle: {}", self.health().await);
    }

    /// Sends a streaming request and returns the open response.
    pub async fn open_stream(&self, path: &str, body: &Value) -> reqwest::Response {
        let resp = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "stream refused");
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        resp
    }
}

/// Reads server-sent events from a response, one payload at a time.
pub struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes_like::Bytes>>,
    buffer: String,
}

/// reqwest's chunk type, named without a direct `bytes` dependency.
pub mod bytes_like {
    pub type Bytes = axum::body::Bytes;
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> Self {
        Self {
            body: resp.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next `data:` payload, or `None` at the end of the body.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                let payload = event
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not an SSE data line: {event:?}"));
                return Some(payload.trim_end().to_owned());
            }
            match self.body.next().await {
                Some(chunk) => self
                    .buffer
                    .push_str(std::str::from_utf8(&chunk.unwrap()).unwrap()),
                None => {
                    assert!(self.buffer.is_empty(), "trailing bytes: {:?}", self.buffer);
                    return None;
                }
            }
        }
    }

    /// Every remaining payload.
    pub async fn all(mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(p) = self.next().await {
            out.push(p);
        }
        out
    }
}

/// The text the simulated backend generates for `prompt` when it runs
/// alone, greedy, with no stop rule: its tokens are bytes below [`VOCAB`].
pub fn expected_text(prompt: &str, max_tokens: usize) -> String {
    let tokens: Vec<u32> = prompt.bytes().map(u32::from).collect();
    let out = sim_backend::tokens::expected_tokens(&tokens, None, max_tokens, VOCAB, None);
    out.into_iter()
        .map(|t| char::from(u8::try_from(t).unwrap()))
        .collect()
}

/// The ChatML prompt the byte model builds for one user message.
pub fn chat_prompt(user: &str) -> String {
    format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
}
