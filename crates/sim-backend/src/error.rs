//! The one error enum of this crate.

use batching_types::RequestId;

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
}
