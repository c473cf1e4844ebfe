//! Sends one streaming request and times what comes back.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use crate::{sse::SseParser, workload::RequestSpec, RequestRecord};

/// Which OpenAI-compatible route to call.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `POST /v1/chat/completions` with one user message.
    Chat,
    /// `POST /v1/completions` with a plain prompt.
    Completions,
}

/// Where requests go.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server's base URL, such as `http://127.0.0.1:8080`.
    pub base_url: String,
    /// The `model` field; omitted when `None`.
    pub model: Option<String>,
    /// The route.
    pub endpoint: Endpoint,
}

impl Target {
    /// The full URL of the route.
    pub fn url(&self) -> String {
        let base = self.base_url.trim_end_matches('/');
        let base = base.strip_suffix("/v1").unwrap_or(base);
        match self.endpoint {
            Endpoint::Chat => format!("{base}/v1/chat/completions"),
            Endpoint::Completions => format!("{base}/v1/completions"),
        }
    }

    /// The JSON body for `spec`: greedy, streaming, with usage requested.
    pub fn body(&self, spec: &RequestSpec) -> Value {
        let mut body = json!({
            "max_tokens": spec.max_tokens,
            "temperature": 0.0,
            "stream": true,
            "stream_options": { "include_usage": true },
        });
        match self.endpoint {
            Endpoint::Chat => {
                body["messages"] = match &spec.messages {
                    Some(history) => history
                        .iter()
                        .map(|(role, content)| json!({ "role": role, "content": content }))
                        .collect(),
                    None => json!([{ "role": "user", "content": spec.prompt }]),
                };
            }
            Endpoint::Completions => body["prompt"] = json!(spec.prompt),
        }
        if let Some(model) = &self.model {
            body["model"] = json!(model);
        }
        if let Some(p) = spec.priority {
            body["priority"] = json!(p.as_str());
        }
        body
    }
}

/// The longest error body kept in a record.
const MAX_ERROR_CHARS: usize = 300;

/// Sends `spec` and measures it; never fails, since a bad answer is a result.
///
/// `run_start` dates the record within its run; `deadline` bounds the whole
/// request, so a stalled server cannot hold the run open.
pub async fn send(
    client: &reqwest::Client,
    target: &Target,
    spec: &RequestSpec,
    run_start: Instant,
    deadline: Instant,
) -> RequestRecord {
    let start = Instant::now();
    let mut rec = RequestRecord {
        index: spec.index,
        priority: spec.priority.map(|p| p.as_str().to_owned()),
        probe: spec.probe,
        prompt_tokens_target: spec.prompt_tokens,
        max_tokens: spec.max_tokens,
        start_ms: ms(start.duration_since(run_start)),
        ok: false,
        status: None,
        error: None,
        ttft_ms: None,
        e2e_ms: 0.0,
        output_tokens: 0,
        chunks: 0,
        usage_prompt_tokens: None,
        usage_completion_tokens: None,
        usage_cached_tokens: None,
        text: spec.messages.as_ref().map(|_| String::new()),
        itl_mean_ms: None,
        itl_gaps_ms: Vec::new(),
        finish_reason: None,
    };
    let outcome = stream_into(client, target, spec, start, deadline, &mut rec).await;
    rec.e2e_ms = ms(start.elapsed());
    match outcome {
        Ok(()) => rec.ok = true,
        Err(e) => rec.error = Some(e),
    }
    rec.output_tokens = rec.usage_completion_tokens.unwrap_or(rec.chunks);
    if let (Some(first), Some(total)) = (rec.ttft_ms, rec.output_tokens.checked_sub(1)) {
        let last = first + rec.itl_gaps_ms.iter().sum::<f64>();
        if total > 0 {
            rec.itl_mean_ms = Some((last - first) / f64::from(total));
        }
    }
    rec
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Does the request, filling `rec` as chunks arrive so that a failure half-way
/// keeps what was measured; returns the reason on failure.
async fn stream_into(
    client: &reqwest::Client,
    target: &Target,
    spec: &RequestSpec,
    start: Instant,
    deadline: Instant,
    rec: &mut RequestRecord,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::from_std(deadline);
    let request = client.post(target.url()).json(&target.body(spec)).send();
    let response = tokio::time::timeout_at(deadline, request)
        .await
        .map_err(|_| "timeout before the response headers".to_owned())?
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status();
    rec.status = Some(status.as_u16());
    if !status.is_success() {
        let text = tokio::time::timeout_at(deadline, response.text())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let text: String = text.chars().take(MAX_ERROR_CHARS).collect();
        return Err(format!("HTTP {}: {}", status.as_u16(), text.trim()));
    }
    let mut body = response.bytes_stream();
    let mut parser = SseParser::default();
    let mut last_text: Option<Instant> = None;
    let mut done = false;
    loop {
        let next = tokio::time::timeout_at(deadline, body.next())
            .await
            .map_err(|_| "timeout while streaming".to_owned())?;
        let ended = next.is_none();
        let events = match next {
            Some(Ok(bytes)) => parser.push(&bytes),
            Some(Err(e)) => return Err(format!("stream broke: {e}")),
            None => parser.finish(),
        };
        let now = Instant::now();
        for data in events {
            if done {
                return Err("data after [DONE]".to_owned());
            }
            if data.trim() == "[DONE]" {
                done = true;
                continue;
            }
            let value: Value = serde_json::from_str(&data).map_err(|e| {
                let head: String = data.chars().take(80).collect();
                format!("malformed SSE data ({e}): {head}")
            })?;
            apply_chunk(&value, now, start, &mut last_text, rec)?;
        }
        if ended {
            break;
        }
    }
    if done || rec.finish_reason.is_some() {
        Ok(())
    } else {
        Err("stream ended before [DONE] or a finish_reason".to_owned())
    }
}

/// Takes the text, finish reason and usage out of one parsed chunk.
fn apply_chunk(
    value: &Value,
    now: Instant,
    start: Instant,
    last_text: &mut Option<Instant>,
    rec: &mut RequestRecord,
) -> Result<(), String> {
    if let Some(err) = value.get("error") {
        let msg = err
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| err.to_string(), str::to_owned);
        return Err(format!("server error in stream: {msg}"));
    }
    if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
        let get = |k: &str| {
            usage
                .get(k)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
        };
        rec.usage_prompt_tokens = get("prompt_tokens").or(rec.usage_prompt_tokens);
        rec.usage_completion_tokens = get("completion_tokens").or(rec.usage_completion_tokens);
        rec.usage_cached_tokens = usage
            .get("prompt_tokens_details")
            .and_then(|d| d.get("cached_tokens"))
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .or(rec.usage_cached_tokens);
    }
    let Some(choice) = value.get("choices").and_then(|c| c.get(0)) else {
        return Ok(());
    };
    let text = choice
        .get("delta")
        .and_then(|d| d.get("content"))
        .or_else(|| choice.get("text"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if !text.is_empty() {
        if let Some(kept) = rec.text.as_mut() {
            kept.push_str(text);
        }
        rec.chunks += 1;
        match last_text.replace(now) {
            Some(prev) => rec.itl_gaps_ms.push(ms(now.duration_since(prev))),
            None => rec.ttft_ms = Some(ms(now.duration_since(start))),
        }
    }
    if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
        rec.finish_reason = Some(reason.to_owned());
    }
    Ok(())
}
