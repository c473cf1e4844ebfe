//! A whole `bench` invocation: warm-up, every level, then the table, the JSON
//! file and the chart.

use std::{path::Path, time::Instant};

use serde::{Deserialize, Serialize};

use crate::{
    chart::{draw_chart, ChartSeries},
    client,
    runner::{run_level, LevelReport},
    summary::{render_table, BenchSummary},
    BenchArgs, LoadgenError,
};

/// What `--out` holds: the options, then each level's summary and records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// The options the run used.
    pub args: BenchArgs,
    /// One report per level, in the order they ran.
    pub levels: Vec<LevelReport>,
}

impl BenchReport {
    /// The summaries alone.
    pub fn summary(&self) -> BenchSummary {
        BenchSummary {
            url: self.args.url.clone(),
            runs: self.levels.iter().map(|l| l.summary.clone()).collect(),
        }
    }

    /// Writes the report as pretty JSON.
    pub fn write_json(&self, path: &Path) -> Result<(), LoadgenError> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).map_err(|source| LoadgenError::Write {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// An HTTP client for benchmarking: no proxy (targets are local), no
/// overall timeout (each request carries its own deadline).
pub fn http_client() -> Result<reqwest::Client, LoadgenError> {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .build()
        .map_err(|e| LoadgenError::Client(e.to_string()))
}

/// Runs every level of `args` and returns the full report, printing and
/// writing nothing; `label` prefixes each level's name.
pub async fn run_report(args: &BenchArgs, label: &str) -> Result<BenchReport, LoadgenError> {
    let levels = args.levels(label)?;
    let http = http_client()?;
    if let Some(first) = levels.first() {
        for spec in first.workload.generate(args.warmup) {
            let deadline = Instant::now() + first.request_timeout;
            let _ = client::send(&http, &first.target, &spec, Instant::now(), deadline).await;
        }
    }
    let mut out = Vec::with_capacity(levels.len());
    for level in &levels {
        out.push(run_level(&http, level).await);
    }
    Ok(BenchReport {
        args: args.clone(),
        levels: out,
    })
}

/// Runs the benchmark `args` describes, prints the summary table, writes the
/// JSON (`--out`) and the chart (`--chart`), and returns the summary.
pub async fn run(args: BenchArgs) -> Result<BenchSummary, LoadgenError> {
    let report = run_report(&args, "").await?;
    let summary = report.summary();
    println!("{}", render_table(&summary));
    if let Some(path) = &args.out {
        report.write_json(path)?;
    }
    if let Some(path) = &args.chart {
        let x_label = if args.rate.is_some() {
            "requests/s"
        } else {
            "concurrency"
        };
        let series = [ChartSeries {
            name: args.url.clone(),
            runs: summary.runs.clone(),
        }];
        draw_chart(
            path,
            &format!("mlx-batch bench: {}", args.url),
            x_label,
            &series,
        )?;
    }
    Ok(summary)
}
