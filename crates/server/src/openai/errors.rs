//! Errors in OpenAI's JSON shape, with the HTTP status each one deserves.
//!
//! Official clients read `{"error": {"message", "type", "param", "code"}}`
//! and raise a typed exception from the status code, so both must be right:
//! a client retries a 429 or a 503 and never a 400.

use std::time::Duration;

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::Serialize;

use batching_types::FailureKind;

use crate::service::SubmitError;

/// An error response.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A human-readable message.
    pub message: String,
    /// OpenAI's error `type`, for example `invalid_request_error`.
    pub kind: &'static str,
    /// The offending request parameter, when there is one.
    pub param: Option<String>,
    /// A machine-readable code, for example `context_length_exceeded`.
    pub code: Option<&'static str>,
    /// Seconds for the `Retry-After` header.
    pub retry_after: Option<u64>,
}

/// The JSON body of an error.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    /// The error itself.
    pub error: ErrorObject<'a>,
}

/// The `error` object of [`ErrorBody`].
#[derive(Debug, Serialize)]
pub struct ErrorObject<'a> {
    /// A human-readable message.
    pub message: &'a str,
    /// The error type.
    #[serde(rename = "type")]
    pub kind: &'a str,
    /// The offending parameter, or null.
    pub param: Option<&'a str>,
    /// A machine-readable code, or null.
    pub code: Option<&'a str>,
}

const INVALID: &str = "invalid_request_error";

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_owned());
        self
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 400: a body that is not JSON or does not have the right types.
    pub fn bad_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, INVALID, message)
    }

    /// 400: a parameter with a value outside what is allowed.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, INVALID, message)
            .with_param(param)
            .with_code("invalid_value")
    }

    /// 400: a request field this server does not know (OpenAI's own API
    /// refuses unknown arguments rather than ignore them).
    pub fn unknown_param(param: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            INVALID,
            format!("Unrecognized request argument supplied: {param}"),
        )
        .with_param(param)
        .with_code("unknown_parameter")
    }

    /// 400: prompt plus `max_tokens` do not fit the model's context.
    pub fn context_length(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, INVALID, message)
            .with_param(param)
            .with_code("context_length_exceeded")
    }

    /// 404: the request names a model this server does not serve.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            INVALID,
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    /// 404: no such route.
    pub fn route_not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            INVALID,
            format!("Unknown request URL: {path}."),
        )
        .with_code("unknown_url")
    }

    /// 405: the route exists but not with this method.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            INVALID,
            "This route does not support this HTTP method.",
        )
        .with_code("method_not_allowed")
    }

    /// 413: the body is larger than the server accepts.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            INVALID,
            format!("The request body is larger than the limit of {limit} bytes."),
        )
        .with_code("request_too_large")
    }

    /// 429: the waiting queue is full.
    pub fn queue_full(retry_after: Duration) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "The server is at capacity: its request queue is full. Retry later.",
        )
        .with_code("rate_limit_exceeded");
        e.retry_after = Some(retry_after.as_secs().max(1));
        e
    }

    /// 408: the request's body did not arrive in time; the connection is
    /// closed.
    pub fn body_timeout(deadline: Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            INVALID,
            format!(
                "The request body did not arrive within {} s of its headers.",
                deadline.as_secs_f64()
            ),
        )
        .with_code("request_timeout")
    }

    /// 504: the request waited past its deadline.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", message).with_code("timeout")
    }

    /// 503: the server is shutting down or its engine has stopped.
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            .with_code("service_unavailable");
        e.retry_after = Some(1);
        e
    }

    /// 500: the model failed on this request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message).with_code("internal")
    }

    /// The engine ended the request with a failure of `kind`: its stable
    /// label is the error's code, and the status says whether to retry.
    pub fn failure(kind: FailureKind, message: impl Into<String>) -> Self {
        match kind {
            FailureKind::InvalidRequest => {
                Self::new(StatusCode::BAD_REQUEST, INVALID, message).with_code(kind.as_str())
            }
            FailureKind::OutOfMemory | FailureKind::Unavailable => {
                let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
                    .with_code(kind.as_str());
                e.retry_after = Some(1);
                e
            }
            FailureKind::Internal => Self::internal(message),
        }
    }

    /// The JSON text of the error body, also used inside an event stream.
    pub fn body_json(&self) -> String {
        let body = ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        serde_json::to_string(&body).unwrap_or_else(|_| {
            r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#
                .to_owned()
        })
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull { retry_after } => Self::queue_full(retry_after),
            SubmitError::ShuttingDown => {
                Self::unavailable("The server is shutting down and takes no new requests.")
            }
            SubmitError::Stopped => Self::unavailable("The inference engine is not running."),
            SubmitError::Loading => {
                Self::unavailable("The model is still loading. Retry in a few seconds.")
            }
            SubmitError::Shedding { retry_after } => {
                let mut e = Self::unavailable(
                    "The server is short of memory and sheds new work until running requests finish. Retry later.",
                );
                e.retry_after = Some(retry_after.as_secs().max(1));
                e
            }
            SubmitError::TooLarge(message) => Self::context_length("max_tokens", message),
            SubmitError::Invalid { param, message } => match param {
                Some(param) => Self::invalid_param(&param, message),
                None => Self::bad_json(message),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body_json();
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Lets handlers return `Json` or an error with `?`.
pub type ApiResult<T> = Result<Json<T>, ApiError>;
