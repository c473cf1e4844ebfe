//! The one error enum of this crate.

use batching_types::TypesError;

/// Everything that can go wrong when building a scheduler or submitting a
/// request. Failures *during* generation are not errors of `submit`: they
/// arrive as the request's finish event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedulerError {
    /// The configuration is unusable; the message names the field.
    #[error("invalid scheduler config: {0}")]
    InvalidConfig(String),
    /// The waiting queue is at its bound.
    #[error("queue full: {capacity} requests are already waiting")]
    QueueFull {
        /// The configured bound.
        capacity: usize,
    },
    /// Shutdown has begun; no new requests are accepted.
    #[error("the scheduler is shutting down and accepts no new requests")]
    ShuttingDown,
    /// The prompt alone does not fit in the model's context.
    #[error("the prompt has {prompt} tokens but the model's context is {max_context}")]
    PromptTooLong {
        /// Prompt tokens.
        prompt: usize,
        /// The model's context length.
        max_context: usize,
    },
    /// Prompt plus `max_tokens` exceed the model's context.
    #[error("prompt plus max_tokens is {needed} tokens but the model's context is {max_context}")]
    ContextTooLong {
        /// Prompt plus `max_tokens`.
        needed: usize,
        /// The model's context length.
        max_context: usize,
    },
    /// The request could never fit in the KV cache, even running alone.
    #[error("the request needs {needed} KV cache tokens but the backend holds {capacity}")]
    RequestTooLarge {
        /// KV tokens the request needs at most, rounded up to whole blocks.
        needed: usize,
        /// KV tokens the backend holds, in whole blocks.
        capacity: usize,
    },
    /// The request itself is malformed (empty prompt, bad sampling, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(#[from] TypesError),
    /// The engine thread has stopped; nothing more will run.
    #[error("the engine has stopped")]
    EngineStopped,
    /// The backend could not be built or reported a fatal error.
    #[error("backend error: {0}")]
    Backend(String),
}
