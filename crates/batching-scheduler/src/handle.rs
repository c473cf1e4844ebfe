//! The threaded engine loop and the handle clients use to reach it.

use std::{
    pin::Pin,
    sync::{atomic::Ordering, mpsc, Arc, Mutex, PoisonError},
    task::{Context, Poll},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use batching_types::{
    Backend, BackendCapacity, BatchRequest, Clock, EventReceiver, FailureKind, FinishReason,
    NewRequest, OutputEvent, RequestId, Usage,
};

use crate::{
    error::{BuildPanicked, ThreadStart},
    shared::Shared,
    Scheduler, SchedulerConfig, SchedulerError, SchedulerStatus,
};

/// What a handle sends to the engine thread.
enum Command {
    Submit(Box<BatchRequest>),
    Shutdown,
}

/// A request's output: tokens, then exactly one
/// [`OutputEvent::Finished`]. Dropping it cancels the request; the engine
/// notices within one step and frees its KV blocks.
#[derive(Debug)]
pub struct RequestStream {
    id: RequestId,
    prompt_tokens: usize,
    delivered: usize,
    rx: EventReceiver,
    finished: bool,
}

impl RequestStream {
    /// The engine-wide id assigned at submit.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The next event, or `None` after the finish event.
    pub async fn next_event(&mut self) -> Option<OutputEvent> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// Polls for the next event. If the engine vanished without a finish
    /// event (which the engine's drop guard prevents, but a stream must not
    /// rely on it), a synthetic `Error` finish is produced, so a client is
    /// never left hanging.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<OutputEvent>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(event)) => {
                match &event {
                    OutputEvent::Finished { .. } => self.finished = true,
                    OutputEvent::Token { .. } => self.delivered += 1,
                }
                Poll::Ready(Some(event))
            }
            Poll::Ready(None) => {
                self.finished = true;
                Poll::Ready(Some(OutputEvent::Finished {
                    reason: FinishReason::Error,
                    usage: Usage {
                        prompt_tokens: self.prompt_tokens,
                        completion_tokens: self.delivered,
                        cached_tokens: 0,
                    },
                    message: Some("the engine stopped".into()),
                    failure: Some(FailureKind::Internal),
                }))
            }
        }
    }
}

impl futures_core::Stream for RequestStream {
    type Item = OutputEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<OutputEvent>> {
        self.get_mut().poll_event(cx)
    }
}

struct Inner {
    tx: Mutex<Option<mpsc::Sender<Command>>>,
    shared: Arc<Shared>,
    clock: Arc<dyn Clock>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stopped: tokio::sync::watch::Receiver<bool>,
    /// How long dropping the last handle waits for the engine thread: the
    /// shutdown grace and a margin.
    join_wait: Duration,
}

impl Drop for Inner {
    /// The last handle is gone, so nothing can submit: closing the channel
    /// begins the engine's shutdown, and this waits for its thread (within
    /// `join_wait`), so that no backend work still runs while the process
    /// exits. A process that returns from `main` tears down its libraries'
    /// static state (MLX's allocator among them) under a thread still using
    /// it, which corrupts the heap.
    fn drop(&mut self) {
        drop(
            self.tx
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let Some(thread) = self
            .thread
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        if thread.thread().id() == std::thread::current().id() {
            return;
        }
        let deadline = Instant::now() + self.join_wait;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(JOIN_POLL);
        }
        if thread.is_finished() {
            let _ = thread.join();
        }
    }
}

/// How often a dropped handle looks whether the engine thread has ended.
const JOIN_POLL: Duration = Duration::from_millis(2);

/// Beyond the shutdown grace, how long a dropped handle waits for the
/// engine thread to end (its last step and the backend's teardown).
const JOIN_MARGIN: Duration = Duration::from_secs(5);

/// The clients' way into the engine: cheap to clone, safe to share between
/// tasks and threads.
#[derive(Clone)]
pub struct SchedulerHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SchedulerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerHandle")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

/// Sent by the engine thread once the backend exists (or could not be made).
type Ready = Result<Arc<Shared>, SchedulerError>;

