//! The threaded engine behind `SchedulerHandle`, on a tokio runtime.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use batching_scheduler::{RequestStream, SchedulerConfig, SchedulerError, SchedulerHandle};
use batching_types::{
    Backend, BackendCapacity, BackendMemory, FailureKind, FinishReason, KvBlocks, OutputEvent,
    Priority, RequestId, SamplingParams, StepOutput, StepPlan, SystemClock,
};
use common::{request, tokens_and_finish};
use futures::StreamExt;
use sim_backend::{tokens::expected_tokens, SimBackend, SimConfig, SimControl, SimError, TimeMode};

fn sim(step_ms: u64) -> SimConfig {
    SimConfig {
        step_cost: Duration::from_millis(step_ms),
        prefill_token_cost: Duration::ZERO,
        decode_token_cost: Duration::ZERO,
        vocab: 1000,
        time: TimeMode::Sleep,
        ..SimConfig::default()
    }
}

fn spawn(config: SchedulerConfig, sim: SimConfig) -> (SchedulerHandle, SimControl) {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = SchedulerHandle::spawn(config, SystemClock, move || {
        let backend = SimBackend::new(sim)?;
        tx.send(backend.control()).unwrap();
        Ok(backend)
    })
    .unwrap();
    (handle, rx.recv().unwrap())
}

