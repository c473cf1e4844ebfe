//! The metric names the scheduler records through the `metrics` crate.
//!
//! Histograms of time are in seconds. Latency histograms carry a
//! `priority` label (`high`, `normal`, `low`); the finish counter carries a
//! `reason` label (see [`batching_types::FinishReason::as_str`]). Install
//! any `metrics` recorder (for example a Prometheus exporter in the server)
//! to collect them; without one, recording is a no-op.

/// Histogram: seconds from submit to first admission, by priority.
pub const QUEUE_TIME: &str = "mlx_batch_queue_time_seconds";
/// Histogram: seconds from submit to the first token, by priority.
pub const TIME_TO_FIRST_TOKEN: &str = "mlx_batch_time_to_first_token_seconds";
/// Histogram: seconds between consecutive tokens of a request, by priority.
pub const INTER_TOKEN_LATENCY: &str = "mlx_batch_inter_token_latency_seconds";
/// Gauge: requests in the batch (prefilling or decoding).
pub const RUNNING: &str = "mlx_batch_running_requests";
/// Gauge: requests in the waiting queue without a cache.
pub const WAITING: &str = "mlx_batch_waiting_requests";
/// Gauge: requests paused for more urgent work (queued, keeping their
/// KV cache).
pub const PAUSED: &str = "mlx_batch_paused_requests";
/// Histogram: seconds a request spent paused before it resumed, by
/// priority.
pub const PAUSE_TIME: &str = "mlx_batch_pause_time_seconds";
/// Histogram: sequences per step.
pub const BATCH_SIZE: &str = "mlx_batch_batch_size";
/// Histogram: tokens fed per step.
pub const BATCH_TOKENS: &str = "mlx_batch_batch_tokens";
/// Gauge: KV blocks assigned to requests.
pub const KV_BLOCKS_USED: &str = "mlx_batch_kv_blocks_used";
/// Gauge: KV blocks free.
pub const KV_BLOCKS_FREE: &str = "mlx_batch_kv_blocks_free";
/// Counter: requests taken out of the batch, by `reason`: `priority`
/// (paused for a more urgent request, cache kept), `memory` (cache dropped
/// for lack of KV blocks, recomputed later) or `retry` (re-queued after a
/// failed step).
pub const PREEMPTIONS: &str = "mlx_batch_preemptions_total";
/// Gauge: free KV blocks that still hold a cached prefix (reusable until
/// evicted).
pub const KV_BLOCKS_CACHED: &str = "mlx_batch_kv_blocks_cached";
/// Counter: prompt tokens looked up in the prefix cache at admission.
pub const PREFIX_QUERY_TOKENS: &str = "mlx_batch_prefix_cache_query_tokens_total";
/// Counter: of those, tokens whose KV was reused (hit rate = hits /
/// queries).
pub const PREFIX_HIT_TOKENS: &str = "mlx_batch_prefix_cache_hit_tokens_total";
/// Counter: cached blocks evicted to make room.
pub const PREFIX_EVICTIONS: &str = "mlx_batch_prefix_cache_evictions_total";
/// Gauge: bytes the backend's allocator has in use (MLX active memory).
pub const MEMORY_ACTIVE: &str = "mlx_batch_memory_active_bytes";
/// Gauge: the most bytes the backend has had in use (MLX peak memory).
pub const MEMORY_PEAK: &str = "mlx_batch_memory_peak_bytes";
/// Gauge: bytes freed but kept for reuse (MLX cache memory).
pub const MEMORY_CACHE: &str = "mlx_batch_memory_cache_bytes";
/// Gauge: bytes the KV block pool holds.
pub const KV_POOL_BYTES: &str = "mlx_batch_kv_pool_bytes";
/// Counter: requests cancelled (client gone or shutdown).
pub const CANCELLATIONS: &str = "mlx_batch_cancellations_total";
/// Counter: tokens generated and delivered.
pub const TOKENS_GENERATED: &str = "mlx_batch_tokens_generated_total";
/// Counter: whole steps that failed, by `kind` (see
/// [`batching_types::FailureKind::as_str`]).
pub const STEP_FAILURES: &str = "mlx_batch_step_failures_total";
/// Counter: requests that ended with an error, by `kind`.
pub const REQUEST_FAILURES: &str = "mlx_batch_request_failures_total";
/// Gauge: the most tokens a step may feed after running out of memory (0
/// when no such cap is in force).
pub const MEMORY_TOKEN_CAP: &str = "mlx_batch_memory_token_cap";
/// Counter: steps run.
pub const STEPS: &str = "mlx_batch_steps_total";
/// Counter: finished requests, by `reason`.
pub const REQUESTS_FINISHED: &str = "mlx_batch_requests_finished_total";