impl SchedulerHandle {
    /// Starts the engine thread, builds the backend on it with `factory`
    /// (MLX backends are not `Send`, so they must be made where they run),
    /// and returns once the engine is ready.
    pub fn spawn<B, F, C>(
        config: SchedulerConfig,
        clock: C,
        factory: F,
    ) -> Result<Self, SchedulerError>
    where
        B: Backend + 'static,
        F: FnOnce() -> Result<B, B::Error> + Send + 'static,
        C: Clock + Clone,
    {
        config.validate()?;
        let grace = config.shutdown_grace;
        let (tx, rx) = mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = mpsc::channel::<Ready>();
        let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
        let engine_clock = clock.clone();
        let thread = std::thread::Builder::new()
            .name("mlx-batch-engine".into())
            .spawn(move || {
                // Marks the engine stopped however the thread ends.
                let _stopped = StoppedGuard(stopped_tx);
                let backend = match factory() {
                    Ok(backend) => backend,
                    Err(err) => {
                        let _ = ready_tx.send(Err(SchedulerError::backend(err)));
                        return;
                    }
                };
                let engine = match Scheduler::new(config, backend, engine_clock) {
                    Ok(engine) => engine,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                let inbox = Inbox {
                    rx,
                    shared: engine.shared(),
                };
                if ready_tx.send(Ok(engine.shared())).is_err() {
                    return;
                }
                run_loop(engine, inbox);
            })
            .map_err(|e| SchedulerError::backend(ThreadStart(e)))?;
        let shared = match ready_rx.recv() {
            Ok(Ok(shared)) => shared,
            Ok(Err(err)) => {
                let _ = thread.join();
                return Err(err);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(SchedulerError::backend(BuildPanicked));
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                tx: Mutex::new(Some(tx)),
                shared,
                clock: Arc::new(clock),
                thread: Mutex::new(Some(thread)),
                stopped: stopped_rx,
                join_wait: grace + JOIN_MARGIN,
            }),
        })
    }

    /// Validates and queues a request and returns its output stream. The
    /// caller's `request_id` is replaced by a fresh engine-wide id (see
    /// [`RequestStream::id`]). Fails at once when the queue is full, the
    /// request can never fit, or shutdown has begun.
    pub fn submit(&self, request: NewRequest) -> Result<RequestStream, SchedulerError> {
        let shared = &self.inner.shared;
        let (request, rx) = shared.prepare(request, self.inner.clock.now())?;
        let stream = RequestStream {
            id: request.request_id,
            prompt_tokens: request.prompt_tokens.len(),
            delivered: 0,
            rx,
            finished: false,
        };
        let sent = self
            .inner
            .tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|tx| tx.send(Command::Submit(Box::new(request))));
        match sent {
            Some(Ok(())) => Ok(stream),
            Some(Err(_)) => {
                shared.unreserve();
                Err(SchedulerError::EngineStopped)
            }
            None => {
                shared.unreserve();
                Err(SchedulerError::ShuttingDown)
            }
        }
    }

    /// What the backend reported it can hold, read when the engine started
    /// (the factory's backend is built on the engine thread, so this is how
    /// its capacity comes back).
    pub fn capacity(&self) -> BackendCapacity {
        self.inner.shared.limits.capacity
    }

    /// The KV tokens one request can ever hold: the pool in whole blocks.
    pub fn max_sequence_tokens(&self) -> usize {
        let l = self.inner.shared.limits;
        l.total_blocks * l.block_size
    }

    /// A cheap snapshot for health checks.
    pub fn status(&self) -> SchedulerStatus {
        let mut status = self.inner.shared.status(self.inner.clock.now());
        status.alive &= !*self.inner.stopped.borrow();
        status
    }

    /// Begins a graceful shutdown: new submits fail with
    /// [`SchedulerError::ShuttingDown`], waiting requests are cancelled, and
    /// running ones may finish within the configured grace period. Returns
    /// at once; await [`SchedulerHandle::stopped`] to wait for the end.
    pub fn shutdown(&self) {
        self.inner
            .shared
            .shutting_down
            .store(true, Ordering::Release);
        if let Some(tx) = self
            .inner
            .tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = tx.send(Command::Shutdown);
        }
    }

    /// Resolves once the engine thread has ended.
    pub async fn stopped(&self) {
        let mut rx = self.inner.stopped.clone();
        // An error means the sender is gone, which also means stopped.
        let _ = rx.wait_for(|stopped| *stopped).await;
    }

    /// Blocks until the engine thread has ended (call it from a blocking
    /// context, never from an async task).
    pub fn join(&self) {
        let thread = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

struct StoppedGuard(tokio::sync::watch::Sender<bool>);

impl Drop for StoppedGuard {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// The engine's end of the submit channel. On drop (normal exit or a
/// panic) it marks the engine dead and finishes every request still in the
/// channel, so none is left hanging.
struct Inbox {
    rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.shared.alive.store(false, Ordering::Release);
        while let Ok(command) = self.rx.try_recv() {
            if let Command::Submit(request) = command {
                self.shared.unreserve();
                let _ = request.events.send(OutputEvent::Finished {
                    reason: FinishReason::Cancelled,
                    usage: Usage {
                        prompt_tokens: request.prompt_tokens.len(),
                        completion_tokens: 0,
                        cached_tokens: 0,
                    },
                    message: Some("the engine stopped before the request started".into()),
                    failure: None,
                });
            }
        }
    }
}

/// How long an engine with work but nothing runnable waits before it looks
/// again; only reachable if the backend refuses every plan.
const STALL_WAIT: Duration = Duration::from_millis(1);

fn run_loop<B: Backend, C: Clock + Clone>(mut engine: Scheduler<B, C>, inbox: Inbox) {
    let mut shutting_down = false;
    loop {
        // Block only when idle: no busy-waiting, and no latency added while
        // there is work.
        if !engine.has_work() && !shutting_down {
            match inbox.rx.recv() {
                Ok(command) => {
                    // Time spent idle is not a stall.
                    engine.mark_progress();
                    handle(&mut engine, command, &mut shutting_down);
                }
                Err(_) => {
                    engine.begin_shutdown();
                    shutting_down = true;
                }
            }
        }
        loop {
            match inbox.rx.try_recv() {
                Ok(command) => handle(&mut engine, command, &mut shutting_down),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    if !shutting_down {
                        engine.begin_shutdown();
                        shutting_down = true;
                    }
                    break;
                }
            }
        }
        if shutting_down && !engine.has_work() {
            break;
        }
        let trace = engine.step();
        if trace.items.is_empty() && trace.finished.is_empty() && engine.has_work() {
            if let Ok(command) = inbox.rx.recv_timeout(STALL_WAIT) {
                handle(&mut engine, command, &mut shutting_down);
            }
        }
    }
    // Dropping the engine finishes anything left; dropping the inbox then
    // finishes requests that raced with the shutdown.
    drop(engine);
    drop(inbox);
}

