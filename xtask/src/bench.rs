//! `cargo xtask bench [--quick]`: mlx-batch side by side with its peers.
//!
//! Each server (mlx-batch, mlx-lm's batching server, llama.cpp's
//! `llama-server` with `--parallel`; see [`peers`]) is started alone on a
//! loopback port with the same model, waited on until `/v1/models` answers
//! (and, for mlx-batch, `/health/ready`: it serves HTTP while it loads),
//! measured with the `loadgen` crate on the same seeded workloads, and
//! killed before the next one starts, so no two servers ever share the
//! cores. A server that cannot be installed or started is reported as not
//! run rather than failing the whole comparison, because the point is a
//! table of whatever can be measured. The machine's f32 GEMM speed and
//! memory bandwidth are measured first and printed with the results: the
//! same machine has given anything from 30 to 460 GFLOP/s from one day to
//! the next, so only ratios within one run mean anything.
//!
//! The environment sets `OPENBLAS_CORETYPE` and `OPENBLAS_L2_SIZE`, which
//! halve OpenBLAS GEMM speed here; every server started by this command has
//! both unset (only in its own environment), and the report says so.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use loadgen::{BenchArgs as LoadArgs, ChartSeries, LengthSpec, RunSummary};

use crate::util::{build_release_server, workspace_root};

mod conversation;
mod peers;

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A small version: fewer requests, lower concurrency, short prompts only.
    #[arg(long)]
    quick: bool,
    /// Servers to measure, comma-separated, from `mlx-batch,mlx-lm,llama-server`.
    #[arg(long, default_value = "mlx-batch,mlx-lm,llama-server")]
    servers: String,
    /// Where the table and the chart go (default `docs/benchmarks`, or
    /// `bench-results/quick` with `--quick`).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// The loopback port the servers listen on, one at a time.
    #[arg(long, default_value_t = 18080)]
    port: u16,
    /// Do not install missing peers; skip them instead.
    #[arg(long)]
    no_install: bool,
    /// The longest a server may take to answer `/v1/models`, in seconds.
    #[arg(long, default_value_t = 600)]
    ready_timeout_s: u64,
    /// Only the multi-turn chat comparison of mlx-batch with and without
    /// its prefix cache (written to `conversation.md`), which otherwise
    /// runs after the servers when mlx-batch is among them.
    #[arg(long)]
    conversation_only: bool,
}

/// The three servers this command knows how to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Server {
    MlxBatch,
    MlxLm,
    LlamaCpp,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Self::MlxBatch => "mlx-batch",
            Self::MlxLm => "mlx-lm",
            Self::LlamaCpp => "llama-server",
        }
    }

    /// Where the server says it accepts work, when `/v1/models` answering
    /// is not enough: mlx-batch serves HTTP while it loads the weights and
    /// answers 503 until then.
    fn readiness_path(self) -> Option<&'static str> {
        match self {
            Self::MlxBatch => Some("/health/ready"),
            Self::MlxLm | Self::LlamaCpp => None,
        }
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        [Self::MlxBatch, Self::MlxLm, Self::LlamaCpp]
            .into_iter()
            .find(|v| v.name() == s.trim())
            .with_context(|| {
                format!("unknown server {s:?}: want mlx-batch, mlx-lm or llama-server")
            })
    }
}

/// One workload: a prompt length and concurrency levels.
struct Workload {
    name: &'static str,
    prompt_tokens: u32,
    levels: Vec<usize>,
}

