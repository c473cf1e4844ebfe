//! Accepting and serving connections so that slow or idle clients cannot
//! starve the others.
//!
//! `axum::serve` has no header, body or idle timeout and no connection cap:
//! a client that sends its headers and then trickles its body holds a
//! socket, a file descriptor and a task forever, and a thousand of them
//! lock everyone out once the process runs out of descriptors. Here each
//! connection is served by hyper's HTTP/1 server directly with:
//!
//! - a header read timeout (hyper's own, which also starts when a keep-alive
//!   connection waits for its next request);
//! - an idle keep-alive timeout: a connection with no request in flight for
//!   that long is closed gracefully;
//! - a cap on open connections, kept below the process's file limit, beyond
//!   which new connections are closed at once instead of queueing behind
//!   the slow ones.
//!
//! The body read deadline lives in the JSON extractor
//! ([`crate::openai::extract`]), where a body that has not arrived in time
//! becomes a 408, and a stalled streaming reader is handled in
//! [`crate::sse`].

use std::{
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use axum::{extract::Request, Router};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore, time::Instant};
use tower::ServiceExt;

/// The limits of the connection layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time to read a request's headers, from when the connection starts
    /// waiting for them.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub keep_alive_timeout: Duration,
    /// The most connections open at once; more are closed at once.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
            max_connections: 1024,
        }
    }
}

/// What one connection is doing, for its idle timer.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    last_done: Mutex<Instant>,
    changed: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last_done: Mutex::new(Instant::now()),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    fn end(&self) {
        *self
            .last_done
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// Resolves once no request has been in flight for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let notified = self.changed.notified();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                let since = *self
                    .last_done
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let elapsed = since.elapsed();
                if elapsed >= idle {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(idle - elapsed) => {}
                    () = notified => {}
                }
            } else {
                notified.await;
            }
        }
    }
}

/// Ends a request's activity when dropped: with the response body, so a
/// streamed response counts as in flight until its last byte.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Accepts connections on `listener` and serves `router` on each until
/// `shutdown` resolves, then closes idle connections, lets requests in
/// flight finish and returns when every connection has ended.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, for example: wait for some to
                    // be released instead of spinning.
                    tracing::error!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            // Full: close at once, so the client fails fast instead of
            // waiting behind connections that may never finish.
            metrics::counter!("mlx_batch_server_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let service = {
            let router = router.clone();
            let activity = Arc::clone(&activity);
            tower::service_fn(move |request: Request<Incoming>| {
                activity.begin();
                let guard = InFlight(Arc::clone(&activity));
                let router = router.clone();
                async move {
                    let response = router.oneshot(request.map(axum::body::Body::new)).await?;
                    // The guard lives as long as the body: a stream is in
                    // flight until its end.
                    let (parts, body) = response.into_parts();
                    let body = axum::body::Body::new(GuardedBody {
                        body,
                        _guard: guard,
                    });
                    Ok::<_, std::convert::Infallible>(axum::response::Response::from_parts(
                        parts, body,
                    ))
                }
            })
        };
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .keep_alive(true);
            let conn =
                http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            tokio::pin!(conn);
            let mut closing = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(%peer, "connection ended: {e}");
                        }
                        break;
                    }
                    () = activity.idle_for(limits.keep_alive_timeout), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = stop.wait_for(|s| *s), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
        // Reap finished connection tasks as we go.
        while tasks.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Accept errors that concern one connection only.
fn is_per_connection(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// A response body that holds a guard until it is dropped.
struct GuardedBody {
    body: axum::body::Body,
    _guard: InFlight,
}

impl hyper::body::Body for GuardedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Raises this process's soft limit on open files to its hard limit (on
/// macOS also capped by the kernel's per-process maximum) and returns the
/// limit in force: each connection holds one descriptor, so this bounds how
/// many clients can be served at once.
pub fn raise_file_limit() -> std::io::Result<u64> {
    #[cfg(unix)]
    {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct through the pointer,
        // which points at a live local.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        #[allow(clippy::useless_conversion)]
        let mut target = u64::from(rl.rlim_max);
        if cfg!(target_os = "macos") {
            // macOS refuses values above OPEN_MAX (10240) for this limit.
            target = target.min(10_240);
        }
        #[allow(clippy::useless_conversion)]
        let current = u64::from(rl.rlim_cur);
        if current < target {
            rl.rlim_cur = target as libc::rlim_t;
            // SAFETY: setrlimit only reads the struct, a live local.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } != 0 {
                return Ok(current);
            }
            return Ok(target);
        }
        Ok(current)
    }
    #[cfg(not(unix))]
    {
        Ok(u64::MAX)
    }
}

/// The connection cap for a file limit: room for the descriptors the
/// process needs besides connections (model files, logs, the listener,
/// MLX's and the runtime's own), and never more than `wanted`.
pub fn connection_cap(file_limit: u64, wanted: usize) -> usize {
    const RESERVED: u64 = 64;
    let room = file_limit.saturating_sub(RESERVED).max(1);
    usize::try_from(room).unwrap_or(usize::MAX).min(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_below_the_file_limit() {
        assert_eq!(connection_cap(1024, 100_000), 960);
        assert_eq!(connection_cap(1_048_576, 4096), 4096);
        assert_eq!(connection_cap(10, 100), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_without_requests_for_the_whole_timeout() {
        let a = Arc::new(Activity::new());
        a.begin();
        let waiter = {
            let a = Arc::clone(&a);
            tokio::spawn(async move {
                let t = tokio::time::Instant::now();
                a.idle_for(Duration::from_secs(5)).await;
                t.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!waiter.is_finished(), "a request in flight is never idle");
        a.end();
        let waited = waiter.await.unwrap_or_default();
        assert!(waited >= Duration::from_secs(30));
    }
}
