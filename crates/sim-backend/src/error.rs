//! The one error enum of this crate.

use batching_types::{Failure, FailureKind, RequestId};

/// A failure of the simulated backend or of a whole step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// A step failure injected through [`crate::SimControl::fail_next_steps`].
    #[error("injected step failure")]
    InjectedStepFailure,
    /// Adding a sequence failed because a fault was injected for it.
    #[error("injected add failure for {0}")]
    InjectedAddFailure(RequestId),
    /// The scheduler broke the backend contract; the message says how.
    #[error("backend contract violated: {0}")]
    ContractViolation(String),
    /// The configuration cannot describe a backend.
    #[error("invalid sim config: {0}")]
    InvalidConfig(&'static str),
    /// The step's working set would not fit: it feeds more tokens than the
    /// limit set through [`crate::SimControl::limit_step_tokens`]. Like the
    /// real backend's, the check runs before anything changes.
    #[error("out of memory: a step of {tokens} tokens does not fit (at most {limit})")]
    OutOfMemory {
        /// Tokens the step would feed.
        tokens: usize,
        /// The most that fit.
        limit: usize,
    },
}

impl Failure for SimError {
    fn kind(&self) -> FailureKind {
        match self {
            Self::OutOfMemory { .. } => FailureKind::OutOfMemory,
            Self::InjectedAddFailure(_) => FailureKind::InvalidRequest,
            Self::InvalidConfig(_) => FailureKind::Unavailable,
            Self::InjectedStepFailure | Self::ContractViolation(_) => FailureKind::Internal,
        }
    }
}