/// The sizes of a run, full or quick.
struct Plan {
    max_tokens: u32,
    workloads: Vec<Workload>,
    /// Requests per level: `max(min_requests, per_stream * concurrency)`.
    per_stream: usize,
    min_requests: usize,
    probe_concurrency: usize,
    probe_count: usize,
    probe_interval_ms: u64,
    /// Words in the prompt of the prefill row (one long prompt, alone).
    prefill_prompt: u32,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                max_tokens: 32,
                workloads: vec![Workload {
                    name: "short",
                    prompt_tokens: 32,
                    levels: vec![1, 8],
                }],
                per_stream: 1,
                min_requests: 3,
                probe_concurrency: 8,
                probe_count: 2,
                probe_interval_ms: 1500,
                prefill_prompt: 512,
            }
        } else {
            Self {
                max_tokens: 128,
                workloads: vec![
                    Workload {
                        name: "short",
                        prompt_tokens: 32,
                        levels: vec![1, 8, 32],
                    },
                    Workload {
                        name: "long",
                        prompt_tokens: 512,
                        levels: vec![1, 8, 32],
                    },
                ],
                per_stream: 2,
                min_requests: 4,
                probe_concurrency: 32,
                probe_count: 4,
                probe_interval_ms: 3000,
                prefill_prompt: 2000,
            }
        }
    }

    fn requests(&self, concurrency: usize) -> usize {
        (self.per_stream * concurrency).max(self.min_requests)
    }

    /// The highest concurrency of any level: llama-server needs a slot
    /// (`--parallel`) for each.
    fn max_concurrency(&self) -> usize {
        self.workloads
            .iter()
            .flat_map(|w| w.levels.iter().copied())
            .chain([self.probe_concurrency])
            .max()
            .unwrap_or(1)
    }
}

/// What was measured for one server.
struct Measured {
    /// Summaries by workload name, one per concurrency level.
    by_workload: BTreeMap<&'static str, Vec<RunSummary>>,
    /// The HIGH-priority probe level.
    probe: Option<RunSummary>,
    /// One long prompt alone: its time to first token.
    prefill: Option<RunSummary>,
    /// The prompt tokens the server reported for that prompt, on average.
    prefill_prompt_tokens: Option<f64>,
    /// The same HIGH requests one at a time on the idle server: the TTFT
    /// the probe's is compared with.
    idle_high: Option<RunSummary>,
    /// `/proc/loadavg` when the measurement started: other work on the
    /// machine skews every number, so the report shows it.
    load_before: String,
}

/// Kills the server when dropped, so an error or a panic never leaves one
/// running.
struct Running {
    child: Child,
    name: &'static str,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("xtask: bench: stopped {}", self.name);
    }
}

