//! What kind of failure an error is.
//!
//! Errors keep their cause (their `source` chain) for logs; the kind is the
//! small, stable label that metrics, health checks and the client's error
//! code use, and what decides recovery: a step that ran out of memory is
//! retried smaller, anything else is retried a few times and then fails
//! the requests in it.

use std::fmt;

/// The stable label of a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The request itself cannot run (input that the edge did not catch).
    InvalidRequest,
    /// The backend ran out of memory: smaller work may succeed.
    OutOfMemory,
    /// The backend or its model cannot be used (missing files, no device).
    Unavailable,
    /// Anything else: an unexpected fault.
    Internal,
}

impl FailureKind {
    /// The label as metrics and error codes spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::OutOfMemory => "out_of_memory",
            Self::Unavailable => "backend_unavailable",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error that knows its [`FailureKind`]: what a backend's errors must be.
pub trait Failure: std::error::Error + Send + Sync + 'static {
    /// The kind of failure.
    fn kind(&self) -> FailureKind;
}

/// A backend that cannot fail.
impl Failure for std::convert::Infallible {
    fn kind(&self) -> FailureKind {
        match *self {}
    }
}
