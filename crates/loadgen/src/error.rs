//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can stop a benchmark run as a whole.
///
/// A single request that fails is not an error here: it becomes a failed
/// [`crate::RequestRecord`], because a benchmark must report bad answers, not
/// die on them.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// A command-line value could not be parsed or is out of range.
    #[error("invalid argument {arg}: {reason}")]
    InvalidArg {
        /// The argument's name.
        arg: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("could not build the HTTP client: {0}")]
    Client(String),
    /// Writing the JSON results failed.
    #[error("could not write {path}: {source}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// Serialising or parsing results failed.
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),
    /// Drawing the chart failed.
    #[error("could not draw the chart {path}: {reason}")]
    Chart {
        /// The image being drawn.
        path: PathBuf,
        /// What the drawing backend said.
        reason: String,
    },
}

impl LoadgenError {
    /// Shorthand for [`LoadgenError::InvalidArg`].
    pub(crate) fn arg(arg: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArg {
            arg,
            reason: reason.into(),
        }
    }
}