/// Runs the comparison.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let root = workspace_root();
    let servers = args
        .servers
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(Server::parse)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let out_dir = args.out_dir.clone().unwrap_or_else(|| {
        if args.conversation_only {
            root.join("bench-results").join("conversation")
        } else if args.quick {
            root.join("bench-results").join("quick")
        } else {
            root.join("docs").join("benchmarks")
        }
    });
    let raw_dir = root.join("bench-results").join("raw");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    fs::create_dir_all(&raw_dir).with_context(|| format!("creating {}", raw_dir.display()))?;
    let model_dir = root.join(".models").join("SmolLM2-135M-Instruct");
    if !model_dir.join("config.json").is_file() {
        bail!(
            "no model at {}: run `cargo xtask setup` first",
            model_dir.display()
        );
    }
    let plan = Plan::new(args.quick);
    // The GEMM probe runs on mlx-lm's MLX, so install it first when it is
    // to be measured anyway; `prepare` reports a failure later.
    if servers.contains(&Server::MlxLm) {
        if let Err(e) = ensure_mlx_lm(&root, args.no_install) {
            eprintln!("xtask: bench: mlx-lm is not installed: {e:#}");
        }
    }
    let machine = machine_info(&root);
    eprintln!("xtask: bench: machine: {machine}");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    eprintln!(
        "xtask: bench: every server runs with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset \
         (they halve OpenBLAS GEMM speed on this machine)"
    );

    let compare_cache = servers.contains(&Server::MlxBatch) || args.conversation_only;
    let paths = conversation::Paths {
        root: &root,
        model_dir: &model_dir,
        raw_dir: &raw_dir,
        out_dir: &out_dir,
    };
    if args.conversation_only {
        return conversation::compare(&paths, &args, &runtime, &machine);
    }
    let mut measured: BTreeMap<Server, Measured> = BTreeMap::new();
    let mut skipped: Vec<(Server, String)> = Vec::new();
    for server in servers {
        let started = prepare(server, &root, &model_dir, &args, plan.max_concurrency())
            .and_then(|cmd| start(server, cmd, &raw_dir, args.port));
        let running = match started {
            Ok(r) => r,
            Err(e) => {
                eprintln!("xtask: bench: skipping {}: {e:#}", server.name());
                skipped.push((server, format!("{e:#}")));
                continue;
            }
        };
        let base = format!("http://127.0.0.1:{}", args.port);
        let result = runtime.block_on(async {
            let listed = wait_ready(
                &base,
                &running,
                server,
                Duration::from_secs(args.ready_timeout_s),
            )
            .await?;
            // mlx-lm lists every model in the Hugging Face cache, and a name
            // it does not know makes it load another model: send none, which
            // it maps to the one it was started with.
            let model = if server == Server::MlxLm {
                None
            } else {
                listed
            };
            measure(server, &base, model, &plan, &raw_dir).await
        });
        drop(running);
        match result {
            Ok(m) => {
                measured.insert(server, m);
            }
            Err(e) => {
                eprintln!("xtask: bench: {} failed: {e:#}", server.name());
                skipped.push((server, format!("{e:#}")));
            }
        }
    }
    write_report(&Report {
        out_dir: &out_dir,
        plan: &plan,
        quick: args.quick,
        measured: &measured,
        skipped: &skipped,
        machine: &machine,
    })?;
    if compare_cache {
        conversation::compare(&paths, &args, &runtime, &machine)?;
    }
    Ok(())
}

/// Finds the GGUF that setup extracted under `.models/download`.
fn find_gguf(root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root.join(".models").join("download");
    let mut found: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    found.sort();
    found
        .into_iter()
        .next()
        .with_context(|| format!("no .gguf in {}: run `cargo xtask setup`", dir.display()))
}

/// Context tokens each llama-server slot gets: the prefill row's prompt
/// (about 2,000 words, a little more in tokens with the chat template) plus
/// the answer.
const LLAMA_SLOT_CONTEXT: usize = 2560;

/// Builds or installs what `server` needs and returns its command line.
fn prepare(
    server: Server,
    root: &Path,
    model_dir: &Path,
    args: &BenchArgs,
    slots: usize,
) -> anyhow::Result<Command> {
    let port = args.port.to_string();
    let mut cmd = match server {
        Server::MlxBatch => {
            let binary = build_release_server("building mlx-batch (release)")?;
            let mut cmd = Command::new(binary);
            cmd.arg("serve").arg("--model").arg(model_dir).args([
                "--host",
                "127.0.0.1",
                "--port",
                &port,
            ]);
            cmd
        }
        Server::MlxLm => {
            ensure_mlx_lm(root, args.no_install)?;
            let model = peers::mlx_lm_model(root, model_dir, peers::mlx_has_gpu(root))?;
            // Its own folder for MLX's JIT kernel cache, which MLX keys by
            // name only: mlx-lm gets the kernels its own build makes.
            let tmp = root.join(".mlx").join("mlx-lm-tmp");
            fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let mut cmd = mlx_python(root);
            cmd.args(["-m", "mlx_lm.server", "--model"])
                .arg(model)
                .args(["--host", "127.0.0.1", "--port", &port])
                .env("TMPDIR", tmp);
            cmd
        }
        Server::LlamaCpp => {
            let bin = peers::ensure_llama_server(root, args.no_install)?;
            let gguf = find_gguf(root)?;
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
            let slots = slots.max(1);
            let mut cmd = Command::new(bin);
            cmd.arg("-m")
                .arg(gguf)
                .args(["-t", &threads.to_string()])
                // One slot per concurrent request, each with room for the
                // longest prompt: `-c` is split across the slots.
                .args(["--parallel", &slots.to_string()])
                .args(["-c", &(slots * LLAMA_SLOT_CONTEXT).to_string()])
                .args(["--host", "127.0.0.1", "--port", &port]);
            cmd
        }
    };
    cmd.env_remove("OPENBLAS_CORETYPE")
        .env_remove("OPENBLAS_L2_SIZE");
    Ok(cmd)
}

