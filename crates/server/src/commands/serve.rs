//! `mlx-batch serve`: load the model, start the scheduler, serve HTTP until
//! SIGINT or SIGTERM, then shut down gracefully.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use batching_scheduler::SchedulerConfig;

use crate::{
    app::{self, AppState, ServerConfig},
    cli::ServeArgs,
    commands::{load, KvSize, MemoryPlan},
    telemetry,
};

/// How long, after the scheduler's own grace period, to wait for the engine
/// thread before giving up on it.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Serves until a shutdown signal.
pub async fn run(args: &ServeArgs) -> anyhow::Result<()> {
    // The recorder must exist before the engine registers its metrics.
    let metrics = telemetry::prometheus()?;
    let scheduler = SchedulerConfig {
        max_batch_size: args.max_batch_size,
        max_batch_tokens: args.max_batch_tokens,
        max_queue: Some(args.max_queue),
        aging_rate: args.aging_rate,
        preemption: !args.no_preemption,
        max_preemptions: args.max_preemptions,
        max_prefill_chunk: args.max_prefill_chunk,
        prefix_cache: !args.no_prefix_cache,
        ..SchedulerConfig::default()
    };
    let grace = scheduler.shutdown_grace;
    let kv = match args.kv_blocks {
        Some(blocks) => KvSize::Tokens(blocks.saturating_mul(scheduler.block_size)),
        None => KvSize::Bytes(args.kv_memory),
    };
    // Loading reads and converts weights: seconds of blocking work.
    let memory = MemoryPlan {
        kv,
        limit: args.memory_limit.resolve(),
        cache_limit: Some(args.mlx_cache_limit),
    };
    let loaded = tokio::task::block_in_place(|| load(&args.model, scheduler, memory))?;
    let handle = loaded.engine.handle().clone();
    let state = AppState::new(
        Arc::new(loaded.engine),
        Arc::new(loaded.model),
        metrics,
        ServerConfig {
            request_timeout: args.request_timeout.0,
            ..ServerConfig::default()
        },
    );
    let listener = tokio::net::TcpListener::bind(args.addr())
        .await
        .with_context(|| format!("cannot listen on {}", args.addr()))?;
    tracing::info!(
        "serving {} on http://{}/v1",
        state.model.id(),
        listener.local_addr()?
    );
    let on_signal = handle.clone();
    app::serve(listener, state, async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing requests in flight");
        // New requests get 503 from here on; running ones may finish.
        on_signal.shutdown();
    })
    .await?;
    handle.shutdown();
    if tokio::time::timeout(grace + STOP_WAIT, handle.stopped())
        .await
        .is_err()
    {
        tracing::warn!("the engine did not stop in time");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
