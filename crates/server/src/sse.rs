//! Server-sent events in the framing OpenAI's clients parse.
//!
//! Each payload goes out as `data: <json>\n\n` the moment it exists, and a
//! stream that ends normally closes with `data: [DONE]`. The response body
//! owns the payload stream, so when the client disconnects hyper drops the
//! body, which drops the [`crate::generation::Generation`] inside it and
//! cancels the request in the engine.

use std::{convert::Infallible, time::Duration};

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

/// Events a streamed response may hold for a client that is not reading,
/// beyond what the socket buffers.
pub const STREAM_BUFFER: usize = 64;

/// A `text/event-stream` response that sends each payload of `payloads`,
/// then `data: [DONE]`.
///
/// The payloads are produced by a task of their own into a bounded buffer
/// the body reads from. When the client stops reading, the socket and then
/// the buffer fill up; if the buffer stays full for `stall_timeout`, the
/// task gives up and drops the payload stream, which cancels the request in
/// the engine and frees its KV blocks. Without this a client that stops
/// reading would hold its blocks until the answer was complete.
pub fn response<S>(payloads: S, stall_timeout: Duration) -> Response
where
    S: Stream<Item = String> + Send + 'static,
{
    let frames = payloads
        .map(|p| frame(&p))
        .chain(stream::once(async { frame(DONE) }));
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(STREAM_BUFFER);
    tokio::spawn(async move {
        let mut frames = std::pin::pin!(frames);
        while let Some(frame) = frames.next().await {
            match tokio::time::timeout(stall_timeout, tx.send(frame)).await {
                Ok(Ok(())) => {}
                // The client went away: the body (the receiver) was dropped.
                Ok(Err(_)) => break,
                Err(_) => {
                    metrics::counter!("mlx_batch_server_stalled_streams_total").increment(1);
                    tracing::info!("client stopped reading; stream cancelled");
                    break;
                }
            }
        }
    });
    let body = stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|frame| (Ok::<_, Infallible>(frame), rx))
    });
    let mut response = Response::new(Body::from_stream(body));
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
        let resp = response(
            stream::iter(vec!["{\"a\":1}".to_owned(), "{}".to_owned()]),
            Duration::from_secs(1),
        );
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "data: {\"a\":1}\n\ndata: {}\n\ndata: [DONE]\n\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stalls_past_the_timeout_drops_the_payloads() {
        /// Counts how far the payload stream was read and notices its drop.
        struct Dropped(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guard = Dropped(std::sync::Arc::clone(&dropped));
        let endless = stream::repeat("{}".to_owned()).map(move |p| {
            let _ = &guard;
            p
        });
        let resp = response(endless, Duration::from_secs(5));
        // Nobody reads the body: the buffer fills, then the timeout passes.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!dropped.load(std::sync::atomic::Ordering::SeqCst));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            dropped.load(std::sync::atomic::Ordering::SeqCst),
            "the stalled stream was cancelled"
        );
        drop(resp);
    }
}
