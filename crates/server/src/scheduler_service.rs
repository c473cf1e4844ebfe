//! The real [`GenerationService`]: the continuous-batching scheduler's handle.

use std::time::Duration;

use batching_scheduler::{SchedulerError, SchedulerHandle};
use batching_types::{NewRequest, TypesError};

use crate::service::{EventStream, GenerationService, ServiceHealth, SubmitError};

/// How long a client told "queue full" should wait before retrying. One
/// second is a few dozen decode steps: long enough for some requests to
/// finish, short enough not to idle the server.
const QUEUE_FULL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long a client refused while the engine sheds load should wait: the
/// engine refuses new work for at least two seconds after running short of
/// memory.
const SHEDDING_RETRY_AFTER: Duration = Duration::from_secs(2);

/// The scheduler behind the [`GenerationService`] seam.
#[derive(Debug, Clone)]
pub struct SchedulerService {
    handle: SchedulerHandle,
    max_sequence_tokens: usize,
}

impl SchedulerService {
    /// Wraps `handle`; `max_sequence_tokens` is the most KV tokens one
    /// request can ever hold (the backend's KV capacity in whole blocks).
    pub fn new(handle: SchedulerHandle, max_sequence_tokens: usize) -> Self {
        Self {
            handle,
            max_sequence_tokens,
        }
    }

    /// The scheduler handle, for shutdown.
    pub fn handle(&self) -> &SchedulerHandle {
        &self.handle
    }
}

impl GenerationService for SchedulerService {
    fn submit(&self, request: NewRequest) -> Result<EventStream, SubmitError> {
        match self.handle.submit(request) {
            Ok(stream) => Ok(Box::pin(stream)),
            Err(e) => Err(submit_error(e)),
        }
    }

    fn health(&self) -> ServiceHealth {
        let h = self.handle.status();
        ServiceHealth {
            alive: h.alive,
            loading: false,
            shutting_down: h.shutting_down,
            shedding: h.shedding,
            running: h.running,
            waiting: h.pending.max(h.waiting),
            paused: h.paused,
            kv_blocks_used: h.kv_blocks_used,
            kv_blocks_total: h.kv_blocks_used + h.kv_blocks_free,
            steps: h.steps,
            consecutive_step_failures: h.consecutive_step_failures,
            since_progress_ms: u64::try_from(h.since_progress.as_millis()).unwrap_or(u64::MAX),
        }
    }

    fn max_sequence_tokens(&self) -> usize {
        self.max_sequence_tokens
    }
}

/// Maps a refusal of the scheduler onto the seam's vocabulary.
fn submit_error(e: SchedulerError) -> SubmitError {
    match e {
        SchedulerError::QueueFull { .. } => SubmitError::QueueFull {
            retry_after: QUEUE_FULL_RETRY_AFTER,
        },
        SchedulerError::ShuttingDown => SubmitError::ShuttingDown,
        SchedulerError::PromptTooLong { .. }
        | SchedulerError::ContextTooLong { .. }
        | SchedulerError::RequestTooLarge { .. } => SubmitError::TooLarge(e.to_string()),
        SchedulerError::InvalidRequest(TypesError::InvalidSampling { param, reason }) => {
            SubmitError::Invalid {
                param: Some(param.to_owned()),
                message: reason,
            }
        }
        SchedulerError::InvalidRequest(other) => SubmitError::Invalid {
            param: None,
            message: other.to_string(),
        },
        SchedulerError::Shedding => SubmitError::Shedding {
            retry_after: SHEDDING_RETRY_AFTER,
        },
        SchedulerError::EngineStopped
        | SchedulerError::Backend { .. }
        | SchedulerError::InvalidConfig(_) => SubmitError::Stopped,
    }
}
