//! What one request did: the raw measurements written to the JSON results.

use serde::{Deserialize, Serialize};

/// The measurements of one request, in milliseconds from its own start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Its position in the workload.
    pub index: usize,
    /// The priority sent in the body, if any (`high`, `normal`, `low`).
    pub priority: Option<String>,
    /// Whether it was a HIGH-priority probe sent on top of the load.
    pub probe: bool,
    /// The prompt length it aimed for, in tokens.
    pub prompt_tokens_target: u32,
    /// The `max_tokens` it sent.
    pub max_tokens: u32,
    /// When it started, from the start of its run.
    pub start_ms: f64,
    /// Whether it finished cleanly.
    pub ok: bool,
    /// The HTTP status, when an answer came.
    pub status: Option<u16>,
    /// What went wrong, for a failed request.
    pub error: Option<String>,
    /// Time to the first chunk that carried text.
    pub ttft_ms: Option<f64>,
    /// Time to the end of the stream (or to the failure).
    pub e2e_ms: f64,
    /// Output tokens: the server's usage count when it sent one, else the
    /// number of chunks that carried text.
    pub output_tokens: u32,
    /// Chunks that carried text.
    pub chunks: u32,
    /// The server's `usage.prompt_tokens`, when it sent usage.
    pub usage_prompt_tokens: Option<u32>,
    /// The server's `usage.completion_tokens`, when it sent usage.
    pub usage_completion_tokens: Option<u32>,
    /// The server's `usage.prompt_tokens_details.cached_tokens`, when sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_cached_tokens: Option<u32>,
    /// The answer's text, kept for multi-turn conversations (whose next
    /// turn sends it back) and to compare outputs between runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Mean time per output token after the first:
    /// `(last chunk - first chunk) / (output_tokens - 1)`.
    pub itl_mean_ms: Option<f64>,
    /// Every gap between consecutive text chunks.
    pub itl_gaps_ms: Vec<f64>,
    /// The `finish_reason` the server gave.
    pub finish_reason: Option<String>,
}
