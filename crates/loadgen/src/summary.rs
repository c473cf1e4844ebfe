//! Summaries of a run's records and the table printed at the end.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

use crate::{stats::Percentiles, RequestRecord};

/// Latency figures of a group of requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// What the group is: `all`, `high`, `normal`, `low` or `high probe`.
    pub name: String,
    /// Requests in the group.
    pub requests: usize,
    /// Of those, how many failed.
    pub failed: usize,
    /// Time to first token of the successful requests.
    pub ttft_ms: Option<Percentiles>,
    /// Every gap between tokens of the successful requests.
    pub itl_ms: Option<Percentiles>,
    /// End-to-end latency of the successful requests.
    pub e2e_ms: Option<Percentiles>,
}

impl GroupSummary {
    /// Summarises `records` under `name`.
    pub fn of<'a>(name: &str, records: impl IntoIterator<Item = &'a RequestRecord>) -> Self {
        let records: Vec<&RequestRecord> = records.into_iter().collect();
        let ok: Vec<&RequestRecord> = records.iter().copied().filter(|r| r.ok).collect();
        Self {
            name: name.to_owned(),
            requests: records.len(),
            failed: records.len() - ok.len(),
            ttft_ms: Percentiles::from_samples(ok.iter().filter_map(|r| r.ttft_ms)),
            itl_ms: Percentiles::from_samples(
                ok.iter().flat_map(|r| r.itl_gaps_ms.iter().copied()),
            ),
            e2e_ms: Percentiles::from_samples(ok.iter().map(|r| r.e2e_ms)),
        }
    }
}

/// One load level (one concurrency or one rate) summarised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// `c=8` or `rate=2.5`, plus any label the caller gave.
    pub label: String,
    /// The concurrency, in closed-loop mode.
    pub concurrency: Option<usize>,
    /// The arrival rate in requests per second, in open-loop mode.
    pub rate: Option<f64>,
    /// Wall time from the first send to the last answer, in seconds.
    pub duration_s: f64,
    /// Output tokens of the successful requests.
    pub output_tokens: u64,
    /// `output_tokens / duration_s`.
    pub output_tokens_per_s: f64,
    /// Successful requests per second.
    pub requests_per_s: f64,
    /// Every request of the load (not the probes).
    pub all: GroupSummary,
    /// The load's requests by priority, most urgent first; empty when no
    /// priority was sent.
    pub by_priority: Vec<GroupSummary>,
    /// The HIGH-priority probes sent on top of the load, if any.
    pub probe: Option<GroupSummary>,
    /// How often each error message was seen (messages cut to 120 chars).
    pub errors: BTreeMap<String, usize>,
}

impl RunSummary {
    /// Summarises one level's records.
    pub fn of(
        label: String,
        concurrency: Option<usize>,
        rate: Option<f64>,
        duration_s: f64,
        records: &[RequestRecord],
    ) -> Self {
        let load: Vec<&RequestRecord> = records.iter().filter(|r| !r.probe).collect();
        let probes: Vec<&RequestRecord> = records.iter().filter(|r| r.probe).collect();
        let ok: Vec<&&RequestRecord> = load.iter().filter(|r| r.ok).collect();
        let output_tokens: u64 = ok.iter().map(|r| u64::from(r.output_tokens)).sum();
        let per_s = |x: f64| {
            if duration_s > 0.0 {
                x / duration_s
            } else {
                0.0
            }
        };
        let by_priority = ["high", "normal", "low"]
            .into_iter()
            .filter_map(|p| {
                let group: Vec<&RequestRecord> = load
                    .iter()
                    .copied()
                    .filter(|r| r.priority.as_deref() == Some(p))
                    .collect();
                (!group.is_empty()).then(|| GroupSummary::of(p, group))
            })
            .collect();
        let mut errors = BTreeMap::new();
        for e in records.iter().filter_map(|r| r.error.as_deref()) {
            let key: String = e.chars().take(120).collect();
            *errors.entry(key).or_insert(0) += 1;
        }
        Self {
            label,
            concurrency,
            rate,
            duration_s,
            output_tokens,
            output_tokens_per_s: per_s(output_tokens as f64),
            requests_per_s: per_s(ok.len() as f64),
            all: GroupSummary::of("all", load.iter().copied()),
            by_priority,
            probe: (!probes.is_empty()).then(|| GroupSummary::of("high probe", probes)),
            errors,
        }
    }

    /// The x value of this level on a chart: its concurrency or its rate.
    pub fn load_value(&self) -> f64 {
        self.concurrency
            .map(|c| c as f64)
            .or(self.rate)
            .unwrap_or(0.0)
    }
}

/// Every level of one `bench` invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchSummary {
    /// The URL that was measured.
    pub url: String,
    /// One summary per level, in the order they ran.
    pub runs: Vec<RunSummary>,
}

fn p3(p: Option<&Percentiles>) -> String {
    p.map_or_else(
        || "-".to_owned(),
        |p| format!("{:.0}/{:.0}/{:.0}", p.p50, p.p90, p.p99),
    )
}

fn group_row(out: &mut String, level: &str, g: &GroupSummary, tok_s: &str) {
    let _ = writeln!(
        out,
        "{:<14} {:<11} {:>5} {:>5} {:>10} {:>18} {:>18} {:>20}",
        level,
        g.name,
        g.requests - g.failed,
        g.failed,
        tok_s,
        p3(g.ttft_ms.as_ref()),
        p3(g.itl_ms.as_ref()),
        p3(g.e2e_ms.as_ref()),
    );
}

/// Renders the summary as a fixed-width text table (latencies in ms as
/// p50/p90/p99), one block per level, then the errors seen.
pub fn render_table(summary: &BenchSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:<11} {:>5} {:>5} {:>10} {:>18} {:>18} {:>20}",
        "level",
        "group",
        "ok",
        "fail",
        "out tok/s",
        "TTFT p50/p90/p99",
        "ITL p50/p90/p99",
        "E2E p50/p90/p99"
    );
    for run in &summary.runs {
        group_row(
            &mut out,
            &run.label,
            &run.all,
            &format!("{:.1}", run.output_tokens_per_s),
        );
        for g in run.by_priority.iter().chain(run.probe.as_ref()) {
            group_row(&mut out, "", g, "");
        }
    }
    let errors: BTreeMap<&str, usize> = summary.runs.iter().flat_map(|r| r.errors.iter()).fold(
        BTreeMap::new(),
        |mut acc, (k, v)| {
            *acc.entry(k.as_str()).or_insert(0) += v;
            acc
        },
    );
    for (msg, n) in errors {
        let _ = writeln!(out, "error x{n}: {msg}");
    }
    out
}
