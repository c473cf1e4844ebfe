//! One identity per request, from the HTTP edge to the backend.
//!
//! A request is known by the `x-request-id` its client (or a proxy in
//! front) sent, or by one made up here when it came without. That name is
//! the engine's [`batching_types::RequestId`] name, the suffix of the
//! response id (`chatcmpl-<name>`), the `x-request-id` of the response, and
//! a field of the tracing span every log line of the request is written
//! in, so a log line, a trace event and a response can always be tied
//! together.

use axum::{
    extract::Request,
    http::{HeaderName, HeaderValue},
    middleware::Next,
    response::{IntoResponse, Response},
};
use batching_types::RequestId;
use tracing::Instrument;

use crate::openai::errors::ApiError;

/// The header that carries a request's name, in and out.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The name of the request being handled, put in its extensions by
/// [`identify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestName(pub String);

impl RequestName {
    /// A fresh name: 24 random hex digits, unique for all practical
    /// purposes and short enough to read in a log.
    pub fn generate() -> Self {
        let bits: u128 = rand::random();
        Self(format!("{:024x}", bits >> 32))
    }
}

/// Reads or makes the request's name, runs the request inside a span that
/// carries it, and returns it in the response's `x-request-id`. A name
/// that cannot be a request id (empty, over 64 characters, not visible
/// ASCII) is refused with a 400 naming the header.
pub async fn identify(mut request: Request, next: Next) -> Response {
    let name = match request.headers().get(&REQUEST_ID_HEADER) {
        None => RequestName::generate(),
        Some(value) => {
            let checked = value
                .to_str()
                .map_err(|_| batching_types::TypesError::InvalidRequestId("<not text>".into()))
                .and_then(|v| RequestId::check_name(v).map(|()| v.to_owned()));
            match checked {
                Ok(v) => RequestName(v),
                Err(e) => {
                    let name = RequestName::generate();
                    let mut response =
                        ApiError::invalid_param("x-request-id", e.to_string()).into_response();
                    set_header(&mut response, &name);
                    return response;
                }
            }
        }
    };
    request.extensions_mut().insert(name.clone());
    let span = tracing::info_span!("request", request_id = %name.0);
    let mut response = next.run(request).instrument(span).await;
    set_header(&mut response, &name);
    response
}

fn set_header(response: &mut Response, name: &RequestName) {
    if let Ok(value) = HeaderValue::from_str(&name.0) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_are_valid_request_ids_and_differ() {
        let a = RequestName::generate();
        let b = RequestName::generate();
        assert_ne!(a, b);
        assert_eq!(a.0.len(), 24);
        assert!(RequestId::check_name(&a.0).is_ok());
    }
}
