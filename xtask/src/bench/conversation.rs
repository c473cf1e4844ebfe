//! The multi-turn chat comparison: mlx-batch with and without its prefix
//! cache, on conversations that share a long system prompt and grow turn by
//! turn. Written to `conversation.md` beside the main report.

use std::{fmt::Write as _, fs, path::Path, time::Duration};

use anyhow::Context;
use loadgen::{ConversationConfig, Endpoint, Percentiles, RequestRecord, Target};

use super::{prepare, start, wait_ready, BenchArgs, Server};

/// The workload: a system prompt of about 1k tokens, short questions.
pub(super) fn config(quick: bool) -> ConversationConfig {
    ConversationConfig {
        conversations: if quick { 2 } else { 4 },
        turns: if quick { 3 } else { 4 },
        system_tokens: 1000,
        user_tokens: 32,
        max_tokens: 32,
        seed: 11,
        request_timeout: Duration::from_secs(600),
    }
}

/// One run's records, with the cache on (`cached`) or off.
struct Run {
    cached: bool,
    records: Vec<RequestRecord>,
}

/// Where the comparison reads and writes.
pub(super) struct Paths<'a> {
    pub(super) root: &'a Path,
    pub(super) model_dir: &'a Path,
    pub(super) raw_dir: &'a Path,
    pub(super) out_dir: &'a Path,
}

/// Starts mlx-batch twice (prefix cache on, then off), runs the workload
/// against each and writes the comparison.
pub(super) fn compare(
    paths: &Paths<'_>,
    args: &BenchArgs,
    runtime: &tokio::runtime::Runtime,
    machine: &str,
) -> anyhow::Result<()> {
    let cfg = config(args.quick);
    let mut runs = Vec::new();
    for cached in [true, false] {
        let mut cmd = prepare(Server::MlxBatch, paths.root, paths.model_dir, args, 1)?;
        if !cached {
            cmd.arg("--no-prefix-cache");
        }
        let running = start(Server::MlxBatch, cmd, paths.raw_dir, args.port)?;
        let base = format!("http://127.0.0.1:{}", args.port);
        let records = runtime.block_on(async {
            let timeout = Duration::from_secs(args.ready_timeout_s);
            let model = wait_ready(&base, &running, Server::MlxBatch, timeout).await?;
            let target = Target {
                base_url: base.clone(),
                model,
                endpoint: Endpoint::Chat,
            };
            let http = loadgen::http_client()?;
            anyhow::Ok(loadgen::run_conversations(&http, &target, &cfg).await)
        })?;
        drop(running);
        let label = if cached { "cache" } else { "no-cache" };
        let json = serde_json::to_string_pretty(&records)?;
        fs::write(
            paths.raw_dir.join(format!("conversation-{label}.json")),
            json,
        )?;
        eprintln!("xtask: bench: conversations ({label}) done");
        runs.push(Run { cached, records });
    }
    let md = render(&cfg, &runs, machine);
    let path = paths.out_dir.join("conversation.md");
    fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    print!("{md}");
    Ok(())
}

/// TTFT percentiles of the successful turns that `keep` selects (by turn
/// number within a conversation of `turns`).
fn ttft(
    records: &[RequestRecord],
    turns: usize,
    keep: impl Fn(usize) -> bool,
) -> Option<Percentiles> {
    Percentiles::from_samples(
        records
            .iter()
            .filter(|r| r.ok && keep(r.index % turns.max(1)))
            .filter_map(|r| r.ttft_ms),
    )
}

fn render(cfg: &ConversationConfig, runs: &[Run], machine: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Multi-turn chat: the prefix cache\n");
    let _ = writeln!(
        md,
        "Machine: {machine}.\n\n{} conversations side by side, {} turns each, every turn sending the whole \
         history: a shared system prompt of about {} tokens, questions of about {} tokens and the \
         server's own answers ({} tokens, greedy). mlx-batch ran twice, with its prefix cache and with \
         `--no-prefix-cache`. TTFT in ms, measured on the client.\n",
        cfg.conversations, cfg.turns, cfg.system_tokens, cfg.user_tokens, cfg.max_tokens
    );
    let _ = writeln!(
        md,
        "| run | requests ok | TTFT p50 | TTFT p99 | TTFT p50, turns after the first | cached prompt tokens (mean) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    let mut p50 = Vec::new();
    for run in runs {
        let all = ttft(&run.records, cfg.turns, |_| true);
        let later = ttft(&run.records, cfg.turns, |t| t > 0);
        let cached: Vec<u32> = run
            .records
            .iter()
            .filter_map(|r| r.usage_cached_tokens)
            .collect();
        let mean = if cached.is_empty() {
            0.0
        } else {
            f64::from(cached.iter().sum::<u32>()) / cached.len() as f64
        };
        let fmt = |p: Option<&Percentiles>, f: fn(&Percentiles) -> f64| {
            p.map_or_else(|| "-".to_owned(), |p| format!("{:.0}", f(p)))
        };
        let _ = writeln!(
            md,
            "| {} | {}/{} | {} | {} | {} | {mean:.0} |",
            if run.cached {
                "prefix cache"
            } else {
                "no prefix cache"
            },
            run.records.iter().filter(|r| r.ok).count(),
            cfg.conversations * cfg.turns,
            fmt(all.as_ref(), |p| p.p50),
            fmt(all.as_ref(), |p| p.p99),
            fmt(later.as_ref(), |p| p.p50),
        );
        p50.push(all.map(|p| p.p50));
    }
    if let [Some(with), Some(without)] = p50[..] {
        let _ = writeln!(
            md,
            "\nTTFT p50 with the cache / without: **{:.2}x**.",
            with / without
        );
    }
    if let [a, b] = runs {
        let same = a
            .records
            .iter()
            .zip(&b.records)
            .filter(|(x, y)| x.ok && y.ok && x.text == y.text)
            .count();
        let _ = writeln!(
            md,
            "Same answer text with and without the cache: {same} of {} turns.",
            a.records.len().max(b.records.len())
        );
    }
    let _ = writeln!(
        md,
        "\nRerun: `cargo xtask bench --conversation-only` (raw records in \
         `bench-results/raw/conversation-*.json`)."
    );
    md
}
