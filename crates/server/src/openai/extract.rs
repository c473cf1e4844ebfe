//! A JSON body extractor whose rejections are OpenAI-shaped errors.
//!
//! Axum's own `Json` answers with plain-text messages and insists on a
//! `Content-Type: application/json` header, which `curl -d` does not send.
//! This one reads the body under the router's size limit (a body over it is
//! refused with 413 before any parsing), then parses whatever arrived.

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, FromRequest, Request},
    http::StatusCode,
};
use serde::de::DeserializeOwned;

use crate::openai::{errors::ApiError, types::KnownFields};

/// A JSON request body of type `T`.
#[derive(Debug, Clone)]
pub struct OpenAiJson<T>(pub T);

/// The largest body accepted, in bytes, unless the router says otherwise.
pub const DEFAULT_BODY_LIMIT: usize = 4 * 1024 * 1024;

impl<S, T> FromRequest<S> for OpenAiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned + KnownFields,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(DEFAULT_BODY_LIMIT, |l| l.0);
        let deadline = req
            .extensions()
            .get::<BodyDeadline>()
            .map_or(DEFAULT_BODY_DEADLINE, |d| d.0);
        // A deadline for the whole body, not a wait between chunks: a client
        // that trickles a byte at a time makes progress but must not hold a
        // connection for ever.
        let bytes = tokio::time::timeout(deadline, Bytes::from_request(req, state))
            .await
            .map_err(|_| ApiError::body_timeout(deadline))?
            .map_err(|e| body_error(&e, limit))?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| json_error(&e))?;
        if let Some(unknown) = value
            .as_object()
            .and_then(|fields| fields.keys().find(|k| !T::is_known(k)))
        {
            return Err(ApiError::unknown_param(unknown));
        }
        serde_json::from_value(value)
            .map(OpenAiJson)
            .map_err(|e| json_error(&e))
    }
}

/// The body limit in force, recorded so that the 413 message can name it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// How long after its headers a request's whole body must have arrived.
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline(pub std::time::Duration);

/// The body deadline when the router sets none.
pub const DEFAULT_BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

fn body_error(e: &BytesRejection, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large(limit)
    } else {
        ApiError::bad_json(format!("Could not read the request body: {e}"))
    }
}

fn json_error(e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Syntax | Category::Eof => "The request body is not valid JSON",
        Category::Data | Category::Io => "The request body has a wrong or missing field",
    };
    ApiError::bad_json(format!("{what}: {e}"))
}
