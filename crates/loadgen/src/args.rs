//! The `bench` command line and its checked form.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    runner::{LevelConfig, LoadMode, ProbeConfig},
    spec::parse_list,
    Endpoint, LengthSpec, LoadgenError, PriorityMix, Target, WorkloadConfig,
};

/// Load-generator options, shared by `mlx-batch bench` and `cargo xtask bench`.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
pub struct BenchArgs {
    /// Base URL of the OpenAI-compatible server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The `model` field to send (omitted when not given).
    #[arg(long)]
    pub model: Option<String>,
    /// Which route to call.
    #[arg(long, value_enum, default_value = "chat")]
    pub endpoint: Endpoint,
    /// Closed-loop concurrency; a comma-separated list runs a sweep (`1,8,32`).
    #[arg(long, conflicts_with = "rate")]
    pub concurrency: Option<String>,
    /// Open-loop Poisson arrival rate in requests/s; a list runs a sweep.
    #[arg(long)]
    pub rate: Option<String>,
    /// Requests per level (probes come on top).
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Prompt length in tokens: fixed (`128`) or uniform range (`32..256`).
    #[arg(long, default_value = "128")]
    pub prompt_tokens: LengthSpec,
    /// `max_tokens` per request: fixed or a uniform range.
    #[arg(long, default_value = "64")]
    pub max_tokens: LengthSpec,
    /// Priorities to send, such as `high=0.1,normal=0.6,low=0.3`; without it
    /// no `priority` field is sent.
    #[arg(long)]
    pub priority_mix: Option<PriorityMix>,
    /// HIGH-priority probe requests to send on a timer, on top of each level.
    #[arg(long, default_value_t = 0)]
    pub probe_high: usize,
    /// Milliseconds between probes (the first waits this long too).
    #[arg(long, default_value_t = 2000)]
    pub probe_interval_ms: u64,
    /// Requests sent one at a time before the first level and not measured.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Seed for prompts, lengths, priorities and arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 300.0)]
    pub request_timeout_s: f64,
    /// The longest one level may run, in seconds.
    #[arg(long, default_value_t = 900.0)]
    pub max_duration_s: f64,
    /// Write every request's measurements and the summaries as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Draw a PNG chart of throughput and latency against load here.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// Do not draw a progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

impl Default for BenchArgs {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".to_owned(),
            model: None,
            endpoint: Endpoint::Chat,
            concurrency: None,
            rate: None,
            requests: 32,
            prompt_tokens: LengthSpec::fixed(128),
            max_tokens: LengthSpec::fixed(64),
            priority_mix: None,
            probe_high: 0,
            probe_interval_ms: 2000,
            warmup: 0,
            seed: 0,
            request_timeout_s: 300.0,
            max_duration_s: 900.0,
            out: None,
            chart: None,
            no_progress: false,
        }
    }
}

fn seconds(arg: &'static str, s: f64) -> Result<Duration, LoadgenError> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| LoadgenError::arg(arg, format!("{s}: want a positive number of seconds")))
}

impl BenchArgs {
    /// The load modes to sweep, in order.
    pub fn modes(&self) -> Result<Vec<LoadMode>, LoadgenError> {
        if let Some(rates) = &self.rate {
            let rates: Vec<f64> = parse_list(rates, "rate")?;
            if let Some(bad) = rates.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
                return Err(LoadgenError::arg("rate", format!("{bad}: want > 0")));
            }
            return Ok(rates.into_iter().map(LoadMode::Rate).collect());
        }
        let levels: Vec<usize> =
            parse_list(self.concurrency.as_deref().unwrap_or("1"), "concurrency")?;
        if levels.contains(&0) {
            return Err(LoadgenError::arg("concurrency", "0: want >= 1"));
        }
        Ok(levels.into_iter().map(LoadMode::Concurrency).collect())
    }

    /// Checks every value and builds one [`LevelConfig`] per level.
    pub fn levels(&self, label: &str) -> Result<Vec<LevelConfig>, LoadgenError> {
        if self.requests == 0 {
            return Err(LoadgenError::arg("requests", "want >= 1"));
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(LoadgenError::arg(
                "url",
                format!("{}: want http(s)://", self.url),
            ));
        }
        let request_timeout = seconds("request-timeout-s", self.request_timeout_s)?;
        let max_duration = seconds("max-duration-s", self.max_duration_s)?;
        let target = Target {
            base_url: self.url.clone(),
            model: self.model.clone(),
            endpoint: self.endpoint,
        };
        let workload = WorkloadConfig {
            prompt_tokens: self.prompt_tokens,
            max_tokens: self.max_tokens,
            priority_mix: self.priority_mix.clone(),
            seed: self.seed,
        };
        let probe = (self.probe_high > 0).then(|| ProbeConfig {
            count: self.probe_high,
            interval: Duration::from_millis(self.probe_interval_ms),
        });
        Ok(self
            .modes()?
            .into_iter()
            .map(|mode| LevelConfig {
                target: target.clone(),
                mode,
                requests: self.requests,
                workload: workload.clone(),
                probe,
                request_timeout,
                max_duration,
                progress: !self.no_progress,
                label: label.to_owned(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.bench)
    }

    #[test]
    fn defaults_match_the_default_impl() {
        assert_eq!(parse(&[]).unwrap(), BenchArgs::default());
    }

    #[test]
    fn sweep_and_distributions_parse() {
        let a = parse(&[
            "--concurrency",
            "1,8,32",
            "--prompt-tokens",
            "32..256",
            "--priority-mix",
            "high=0.1,normal=0.6,low=0.3",
            "--endpoint",
            "completions",
        ])
        .unwrap();
        let levels = a.levels("").unwrap();
        let modes: Vec<LoadMode> = levels.iter().map(|l| l.mode).collect();
        assert_eq!(modes, [1, 8, 32].map(LoadMode::Concurrency).to_vec());
        assert_eq!(a.prompt_tokens, LengthSpec { min: 32, max: 256 });
        assert_eq!(a.endpoint, Endpoint::Completions);
        assert_eq!(a.priority_mix.unwrap().weights.len(), 3);
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(parse(&["--rate", "2", "--concurrency", "4"]).is_err());
        assert!(parse(&["--prompt-tokens", "0"]).is_err());
        assert!(parse(&["--priority-mix", "urgent=1"]).is_err());
        let bad_level = parse(&["--concurrency", "0"]).unwrap();
        assert!(bad_level.levels("").is_err());
        let bad_rate = parse(&["--rate=-1"]).unwrap();
        assert!(bad_rate.levels("").is_err());
        let bad_url = parse(&["--url", "127.0.0.1:8080"]).unwrap();
        assert!(bad_url.levels("").is_err());
        let zero_timeout = parse(&["--request-timeout-s", "0"]).unwrap();
        assert!(zero_timeout.levels("").is_err());
        let rates = parse(&["--rate", "0.5,2"]).unwrap();
        assert_eq!(
            rates.modes().unwrap(),
            vec![LoadMode::Rate(0.5), LoadMode::Rate(2.0)]
        );
    }
}
