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
    /// The model is still loading; the server takes work once it is ready.
    Loading,
    /// The engine is shedding load after running out of memory; try again
    /// after about this long.
    Shedding {
        /// A hint for the client's `Retry-After` header.
        retry_after: Duration,
    },
}

/// What `/health` and `/health/ready` report about the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ServiceHealth {
    /// Whether the engine loop is running.
    pub alive: bool,
    /// Whether the model is still loading (no engine yet).
    pub loading: bool,
    /// Whether a graceful shutdown has begun (no new requests are taken).
    pub shutting_down: bool,
    /// Whether new work is refused because memory ran short.
    pub shedding: bool,
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
    /// Steps run so far.
    pub steps: u64,
    /// Whole steps that failed in a row, up to now.
    pub consecutive_step_failures: u64,
    /// Milliseconds since the engine loop last made progress (finished a
    /// step or woke up with work).
    pub since_progress_ms: u64,
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

/// The service of a server that is still loading its model: it answers
/// health checks (live, not ready) and refuses work with
/// [`SubmitError::Loading`] until the real service is [`ServiceSlot::fill`]ed,
/// and then forwards everything to it. This is what lets the server listen
/// before the weights are in memory, so that probes see "loading" instead
/// of a refused connection.
#[derive(Default)]
pub struct ServiceSlot {
    inner: std::sync::OnceLock<std::sync::Arc<dyn GenerationService>>,
}

impl ServiceSlot {
    /// An empty slot: loading.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts the loaded service in; a second fill is ignored.
    pub fn fill(&self, service: std::sync::Arc<dyn GenerationService>) {
        let _ = self.inner.set(service);
    }
}

impl GenerationService for ServiceSlot {
    fn submit(&self, request: NewRequest) -> Result<EventStream, SubmitError> {
        match self.inner.get() {
            Some(service) => service.submit(request),
            None => Err(SubmitError::Loading),
        }
    }

    fn health(&self) -> ServiceHealth {
        match self.inner.get() {
            Some(service) => service.health(),
            None => ServiceHealth {
                alive: true,
                loading: true,
                ..ServiceHealth::default()
            },
        }
    }

    fn max_sequence_tokens(&self) -> usize {
        self.inner.get().map_or(0, |s| s.max_sequence_tokens())
    }
}
