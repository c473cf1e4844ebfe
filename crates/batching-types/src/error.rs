//! The one error enum of this crate.

use crate::RequestStatus;

/// Everything that can go wrong while building or moving a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TypesError {
    /// A status change that the lifecycle does not allow.
    #[error("invalid status transition from {from} to {to}")]
    InvalidTransition {
        /// The status the request was in.
        from: RequestStatus,
        /// The status that was asked for.
        to: RequestStatus,
    },
    /// A priority string other than "high", "normal" or "low".
    #[error("invalid priority {0:?}: expected one of \"high\", \"normal\", \"low\"")]
    InvalidPriority(String),
    /// A request must carry at least one prompt token.
    #[error("the prompt is empty: a request needs at least one prompt token")]
    EmptyPrompt,
    /// A request must be allowed to generate at least one token.
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    /// A request name that is empty, too long or not visible ASCII.
    #[error(
        "invalid request id {0:?}: it must be 1 to 64 visible ASCII characters (no spaces or control characters)"
    )]
    InvalidRequestId(String),
    /// A sampling parameter outside its valid range; names the parameter.
    #[error("invalid value for {param}: {reason}")]
    InvalidSampling {
        /// The parameter's name as a client spells it (for example `top_p`).
        param: &'static str,
        /// Why the value was refused.
        reason: String,
    },
}
