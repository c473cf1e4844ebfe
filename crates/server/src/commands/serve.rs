//! `mlx-batch serve`: load the model, start the scheduler, serve HTTP until
//! SIGINT or SIGTERM, then shut down gracefully.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use batching_scheduler::SchedulerConfig;

use crate::{
    app::{self, AppState, ServerConfig},
    cli::ServeArgs,
    commands::{load_text, start_engine, KvSize, MemoryPlan},
    connections::{self, ConnectionLimits},
    health::HealthPolicy,
    service::{GenerationService, ServiceSlot},
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
    // The model folder first: a wrong path is one line, before anything
    // else is logged.
    let (dir, model) = load_text(&args.model)?;
    let file_limit = connections::raise_file_limit().unwrap_or_else(|e| {
        tracing::warn!("cannot read the file limit: {e}");
        1024
    });
    let max_connections = connections::connection_cap(file_limit, args.max_connections);
    tracing::info!(
        file_limit,
        max_connections,
        "serving at most {max_connections} connections at once"
    );
    let slot = Arc::new(ServiceSlot::new());
    let state = AppState::new(
        Arc::clone(&slot) as Arc<dyn GenerationService>,
        Arc::new(model),
        metrics,
        ServerConfig {
            request_timeout: args.request_timeout.0,
            health: HealthPolicy {
                max_step_failures: args.unhealthy_after_failures,
                stall_timeout: args.stall_timeout.0.unwrap_or(Duration::MAX),
            },
            body_read_timeout: args.body_read_timeout,
            default_temperature: args.default_temperature,
            stream_stall_timeout: args.stream_stall_timeout,
            connections: ConnectionLimits {
                header_read_timeout: args.header_read_timeout,
                keep_alive_timeout: args.keep_alive_timeout,
                max_connections,
            },
            ..ServerConfig::default()
        },
    );
    // Listen first, so that health probes see "loading" while the weights
    // load instead of a refused connection.
    let listener = tokio::net::TcpListener::bind(args.addr())
        .await
        .with_context(|| format!("cannot listen on {}", args.addr()))?;
    tracing::info!(
        "listening on http://{}/v1; loading {}",
        listener.local_addr()?,
        state.model.id()
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let model_args = args.model.clone();
    let loading =
        tokio::task::spawn_blocking(move || start_engine(&dir, &model_args, scheduler, memory));
    let id = state.model.id().to_owned();
    let server = app::serve(listener, state, async move {
        let mut stop = stop_rx;
        tokio::select! {
            () = shutdown_signal() => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        tracing::info!("shutting down: finishing requests in flight");
    });
    tokio::pin!(server);
    let engine = tokio::select! {
        loaded = loading => loaded.context("the loading task failed")?,
        served = &mut server => {
            served?;
            return Ok(());
        }
    };
    let engine = match engine {
        Ok(engine) => engine,
        Err(e) => {
            let _ = stop_tx.send(true);
            let _ = server.await;
            return Err(e);
        }
    };
    let handle = engine.handle().clone();
    slot.fill(Arc::new(engine));
    tracing::info!("serving {id}");
    // New requests get 503 from the moment shutdown begins; running ones
    // may finish within the grace period.
    let on_signal = handle.clone();
    let watcher = tokio::spawn(async move {
        shutdown_signal().await;
        on_signal.shutdown();
    });
    server.await?;
    watcher.abort();
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
