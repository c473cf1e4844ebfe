//! Server-sent events in the framing OpenAI's clients parse.
//!
//! Each payload goes out as `data: <json>\n\n` the moment it exists, and a
//! stream that ends normally closes with `data: [DONE]`. The response body
//! owns the payload stream, so when the client disconnects hyper drops the
//! body, which drops the [`crate::generation::Generation`] inside it and
//! cancels the request in the engine.

use std::convert::Infallible;

use axum::{
    body::{Body, Bytes},
    http::{header, HeaderValue, StatusCode},
    response::Response,
};
use futures::{stream, Stream, StreamExt};

/// The payload that ends every stream.
pub const DONE: &str = "[DONE]";

/// Frames one payload as an event.
pub fn frame(payload: &str) -> Bytes {
    Bytes::from(format!("data: {payload}\n\n"))
}

/// A `text/event-stream` response that sends each payload of `payloads`,
/// then `data: [DONE]`.
pub fn response<S>(payloads: S) -> Response
where
    S: Stream<Item = String> + Send + 'static,
{
    let frames = payloads
        .map(|p| frame(&p))
        .chain(stream::once(async { frame(DONE) }))
        .map(Ok::<_, Infallible>);
    let mut response = Response::new(Body::from_stream(frames));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies such as nginx buffer responses unless told not to.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[tokio::test]
    async fn payloads_are_framed_and_the_stream_ends_with_done() {
        let resp = response(stream::iter(vec!["{\"a\":1}".to_owned(), "{}".to_owned()]));
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "data: {\"a\":1}\n\ndata: {}\n\ndata: [DONE]\n\n"
        );
    }
}