/// Installs mlx-lm on the pinned MLX wheel into `.mlx/python` (as setup's
/// references do), unless it is there.
fn ensure_mlx_lm(root: &Path, no_install: bool) -> anyhow::Result<()> {
    if no_install && !crate::setup::references::mlx_lm_installed(root) {
        bail!("mlx-lm is not installed in .mlx/python (--no-install)");
    }
    crate::setup::references::ensure_mlx_lm(root)
}

/// `python3` over the MLX Python in `.mlx/python`, with OpenBLAS as it is
/// for our binary: MLX's CPU wheel batches only through OpenBLAS (see the
/// project facts), so it is preloaded when the system has it, and the two
/// variables that slow it down are unset.
fn mlx_python(root: &Path) -> Command {
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", root.join(".mlx").join("python"))
        .env_remove("OPENBLAS_CORETYPE")
        .env_remove("OPENBLAS_L2_SIZE");
    if let Some(blas) = openblas() {
        cmd.env("LD_PRELOAD", blas);
    }
    cmd
}

/// Debian's OpenBLAS, when installed.
fn openblas() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
        "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Starts `cmd`, its output going to a log file beside the raw results.
fn start(server: Server, mut cmd: Command, raw_dir: &Path, port: u16) -> anyhow::Result<Running> {
    if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        bail!("port {port} is already in use");
    }
    let log_path = raw_dir.join(format!("{}.log", server.name()));
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let err = log.try_clone().context("duplicating the log handle")?;
    cmd.stdin(Stdio::null()).stdout(log).stderr(err);
    eprintln!(
        "xtask: bench: starting {}: {cmd:?} (log: {})",
        server.name(),
        log_path.display()
    );
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", server.name()))?;
    Ok(Running {
        child,
        name: server.name(),
    })
}

