//! One module per endpoint; shared streaming glue lives in [`streaming`].

pub mod chat;
pub mod completions;
pub mod health;
pub mod logprobs;
pub mod metrics;
pub mod models;
pub mod streaming;
pub mod tool_calls;

use axum::http::Uri;

use crate::openai::errors::ApiError;

/// Unknown routes answer in OpenAI's error shape.
pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

/// Known routes with the wrong method answer in OpenAI's error shape.
pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