/// Every name above, for documentation and tests.
pub const ALL: [&str; 27] = [
    QUEUE_TIME,
    TIME_TO_FIRST_TOKEN,
    INTER_TOKEN_LATENCY,
    RUNNING,
    WAITING,
    PAUSED,
    PAUSE_TIME,
    BATCH_SIZE,
    BATCH_TOKENS,
    KV_BLOCKS_USED,
    KV_BLOCKS_FREE,
    KV_BLOCKS_CACHED,
    PREFIX_QUERY_TOKENS,
    PREFIX_HIT_TOKENS,
    PREFIX_EVICTIONS,
    MEMORY_ACTIVE,
    MEMORY_PEAK,
    MEMORY_CACHE,
    KV_POOL_BYTES,
    PREEMPTIONS,
    CANCELLATIONS,
    TOKENS_GENERATED,
    STEP_FAILURES,
    REQUEST_FAILURES,
    MEMORY_TOKEN_CAP,
    STEPS,
    REQUESTS_FINISHED,
];

/// Handles for the metrics recorded on every token, registered once so the
/// hot path does not build metric keys. Like any `metrics` handle they bind
/// to the recorder installed when the engine is created: install the
/// recorder first.
pub(crate) struct Hot {
    pub(crate) queue_time: [::metrics::Histogram; 3],
    pub(crate) ttft: [::metrics::Histogram; 3],
    pub(crate) itl: [::metrics::Histogram; 3],
    pub(crate) pause_time: [::metrics::Histogram; 3],
    pub(crate) tokens: ::metrics::Counter,
    pub(crate) steps: ::metrics::Counter,
    pub(crate) batch_size: ::metrics::Histogram,
    pub(crate) batch_tokens: ::metrics::Histogram,
    pub(crate) running: ::metrics::Gauge,
    pub(crate) waiting: ::metrics::Gauge,
    pub(crate) paused: ::metrics::Gauge,
    pub(crate) blocks_used: ::metrics::Gauge,
    pub(crate) blocks_free: ::metrics::Gauge,
    pub(crate) blocks_cached: ::metrics::Gauge,
    pub(crate) prefix_queries: ::metrics::Counter,
    pub(crate) prefix_hits: ::metrics::Counter,
    /// Active, peak, cache and KV pool bytes, in that order.
    pub(crate) memory: [::metrics::Gauge; 4],
}

impl Hot {
    pub(crate) fn register() -> Self {
        use batching_types::Priority;
        let by_priority = |name: &'static str| {
            Priority::ALL.map(|p| ::metrics::histogram!(name, "priority" => p.as_str()))
        };
        Self {
            queue_time: by_priority(QUEUE_TIME),
            ttft: by_priority(TIME_TO_FIRST_TOKEN),
            itl: by_priority(INTER_TOKEN_LATENCY),
            pause_time: by_priority(PAUSE_TIME),
            tokens: ::metrics::counter!(TOKENS_GENERATED),
            steps: ::metrics::counter!(STEPS),
            batch_size: ::metrics::histogram!(BATCH_SIZE),
            batch_tokens: ::metrics::histogram!(BATCH_TOKENS),
            running: ::metrics::gauge!(RUNNING),
            waiting: ::metrics::gauge!(WAITING),
            paused: ::metrics::gauge!(PAUSED),
            blocks_used: ::metrics::gauge!(KV_BLOCKS_USED),
            blocks_free: ::metrics::gauge!(KV_BLOCKS_FREE),
            blocks_cached: ::metrics::gauge!(KV_BLOCKS_CACHED),
            prefix_queries: ::metrics::counter!(PREFIX_QUERY_TOKENS),
            prefix_hits: ::metrics::counter!(PREFIX_HIT_TOKENS),
            memory: [MEMORY_ACTIVE, MEMORY_PEAK, MEMORY_CACHE, KV_POOL_BYTES]
                .map(|name| ::metrics::gauge!(name)),
        }
    }
}
