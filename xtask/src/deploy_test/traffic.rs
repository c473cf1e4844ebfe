//! The requests the test sends through the proxy: chat completions, whole
//! or streamed, with the headers whose passage through HAProxy it checks.

use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, CONTENT_TYPE};
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// The header that names the replica which answered (set by
/// deploy/haproxy.cfg).
pub const REPLICA_HEADER: &str = "x-mlx-batch-replica";
/// The request id header HAProxy sets when a client sent none.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// The priority header the replicas read.
pub const PRIORITY_HEADER: &str = "x-priority";

/// One chat completion to send.
#[derive(Debug, Clone)]
pub struct Chat {
    /// The server's base URL (the proxy's, or a replica's).
    pub base: String,
    /// The `model` field.
    pub model: String,
    /// The user message.
    pub prompt: String,
    /// `max_tokens`.
    pub max_tokens: u32,
    /// An x-request-id to send, if any.
    pub request_id: Option<String>,
    /// An x-priority to send, if any.
    pub priority: Option<&'static str>,
    /// Pads the JSON body with trailing spaces to this many bytes, so that
    /// it only fits in a buffer as large as the proxy's `tune.bufsize`.
    pub pad_to: usize,
}

impl Chat {
    fn request(&self, http: &reqwest::Client, stream: bool) -> reqwest::RequestBuilder {
        let mut body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompt}],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "stream": stream,
        })
        .to_string();
        // JSON allows whitespace after the value, so the padding changes the
        // size and nothing else.
        let pad = self.pad_to.saturating_sub(body.len());
        body.extend(std::iter::repeat_n(' ', pad));
        let mut request = http
            .post(format!("{}/v1/chat/completions", self.base))
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(id) = &self.request_id {
            request = request.header(REQUEST_ID_HEADER, id);
        }
        if let Some(priority) = self.priority {
            request = request.header(PRIORITY_HEADER, priority);
        }
        request
    }
}

/// A whole answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// The replica that answered, from [`REPLICA_HEADER`].
    pub replica: Option<String>,
    /// The x-request-id of the response, if the server echoed one.
    pub request_id: Option<String>,
    /// The generated text.
    pub text: String,
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Sends `chat` without streaming; an `Err` is a transport failure or a
/// timeout, an HTTP error is a [`Reply`] with its status.
pub async fn complete(
    http: &reqwest::Client,
    chat: &Chat,
    timeout: Duration,
) -> Result<Reply, String> {
    let sent = async {
        let response = chat
            .request(http, false)
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status().as_u16();
        let replica = header(response.headers(), REPLICA_HEADER);
        let request_id = header(response.headers(), REQUEST_ID_HEADER);
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("reading the body failed: {e}"))?;
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let text = value["choices"][0]["message"]["content"]
            .as_str()
            .map_or_else(
                || String::from_utf8_lossy(&body).into_owned(),
                str::to_owned,
            );
        Ok(Reply {
            status,
            replica,
            request_id,
            text,
        })
    };
    tokio::time::timeout(timeout, sent)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// It ended with `data: [DONE]`.
    Finished,
    /// The response was not a 200.
    Refused(u16),
    /// The connection broke or closed before `[DONE]`: the client sees an
    /// error.
    Broken(String),
    /// Nothing arrived for the idle limit: a hang.
    Hung,
}

/// What happened to one stream.
#[derive(Debug, Clone)]
pub struct StreamOutcome {
    /// Its x-request-id.
    pub request_id: String,
    /// The replica that answered.
    pub replica: Option<String>,
    /// Chunks that carried text.
    pub text_chunks: usize,
    /// How it ended.
    pub end: StreamEnd,
    /// When it ended.
    pub ended: Instant,
}

/// Sends `chat` as a stream and reads it to its end. The first chunk with
/// text sends the replica's name on `started`, so the caller knows the
/// stream is under way and where.
pub async fn stream(
    http: reqwest::Client,
    chat: Chat,
    started: oneshot::Sender<Option<String>>,
    idle_limit: Duration,
) -> StreamOutcome {
    let request_id = chat.request_id.clone().unwrap_or_default();
    let mut outcome = StreamOutcome {
        request_id,
        replica: None,
        text_chunks: 0,
        end: StreamEnd::Hung,
        ended: Instant::now(),
    };
    outcome.end = read_stream(&http, &chat, started, idle_limit, &mut outcome).await;
    outcome.ended = Instant::now();
    outcome
}

async fn read_stream(
    http: &reqwest::Client,
    chat: &Chat,
    started: oneshot::Sender<Option<String>>,
    idle_limit: Duration,
    outcome: &mut StreamOutcome,
) -> StreamEnd {
    let mut started = Some(started);
    let sent = tokio::time::timeout(idle_limit, chat.request(http, true).send()).await;
    let mut response = match sent {
        Err(_) => return StreamEnd::Hung,
        Ok(Err(e)) => return StreamEnd::Broken(format!("request failed: {e}")),
        Ok(Ok(response)) => response,
    };
    outcome.replica = header(response.headers(), REPLICA_HEADER);
    if response.status() != reqwest::StatusCode::OK {
        return StreamEnd::Refused(response.status().as_u16());
    }
    let mut pending = String::new();
    let mut done = false;
    loop {
        let chunk = match tokio::time::timeout(idle_limit, response.chunk()).await {
            Err(_) => return StreamEnd::Hung,
            Ok(Err(e)) => return StreamEnd::Broken(error_chain(&e)),
            Ok(Ok(None)) if done => return StreamEnd::Finished,
            Ok(Ok(None)) => return StreamEnd::Broken("the body ended before [DONE]".to_owned()),
            Ok(Ok(Some(chunk))) => chunk,
        };
        pending.push_str(&String::from_utf8_lossy(&chunk));
        // Server-sent events are lines; a chunk may end inside one.
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let value: Value = serde_json::from_str(data).unwrap_or(Value::Null);
            let text = value["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default();
            if !text.is_empty() {
                outcome.text_chunks += 1;
                if let Some(tx) = started.take() {
                    let _ = tx.send(outcome.replica.clone());
                }
            }
        }
    }
}

/// An error with its causes, which is where reqwest says what broke.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