/// Polls `GET /v1/models` (and the server's readiness path, if it has
/// one) until it answers 200, the server exits, or time runs out; returns
/// the first model id it lists, if any.
async fn wait_ready(
    base: &str,
    running: &Running,
    server: Server,
    timeout: Duration,
) -> anyhow::Result<Option<String>> {
    let http = loadgen::http_client()?;
    let url = format!("{base}/v1/models");
    let start = Instant::now();
    let pid = running.child.id();
    let accepts_work = || async {
        let Some(path) = server.readiness_path() else {
            return true;
        };
        let ready = http
            .get(format!("{base}{path}"))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        ready.is_ok_and(|r| r.status().is_success())
    };
    loop {
        if let Ok(resp) = http.get(&url).timeout(Duration::from_secs(5)).send().await {
            if resp.status().is_success() && accepts_work().await {
                eprintln!(
                    "xtask: bench: {} ready after {:.1} s",
                    running.name,
                    start.elapsed().as_secs_f64()
                );
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                let id = body["data"][0]["id"].as_str().map(str::to_owned);
                return Ok(id);
            }
        }
        // `/proc/PID` disappears once the child has exited and been reaped;
        // a zombie still has it, so also look at its state.
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z ") {
            bail!("{} exited before it was ready (see its log)", running.name);
        }
        if start.elapsed() > timeout {
            bail!("{} not ready after {timeout:?}", running.name);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs every workload and the probe against one ready server.
async fn measure(
    server: Server,
    base: &str,
    model: Option<String>,
    plan: &Plan,
    raw_dir: &Path,
) -> anyhow::Result<Measured> {
    let base_args = LoadArgs {
        url: base.to_owned(),
        model,
        max_tokens: LengthSpec::fixed(plan.max_tokens),
        request_timeout_s: 600.0,
        max_duration_s: 900.0,
        no_progress: false,
        seed: 7,
        ..LoadArgs::default()
    };
    // Warm-up: the first requests of a fresh server pay for lazy loading.
    let warm = LoadArgs {
        concurrency: Some("1".to_owned()),
        requests: 2,
        prompt_tokens: LengthSpec::fixed(32),
        no_progress: true,
        ..base_args.clone()
    };
    loadgen::run_report(&warm, "warmup").await?;
    let load_before = fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned());

    let mut by_workload = BTreeMap::new();
    for w in &plan.workloads {
        let mut runs = Vec::new();
        for &c in &w.levels {
            let args = LoadArgs {
                concurrency: Some(c.to_string()),
                requests: plan.requests(c),
                prompt_tokens: LengthSpec::fixed(w.prompt_tokens),
                ..base_args.clone()
            };
            let report =
                loadgen::run_report(&args, &format!("{} {}", server.name(), w.name)).await?;
            report.write_json(&raw_dir.join(format!("{}-{}-c{c}.json", server.name(), w.name)))?;
            let summary = report.summary();
            println!("{}", loadgen::render_table(&summary));
            runs.extend(summary.runs);
        }
        by_workload.insert(w.name, runs);
    }
    let idle = LoadArgs {
        concurrency: Some("1".to_owned()),
        requests: plan.probe_count.max(3),
        prompt_tokens: LengthSpec::fixed(32),
        priority_mix: Some("high=1".parse()?),
        ..base_args.clone()
    };
    let idle_report = loadgen::run_report(&idle, &format!("{} idle HIGH", server.name())).await?;
    idle_report.write_json(&raw_dir.join(format!("{}-idle-high.json", server.name())))?;
    let idle_high = idle_report.summary().runs.into_iter().next();
    let args = LoadArgs {
        concurrency: Some(plan.probe_concurrency.to_string()),
        requests: plan.requests(plan.probe_concurrency),
        prompt_tokens: LengthSpec::fixed(32),
        priority_mix: Some("normal=0.5,low=0.5".parse()?),
        probe_high: plan.probe_count,
        probe_interval_ms: plan.probe_interval_ms,
        ..base_args.clone()
    };
    let report = loadgen::run_report(&args, &format!("{} probe", server.name())).await?;
    report.write_json(&raw_dir.join(format!("{}-probe.json", server.name())))?;
    let summary = report.summary();
    println!("{}", loadgen::render_table(&summary));
    // Last, so that no earlier level's prompts are in any server's cache: a
    // seed of its own makes these prompts new to the server.
    let long = LoadArgs {
        concurrency: Some("1".to_owned()),
        requests: 2,
        prompt_tokens: LengthSpec::fixed(plan.prefill_prompt),
        max_tokens: LengthSpec::fixed(2),
        seed: 1_000_003,
        ..base_args.clone()
    };
    let prefill_report = loadgen::run_report(&long, &format!("{} prefill", server.name())).await?;
    prefill_report.write_json(&raw_dir.join(format!("{}-prefill.json", server.name())))?;
    let counts: Vec<f64> = prefill_report
        .levels
        .iter()
        .flat_map(|l| &l.records)
        .filter_map(|r| r.usage_prompt_tokens.map(f64::from))
        .collect();
    let prefill_prompt_tokens =
        (!counts.is_empty()).then(|| counts.iter().sum::<f64>() / counts.len() as f64);
    Ok(Measured {
        by_workload,
        probe: summary.runs.into_iter().next(),
        prefill: prefill_report.summary().runs.into_iter().next(),
        prefill_prompt_tokens,
        idle_high,
        load_before,
    })
}

fn ms(p: Option<&loadgen::Percentiles>, f: fn(&loadgen::Percentiles) -> f64) -> String {
    p.map_or_else(|| "-".to_owned(), |p| format!("{:.0}", f(p)))
}

fn ratio(ours: Option<f64>, peer: Option<f64>) -> String {
    match (ours, peer) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".to_owned(),
    }
}

