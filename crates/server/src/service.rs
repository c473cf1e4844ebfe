//! The seam between the HTTP layer and the batching engine.
//!
//! Routes only ever submit a request and read its events, and `/health`
//! asks whether the engine loop is alive. That is all this trait covers, so
//! route tests can drive error paths (a full queue, a shutdown) that are
//! hard to provoke in a real engine, and the real scheduler plugs in
//! through a thin adapter.

use std::{pin::Pin, time::Duration};

use batching_types::{NewRequest, OutputEvent};
use futures::Stream;

/// A request's events: tokens, then one finish event. Dropping the stream
/// cancels the request and frees its KV blocks.
pub type EventStream = Pin<Box<dyn Stream<Item = OutputEvent> + Send>>;

/// Why the engine refused a request at submission.
#[derive(Debug, Clone, PartialEq)]
pub enum SubmitError {
    /// The waiting queue is full; try again after about this long.
    QueueFull {
        /// A hint for the client's `Retry-After` header.
        retry_after: Duration,
    },
    /// The server is shutting down and takes no new work.
    ShuttingDown,
    /// The request can never fit (prompt plus `max_tokens` beyond the KV
    /// cache or the context).
    TooLarge(String),
    /// The engine found a request field invalid; names the parameter when
    /// it can.
    Invalid {
        /// The parameter, as a client spells it, when known.
        param: Option<String>,
        /// Why it was refused.
        message: String,
    },
    /// The engine loop is no longer running.
    Stopped,
}

/// What `/health` reports about the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ServiceHealth {
    /// Whether the engine loop is running.
    pub alive: bool,
    /// Whether a graceful shutdown has begun (no new requests are taken).
    pub shutting_down: bool,
    /// Requests in the batch (prefilling or decoding).
    pub running: usize,
    /// Requests in the waiting queue.
    pub waiting: usize,
    /// Requests paused for more urgent work, keeping their KV cache.
    pub paused: usize,
    /// KV cache blocks in use.
    pub kv_blocks_used: usize,
    /// KV cache blocks in total.
    pub kv_blocks_total: usize,
}

/// A batching engine that the routes submit requests to.
pub trait GenerationService: Send + Sync + 'static {
    /// Queues a request and returns its events.
    fn submit(&self, request: NewRequest) -> Result<EventStream, SubmitError>;
    /// A snapshot of the engine's state.
    fn health(&self) -> ServiceHealth;
    /// The most tokens, prompt plus generated, one request can hold in the
    /// KV cache; a request without `max_tokens` generates up to this (or
    /// the model's context, whichever is smaller).
    fn max_sequence_tokens(&self) -> usize;
}