fn handle<B: Backend, C: Clock + Clone>(
    engine: &mut Scheduler<B, C>,
    command: Command,
    shutting_down: &mut bool,
) {
    match command {
        Command::Submit(request) => engine.enqueue(*request),
        Command::Shutdown => {
            engine.begin_shutdown();
            *shutting_down = true;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use futures::StreamExt;

    fn stream() -> (batching_types::EventSender, RequestStream) {
        let (tx, rx) = batching_types::event_channel();
        let stream = RequestStream {
            id: RequestId::from(1),
            prompt_tokens: 3,
            delivered: 0,
            rx,
            finished: false,
        };
        (tx, stream)
    }

    #[tokio::test]
    async fn a_vanished_engine_still_yields_exactly_one_error_finish() {
        let (tx, stream) = stream();
        tx.send(OutputEvent::Token {
            token: 5,
            index: 0,
            logprobs: None,
        })
        .unwrap();
        drop(tx);
        let events: Vec<_> = stream.collect().await;
        assert_eq!(
            events,
            vec![
                OutputEvent::Token {
                    token: 5,
                    index: 0,
                    logprobs: None,
                },
                OutputEvent::Finished {
                    reason: FinishReason::Error,
                    usage: Usage {
                        prompt_tokens: 3,
                        completion_tokens: 1,
                        cached_tokens: 0,
                    },
                    message: Some("the engine stopped".into()),
                    failure: Some(FailureKind::Internal),
                }
            ]
        );
    }

    #[tokio::test]
    async fn the_stream_ends_after_the_finish_event() {
        let (tx, mut stream) = stream();
        let finished = OutputEvent::Finished {
            reason: FinishReason::Length,
            usage: Usage::default(),
            message: None,
            failure: None,
        };
        tx.send(finished.clone()).unwrap();
        assert_eq!(stream.next_event().await, Some(finished));
        assert_eq!(stream.next_event().await, None);
        assert_eq!(stream.id(), RequestId::from(1));
    }
}