/// Times a 2048x2048 f32 matmul through MLX and OpenBLAS, the operation
/// that bounds mlx-batch and mlx-lm on a CPU, and the memory's read
/// bandwidth (a sum over 256 MiB of f32 on one thread, as numpy does it,
/// which streams as fast as one core can read). `None` when Python MLX is
/// not installed.
fn machine_probe(root: &Path) -> Option<(f64, f64)> {
    const PROBE: &str = "import mlx.core as mx, numpy as np, time\n\
        a = mx.random.normal((2048, 2048)); b = mx.random.normal((2048, 2048)); mx.eval(a, b)\n\
        for _ in range(3): mx.eval(a @ b)\n\
        t = time.perf_counter()\n\
        for _ in range(10): mx.eval(a @ b)\n\
        gemm = 2 * 2048**3 * 10 / (time.perf_counter() - t) / 1e9\n\
        x = np.ones(64 * 1024 * 1024, dtype=np.float32); x.sum()\n\
        t = time.perf_counter()\n\
        for _ in range(5): x.sum()\n\
        bw = x.nbytes * 5 / (time.perf_counter() - t) / 1e9\n\
        print(gemm, bw)\n";
    let out = mlx_python(root)
        .args(["-c", PROBE])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let mut numbers = text.split_whitespace().filter_map(|w| w.parse().ok());
    Some((numbers.next()?, numbers.next()?))
}

/// Machine facts for the report.
fn machine_info(root: &Path) -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let probe = machine_probe(root).map_or_else(
        || "GEMM and memory bandwidth not measured (no Python MLX)".to_owned(),
        |(gemm, bw)| {
            format!(
                "f32 GEMM 2048x2048 through MLX and OpenBLAS {gemm:.0} GFLOP/s, memory read {bw:.1} GB/s (one thread)"
            )
        },
    );
    format!("{cores} cores (nproc), CPU: {cpu}, measured before the runs: {probe}")
}

/// Everything the report is made from.
struct Report<'a> {
    out_dir: &'a Path,
    plan: &'a Plan,
    quick: bool,
    measured: &'a BTreeMap<Server, Measured>,
    skipped: &'a [(Server, String)],
    /// [`machine_info`], taken before any server ran.
    machine: &'a str,
}

