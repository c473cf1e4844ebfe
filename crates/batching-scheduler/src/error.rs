//! The one error enum of this crate.

use std::{fmt, sync::Arc};

use batching_types::{Failure, FailureKind, TypesError};

/// A backend's error, kept with its cause chain; cloneable so that one
/// failure can be reported to every waiter, equal when the message is.
#[derive(Clone)]
pub struct BackendSource(Arc<dyn std::error::Error + Send + Sync>);

impl BackendSource {
    /// Keeps `error`.
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Arc::new(error))
    }
}

impl fmt::Debug for BackendSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for BackendSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl std::error::Error for BackendSource {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for BackendSource {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

/// The engine thread could not be started.
#[derive(Debug, thiserror::Error)]
#[error("could not start the engine thread: {0}")]
pub struct ThreadStart(#[from] pub std::io::Error);

impl Failure for ThreadStart {
    fn kind(&self) -> FailureKind {
        FailureKind::Unavailable
    }
}

/// The engine thread panicked while it built the backend.
#[derive(Debug, thiserror::Error)]
#[error("the engine thread panicked while building the backend")]
pub struct BuildPanicked;

impl Failure for BuildPanicked {
    fn kind(&self) -> FailureKind {
        FailureKind::Internal
    }
}

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
    #[error("backend error ({kind})")]
    Backend {
        /// What kind of failure it was.
        kind: FailureKind,
        /// The backend's error.
        #[source]
        source: BackendSource,
    },
    /// Memory ran short in a recent step: new work is refused until the
    /// running requests have room again.
    #[error("the engine is short of memory and sheds new work")]
    Shedding,
}

impl SchedulerError {
    /// A backend failure, keeping `error` as the source.
    pub fn backend(error: impl Failure) -> Self {
        Self::Backend {
            kind: error.kind(),
            source: BackendSource::new(error),
        }
    }
}
