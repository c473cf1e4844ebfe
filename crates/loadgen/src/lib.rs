//! A load generator for OpenAI-compatible streaming endpoints, and the
//! reports that compare servers with it.
//!
//! The main design decision: every number is measured on the client, from
//! the bytes of the server-sent event stream as they arrive, and kept raw.
//! Time to first token is the first chunk that carries text, inter-token
//! latency is every gap between such chunks, and output tokens come from the
//! server's `usage` when it sends one (falling back to counting chunks). The
//! same measurement therefore applies unchanged to mlx-batch, mlx-lm and
//! llama.cpp, and every summary (percentiles, throughput, per priority) is a
//! pure function of the raw records, which go to the JSON output so that any
//! table can be recomputed later.
//!
//! A failed request (an HTTP error, a malformed stream, a dropped connection,
//! a timeout) is a result, recorded with its reason; it never stops the run.
//! Runs are bounded: each request has a timeout and each level a maximum
//! duration.

mod args;
mod arrivals;
mod chart;
mod client;
mod conversation;
mod error;
mod prompt;
mod record;
mod report;
mod runner;
mod spec;
mod sse;
mod stats;
mod summary;
mod workload;

pub use args::BenchArgs;
pub use arrivals::poisson_schedule;
pub use chart::{draw_chart, ChartSeries};
pub use client::{send, Endpoint, Target};
pub use conversation::{run_conversations, ConversationConfig};
pub use error::LoadgenError;
pub use prompt::build_prompt;
pub use record::RequestRecord;
pub use report::{http_client, run, run_report, BenchReport};
pub use runner::{run_level, LevelConfig, LevelReport, LoadMode, ProbeConfig};
pub use spec::{parse_list, LengthSpec, PriorityMix};
pub use sse::SseParser;
pub use stats::{percentile, Percentiles};
pub use summary::{render_table, BenchSummary, GroupSummary, RunSummary};
pub use workload::{RequestSpec, WorkloadConfig};