/// Writes `README.md` and `comparison.png` into `out_dir`.
fn write_report(report: &Report<'_>) -> anyhow::Result<()> {
    let Report {
        out_dir,
        plan,
        quick,
        measured,
        skipped,
        machine,
    } = *report;
    let mut md = String::new();
    let commit = crate::util::output(
        "git commit",
        Command::new("git").args(["rev-parse", "--short", "HEAD"]),
    )
    .map(|s| s.trim().to_owned())
    .unwrap_or_else(|_| "unknown".to_owned());
    let _ = writeln!(md, "# mlx-batch side by side\n");
    let _ = writeln!(
        md,
        "Made by `cargo xtask bench{}` at commit `{commit}`. Machine: {}.\n",
        if quick { " --quick" } else { "" },
        machine
    );
    let _ = writeln!(
        md,
        "Same model for all: SmolLM2-135M-Instruct. mlx-batch loads the folder made by \
         `cargo xtask setup` and runs it in f32 on a CPU; mlx-lm's batching server runs the same \
         MLX wheel on the same dtype (a copy converted to f32 with mlx-lm's own converter on a \
         CPU, the stored folder on a GPU); llama.cpp's own `llama-server` (built from the sources \
         vendored in the llama-cpp-python 0.3.36 sdist, `--parallel` = the highest concurrency, \
         {LLAMA_SLOT_CONTEXT} context tokens per slot, one thread per core) loads the original \
         Q4_1 GGUF. Chat completions, greedy (temperature 0), streaming, `max_tokens` {}, prompts \
         of a fixed length built from a seeded word list. Every server ran alone, with \
         `OPENBLAS_CORETYPE` and `OPENBLAS_L2_SIZE` unset in its own environment; mlx-lm ran with \
         Debian's OpenBLAS preloaded. Latencies in ms, measured on the client.\n",
        plan.max_tokens
    );
    for (server, m) in measured {
        let _ = writeln!(
            md,
            "- {}: load average before its runs {} (on {} cores; well above the core count means other work skewed the numbers)",
            server.name(),
            m.load_before,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
    }
    for (server, why) in skipped {
        let first = why.lines().next().unwrap_or("");
        let _ = writeln!(md, "- **{} not measured**: {first}", server.name());
    }
    md.push('\n');
    let ours = measured.get(&Server::MlxBatch);
    for w in &plan.workloads {
        let _ = writeln!(md, "## {} prompts ({} tokens)\n", w.name, w.prompt_tokens);
        let _ = writeln!(
            md,
            "| concurrency | server | ok/failed | out tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | E2E p99 | tok/s ours/peer | p99 TTFT ours/peer |"
        );
        let _ = writeln!(
            md,
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (i, &c) in w.levels.iter().enumerate() {
            let our_run = ours
                .and_then(|m| m.by_workload.get(w.name))
                .and_then(|r| r.get(i));
            for (server, m) in measured {
                let Some(run) = m.by_workload.get(w.name).and_then(|r| r.get(i)) else {
                    continue;
                };
                let (tok_ratio, ttft_ratio) = if *server == Server::MlxBatch {
                    ("1".to_owned(), "1".to_owned())
                } else {
                    (
                        ratio(
                            our_run.map(|r| r.output_tokens_per_s),
                            Some(run.output_tokens_per_s),
                        ),
                        ratio(
                            our_run.and_then(|r| r.all.ttft_ms.map(|p| p.p99)),
                            run.all.ttft_ms.map(|p| p.p99),
                        ),
                    )
                };
                let a = &run.all;
                let _ = writeln!(
                    md,
                    "| {c} | {} | {}/{} | {:.1} | {} | {} | {} | {} | {} | {tok_ratio} | {ttft_ratio} |",
                    server.name(),
                    a.requests - a.failed,
                    a.failed,
                    run.output_tokens_per_s,
                    ms(a.ttft_ms.as_ref(), |p| p.p50),
                    ms(a.ttft_ms.as_ref(), |p| p.p99),
                    ms(a.itl_ms.as_ref(), |p| p.p50),
                    ms(a.itl_ms.as_ref(), |p| p.p99),
                    ms(a.e2e_ms.as_ref(), |p| p.p99),
                );
            }
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "## Prefill\n\nOne prompt of {} words (a little more in tokens) sent alone, twice, to the \
         otherwise idle server after every other level, with prompts no earlier level used. \
         Prompt tokens/s is the prompt tokens the server reported over the time to first token.\n",
        plan.prefill_prompt
    );
    let _ = writeln!(
        md,
        "| server | TTFT p50 (ms) | prompt tokens | prompt tok/s | tok/s ours/peer |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    let prefill_rate = |m: &Measured| {
        let ttft = m.prefill.as_ref()?.all.ttft_ms.as_ref()?.p50;
        let tokens = m.prefill_prompt_tokens?;
        Some((ttft, tokens, tokens / (ttft / 1e3)))
    };
    let our_rate = ours.and_then(prefill_rate).map(|r| r.2);
    for (server, m) in measured {
        if let Some((ttft, tokens, rate)) = prefill_rate(m) {
            let _ = writeln!(
                md,
                "| {} | {ttft:.0} | {tokens:.0} | {rate:.1} | {} |",
                server.name(),
                ratio(our_rate, Some(rate)),
            );
        }
    }
    md.push('\n');
    let _ = writeln!(
        md,
        "## HIGH-priority probe\n\nA load of concurrency {} (NORMAL and LOW, 32-token prompts) with {} HIGH requests \
         started on top, one every {} ms. Peers ignore `priority`, so for them the probe is an ordinary request. \
         The idle column is the same HIGH request sent alone to the idle server, before the load.\n",
        plan.probe_concurrency, plan.probe_count, plan.probe_interval_ms
    );
    let _ = writeln!(md, "| server | idle HIGH p50 TTFT | load p99 TTFT (any request) | HIGH probes ok | HIGH p50 TTFT | HIGH p99 TTFT | out tok/s |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    for (server, m) in measured {
        let Some(run) = &m.probe else { continue };
        let probe = run.probe.as_ref();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {:.1} |",
            server.name(),
            ms(
                m.idle_high.as_ref().and_then(|r| r.all.ttft_ms.as_ref()),
                |p| p.p50
            ),
            ms(run.all.ttft_ms.as_ref(), |p| p.p99),
            probe.map_or_else(
                || "0/0".to_owned(),
                |g| format!("{}/{}", g.requests - g.failed, g.requests)
            ),
            ms(probe.and_then(|g| g.ttft_ms.as_ref()), |p| p.p50),
            ms(probe.and_then(|g| g.ttft_ms.as_ref()), |p| p.p99),
            run.output_tokens_per_s,
        );
    }
    let probe_p99 = |m: &Measured| {
        m.probe
            .as_ref()
            .and_then(|r| r.probe.as_ref())
            .and_then(|g| g.ttft_ms.map(|p| p.p99))
    };
    let any_p99 = |m: &Measured| m.probe.as_ref().and_then(|r| r.all.ttft_ms.map(|p| p.p99));
    if let Some(ours) = ours.and_then(probe_p99) {
        for (server, m) in measured.iter().filter(|(s, _)| **s != Server::MlxBatch) {
            if let Some(peer) = any_p99(m) {
                let _ = writeln!(
                    md,
                    "\nmlx-batch HIGH p99 TTFT {ours:.0} ms vs {} p99 TTFT for any request {peer:.0} ms: ratio {:.2}.",
                    server.name(),
                    ours / peer
                );
            }
        }
    }
    let _ = writeln!(
        md,
        "\n![throughput and latency against concurrency](comparison.png)\n\n\
         Rerun: `cargo xtask setup && cargo xtask bench` (about 40 minutes on 2 cores; `--quick` for a \
         few minutes, written to `bench-results/quick/`; `--servers mlx-lm` for one server). Peers \
         are installed on first use: mlx-lm into `.mlx/python` (its f32 copy of the model in \
         `.mlx/mlx-lm-f32`), llama-server built into `.mlx/llama-server` (about 7 minutes, once). \
         Raw per-request JSON and server logs go to `bench-results/raw/`."
    );
    let readme = out_dir.join("README.md");
    fs::write(&readme, md).with_context(|| format!("writing {}", readme.display()))?;

    let series: Vec<ChartSeries> = measured
        .iter()
        .filter_map(|(server, m)| {
            let runs = m.by_workload.get("short")?.clone();
            Some(ChartSeries {
                name: server.name().to_owned(),
                runs,
            })
        })
        .collect();
    let chart = out_dir.join("comparison.png");
    if !series.is_empty() {
        loadgen::draw_chart(
            &chart,
            "short prompts: servers side by side",
            "concurrency",
            &series,
        )?;
    }
    eprintln!(
        "xtask: bench: wrote {} and {}",
        readme.display(),
        chart.display()
    );
    Ok(())
}
