//! Drives one load level: closed-loop at a fixed concurrency, or open-loop at
//! a Poisson arrival rate, with optional HIGH-priority probes on top.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures::{stream, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::{
    arrivals::poisson_schedule, client, summary::RunSummary, workload::RequestSpec, RequestRecord,
    Target, WorkloadConfig,
};

/// How requests are started.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum LoadMode {
    /// Closed loop: this many requests in flight, a new one as soon as one ends.
    Concurrency(usize),
    /// Open loop: Poisson arrivals at this many requests per second, seeded.
    Rate(f64),
}

/// HIGH-priority requests sent on a timer while the load runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProbeConfig {
    /// How many to send.
    pub count: usize,
    /// The time between probes; probe `i` (from 0) starts `(i + 1) * interval`
    /// after the load, so the load is up before the first.
    pub interval: Duration,
}

/// Everything one level needs.
#[derive(Debug, Clone)]
pub struct LevelConfig {
    /// Where to send.
    pub target: Target,
    /// Closed or open loop.
    pub mode: LoadMode,
    /// Requests in the load (probes come on top).
    pub requests: usize,
    /// How requests are drawn.
    pub workload: WorkloadConfig,
    /// Optional HIGH-priority probes.
    pub probe: Option<ProbeConfig>,
    /// The longest one request may take.
    pub request_timeout: Duration,
    /// The longest the level may take: no request starts after it, and
    /// requests still running then are cut off and counted as failed.
    pub max_duration: Duration,
    /// Whether to draw a progress bar on the terminal.
    pub progress: bool,
    /// Text added to the level's label (such as a workload name).
    pub label: String,
}

/// A level's summary and raw records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LevelReport {
    /// The summary.
    pub summary: RunSummary,
    /// Every request, load and probes, in the order they ended.
    pub records: Vec<RequestRecord>,
}

fn progress_bar(enabled: bool, len: usize, label: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>14} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
    ) {
        bar.set_style(style);
    }
    bar.set_prefix(label.to_owned());
    bar
}

/// Runs one level and summarises it.
pub async fn run_level(http: &reqwest::Client, cfg: &LevelConfig) -> LevelReport {
    let specs = cfg.workload.generate(cfg.requests);
    let probes = cfg
        .probe
        .map(|p| cfg.workload.probes(p.count, cfg.requests))
        .unwrap_or_default();
    let (label, concurrency, rate) = match cfg.mode {
        LoadMode::Concurrency(c) => (format!("c={c}"), Some(c), None),
        LoadMode::Rate(r) => (format!("rate={r}"), None, Some(r)),
    };
    let label = if cfg.label.is_empty() {
        label
    } else {
        format!("{} {label}", cfg.label)
    };
    let bar = progress_bar(cfg.progress, specs.len() + probes.len(), &label);
    let start = Instant::now();
    let end = start + cfg.max_duration;
    let load_done = Arc::new(AtomicBool::new(false));

    let load = async {
        let records = run_load(http, cfg, &specs, start, end, &bar).await;
        load_done.store(true, Ordering::SeqCst);
        records
    };
    // Probes start on a timer, each on its own, so a slow probe does not
    // delay the next one; a probe whose time comes after the load ended is
    // not sent.
    let probe = async {
        let Some(p) = cfg.probe else {
            return Vec::new();
        };
        let sends = probes.iter().enumerate().map(|(i, spec)| {
            let load_done = &load_done;
            let bar = &bar;
            async move {
                tokio::time::sleep(p.interval * (i as u32 + 1)).await;
                if load_done.load(Ordering::SeqCst) || Instant::now() >= end {
                    return None;
                }
                let deadline = (Instant::now() + cfg.request_timeout).min(end);
                let rec = client::send(http, &cfg.target, spec, start, deadline).await;
                bar.inc(1);
                Some(rec)
            }
        });
        futures::future::join_all(sends)
            .await
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
    };
    let (mut records, probe_records) = futures::join!(load, probe);
    let duration_s = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    records.extend(probe_records);
    let summary = RunSummary::of(label, concurrency, rate, duration_s, &records);
    LevelReport { summary, records }
}

async fn run_load(
    http: &reqwest::Client,
    cfg: &LevelConfig,
    specs: &[RequestSpec],
    start: Instant,
    end: Instant,
    bar: &ProgressBar,
) -> Vec<RequestRecord> {
    let (limit, offsets) = match cfg.mode {
        LoadMode::Concurrency(c) => (c.max(1), vec![Duration::ZERO; specs.len()]),
        // Open loop: every request is in flight from the start, each asleep
        // until its arrival time, so a slow server never delays arrivals.
        LoadMode::Rate(r) => (
            specs.len().max(1),
            poisson_schedule(r, specs.len(), cfg.workload.seed),
        ),
    };
    stream::iter(specs.iter().zip(offsets))
        .map(|(spec, offset)| async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(start + offset)).await;
            if Instant::now() >= end {
                return None;
            }
            let deadline = (Instant::now() + cfg.request_timeout).min(end);
            let rec = client::send(http, &cfg.target, spec, start, deadline).await;
            bar.inc(1);
            Some(rec)
        })
        .buffer_unordered(limit)
        .filter_map(|r| async move { r })
        .collect()
        .await
}