async fn collect(stream: RequestStream) -> Vec<OutputEvent> {
    tokio::time::timeout(Duration::from_secs(20), stream.collect())
        .await
        .expect("the stream ended in time")
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_submit_concurrently_and_each_gets_its_own_tokens() {
    let (handle, control) = spawn(SchedulerConfig::default(), sim(0));
    let mut tasks = vec![];
    for i in 0..40u32 {
        let handle = handle.clone();
        tasks.push(tokio::spawn(async move {
            let spec = batching_types::NewRequest {
                prompt_tokens: vec![i, i + 1, i + 2],
                max_tokens: 5 + i as usize % 7,
                request_id: 999, // Overwritten by the handle.
                sampling: SamplingParams {
                    seed: Some(u64::from(i)),
                    ..SamplingParams::default()
                },
                ..request(1, 1, Priority::Normal)
            };
            let expected = expected_tokens(
                &spec.prompt_tokens,
                Some(u64::from(i)),
                spec.max_tokens,
                1000,
                None,
            );
            let stream = handle.submit(spec).unwrap();
            let id = stream.id();
            let (tokens, reason) = tokens_and_finish(&collect(stream).await);
            assert_eq!((tokens, reason), (expected, FinishReason::Length));
            id
        }));
    }
    let mut ids: Vec<RequestId> = vec![];
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 40, "ids are unique");
    eventually("idle", || handle.status().running == 0).await;
    let health = handle.status();
    assert!(health.alive && health.steps > 0);
    assert_eq!(health.kv_blocks_used, 0);
    assert!(control.stats().max_batch_size > 1, "requests were batched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_cancels_the_request_and_frees_its_blocks() {
    let (handle, control) = spawn(SchedulerConfig::default(), sim(2));
    let mut stream = handle.submit(request(4, 5000, Priority::Normal)).unwrap();
    for _ in 0..3 {
        assert!(matches!(
            stream.next_event().await,
            Some(OutputEvent::Token { .. })
        ));
    }
    assert_eq!(handle.status().running, 1);
    drop(stream);
    eventually("the cancelled request to leave", || {
        let h = handle.status();
        h.running == 0 && h.kv_blocks_used == 0 && control.stats().live_sequences == 0
    })
    .await;
    assert!(
        control.stats().decode_tokens < 1000,
        "generation stopped early"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_work_and_finishes_every_stream() {
    let config = SchedulerConfig {
        shutdown_grace: Duration::from_millis(100),
        max_batch_size: 1,
        ..SchedulerConfig::default()
    };
    let (handle, _control) = spawn(config, sim(2));
    let mut running = handle.submit(request(4, 5000, Priority::Normal)).unwrap();
    assert!(matches!(
        running.next_event().await,
        Some(OutputEvent::Token { .. })
    ));
    let waiting = handle.submit(request(4, 10, Priority::Low)).unwrap();
    handle.shutdown();
    assert_eq!(
        handle.submit(request(4, 10, Priority::Normal)).unwrap_err(),
        SchedulerError::ShuttingDown
    );
    let (_, reason) = tokens_and_finish(&collect(waiting).await);
    assert_eq!(reason, FinishReason::Cancelled);
    let rest = collect(running).await;
    assert!(matches!(
        rest.last(),
        Some(OutputEvent::Finished {
            reason: FinishReason::Cancelled,
            ..
        })
    ));
    tokio::time::timeout(Duration::from_secs(10), handle.stopped())
        .await
        .unwrap();
    assert!(!handle.status().alive);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_and_oversized_requests_are_refused_at_submit() {
    let config = SchedulerConfig {
        max_batch_size: 1,
        max_queue: Some(2),
        ..SchedulerConfig::default()
    };
    let (handle, _control) = spawn(
        config,
        SimConfig {
            kv_tokens: 256,
            ..sim(20)
        },
    );
    // The bound counts requests not yet admitted: the first one is running.
    let _running = handle.submit(request(4, 100, Priority::Normal)).unwrap();
    eventually("admission", || handle.status().running == 1).await;
    let _a = handle.submit(request(4, 100, Priority::Normal)).unwrap();
    let _b = handle.submit(request(4, 100, Priority::Normal)).unwrap();
    assert!(matches!(
        handle.submit(request(4, 100, Priority::Normal)),
        Err(SchedulerError::QueueFull { capacity: 2 })
    ));
    assert!(matches!(
        handle.submit(request(200, 100, Priority::Normal)),
        Err(SchedulerError::RequestTooLarge { .. })
    ));
}

#[test]
fn a_failing_or_panicking_factory_is_reported_by_spawn() {
    let err = SchedulerHandle::spawn(SchedulerConfig::default(), SystemClock, || {
        SimBackend::new(SimConfig {
            vocab: 0,
            ..SimConfig::default()
        })
    })
    .unwrap_err();
    // The backend's own error is kept as the source, with its kind.
    assert!(
        matches!(&err, SchedulerError::Backend { kind: FailureKind::Unavailable, source } if source.to_string().contains("vocab")),
        "{err}"
    );
    let err = SchedulerHandle::spawn(
        SchedulerConfig::default(),
        SystemClock,
        || -> Result<SimBackend, SimError> { panic!("no model") },
    )
    .unwrap_err();
    assert!(matches!(
        err,
        SchedulerError::Backend {
            kind: FailureKind::Internal,
            ..
        }
    ));
}

/// A backend that panics in `step` once told to, like a crashing model,
/// and says when it has been dropped.
struct Exploding {
    inner: SimBackend,
    armed: Arc<AtomicBool>,
    dropped: Arc<AtomicBool>,
}

impl Drop for Exploding {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

impl Backend for Exploding {
    type Error = SimError;
    fn capacity(&self) -> BackendCapacity {
        self.inner.capacity()
    }
    fn configure_kv(&mut self, blocks: KvBlocks) -> Result<(), SimError> {
        self.inner.configure_kv(blocks)
    }
    fn add_sequence(
        &mut self,
        id: RequestId,
        context: &[u32],
        sampling: &SamplingParams,
    ) -> Result<(), SimError> {
        self.inner.add_sequence(id, context, sampling)
    }
    fn use_cached_prefix(&mut self, id: RequestId, tokens: usize) -> Result<(), SimError> {
        self.inner.use_cached_prefix(id, tokens)
    }
    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, SimError> {
        assert!(!self.armed.load(Ordering::SeqCst), "the model crashed");
        self.inner.step(plan)
    }
    fn release(&mut self, id: RequestId) {
        self.inner.release(id);
    }
    fn memory(&self) -> BackendMemory {
        self.inner.memory()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_engine_thread_still_finishes_every_stream() {
    let armed = Arc::new(AtomicBool::new(false));
    let trigger = Arc::clone(&armed);
    let handle = SchedulerHandle::spawn(SchedulerConfig::default(), SystemClock, move || {
        Ok(Exploding {
            inner: SimBackend::new(sim(2))?,
            armed: trigger,
            dropped: Arc::default(),
        })
    })
    .unwrap();
    let mut stream = handle.submit(request(4, 5000, Priority::Normal)).unwrap();
    assert!(matches!(
        stream.next_event().await,
        Some(OutputEvent::Token { .. })
    ));
    armed.store(true, Ordering::SeqCst);
    let rest = collect(stream).await;
    assert!(matches!(
        rest.last(),
        Some(OutputEvent::Finished {
            reason: FinishReason::Error,
            ..
        })
    ));
    tokio::time::timeout(Duration::from_secs(10), handle.stopped())
        .await
        .unwrap();
    assert!(!handle.status().alive);
    assert_eq!(
        handle.submit(request(4, 10, Priority::Normal)).unwrap_err(),
        SchedulerError::EngineStopped
    );
}

/// Dropping the last handle while a step runs returns only once the engine
/// thread has ended and dropped its backend: a process that exits from
/// `main` must not tear down MLX under a running step.
#[test]
fn dropping_the_last_handle_waits_for_the_engine_thread() {
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&dropped);
    let handle = SchedulerHandle::spawn(SchedulerConfig::default(), SystemClock, move || {
        Ok(Exploding {
            inner: SimBackend::new(sim(20))?,
            armed: Arc::default(),
            dropped: flag,
        })
    })
    .unwrap();
    let stream = handle.submit(request(4, 50, Priority::Normal)).unwrap();
    // Let the engine start stepping (20 ms a step) before the handle goes.
    std::thread::sleep(Duration::from_millis(30));
    drop(handle);
    assert!(
        dropped.load(Ordering::SeqCst),
        "the backend still existed after the last handle was dropped"
    );
    drop(stream);
}
