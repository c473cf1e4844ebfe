//! Process-wide telemetry: the Prometheus recorder and tracing logs.
//!
//! The `metrics` facade has one global recorder per process, so it is
//! installed once, behind a `OnceLock`, and every server in the process
//! (there are many in a test binary) renders from the same handle.

use std::{
    io::IsTerminal,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::cli::LogFormat;

static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// How often histogram buckets are folded, so they do not grow unbounded.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder on first use and returns its handle.
pub fn prometheus() -> anyhow::Result<PrometheusHandle> {
    // The lock makes "check, install, remember" one step across threads.
    let mut slot = HANDLE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(handle) = slot.as_ref() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .context("another metrics recorder is already installed")?;
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            upkeep.run_upkeep();
        })
        .context("could not start the metrics upkeep thread")?;
    *slot = Some(handle.clone());
    Ok(handle)
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` (default `info`).
/// Text has ANSI colours only when stderr is a terminal, so a log
/// redirected to a file or a pipeline carries no escape codes.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second call (only possible in tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
}
