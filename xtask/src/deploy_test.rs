//! `cargo xtask deploy-test`: the replica setup of docs/deploy.md, run for
//! real on loopback.
//!
//! Two `mlx-batch serve` replicas of the default model, HAProxy with
//! `deploy/haproxy.cfg` in front of them and Prometheus with
//! `deploy/prometheus.yml` and `deploy/rules.yml`, each a plain child
//! process with its config, data and log under `target/deploy-test/`. The
//! test then checks, in order:
//!
//! 1. the shipped configs pass `haproxy -c`, `promtool check config` and
//!    `promtool check rules` without a warning, and the rules pass their
//!    unit tests (`promtool test rules`);
//! 2. 32 concurrent chat completions through the proxy are all answered,
//!    both replicas serve some (their own `/metrics` counters agree with the
//!    proxy), the `x-priority` header reaches them and every request
//!    reaches them with an `x-request-id`, the client's or a generated one;
//! 3. one replica is killed with SIGKILL while streams run on it: those
//!    streams end with an error, not a hang, and HAProxy did not retry them
//!    (it never does once response bytes went out); every request not yet
//!    answered succeeds, retried by HAProxy on the survivor;
//! 4. Prometheus has the survivor's `mlx_batch_*` series and the rules'
//!    results, reports `up == 0` for the dead replica and holds its alert
//!    pending.
//!
//! HAProxy, Prometheus and promtool come from the Debian packages that
//! `cargo xtask setup --references` installs. Without them the test is
//! skipped with a line saying so, unless `MLX_BATCH_REQUIRE_REFERENCES` is
//! set (as `.ci/run` does), which makes it fail.

mod observe;
mod procs;
mod traffic;

use std::{
    collections::BTreeMap,
    fs,
    future::Future,
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
use tokio::{sync::oneshot, task::JoinHandle};

use crate::util::{build_release_server, target_dir, workspace_root};
use observe::{is_uuid, log_lines, query_samples, sum_metric, url_encode, LogLine};
use procs::{free_ports, Fleet, ProcId};
use traffic::{complete, stream, Chat, Reply, StreamEnd, StreamOutcome};

/// Concurrent requests of the first phase.
const FIRST_REQUESTS: usize = 32;
/// Tokens each of them generates: few, since only their spread counts.
const FIRST_MAX_TOKENS: u32 = 8;
/// Streams running when a replica is killed, spread over both replicas.
const STREAMS: usize = 4;
/// Their length: long enough to be under way when the kill comes, even on
/// hardware many times faster than a 2-core CPU.
const STREAM_MAX_TOKENS: u32 = 160;
/// Requests sent just before the kill (some still unanswered on the victim
/// when it dies) and just after it (before the checks notice).
const KILL_REQUESTS: usize = 8;
/// Their length.
const KILL_MAX_TOKENS: u32 = 16;
/// Their body size: above HAProxy's default 16 KiB buffer, so only the
/// larger `tune.bufsize` of deploy/haproxy.cfg lets them be retried.
const PADDED_BODY: usize = 20 * 1024;
/// How long replicas may take to load the model, the other processes to
/// start and Prometheus to see a change.
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// How long any one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(150);
/// How long a stream may stay silent before it counts as hung.
const STREAM_IDLE: Duration = Duration::from_secs(30);
/// How soon after the kill the dead replica's streams must have failed.
const CUT_LIMIT: Duration = Duration::from_secs(10);
/// How long Prometheus may take to reflect a change.
const PROMETHEUS_TIMEOUT: Duration = Duration::from_secs(30);
/// The scrape and rule interval of this run (15 s in the shipped file):
/// short, so Prometheus sees the kill within seconds.
const TEST_INTERVAL: &str = "1s";
/// The backend name in deploy/haproxy.cfg.
const HAPROXY_BACKEND: &str = "mlx_batch_replicas";

/// The external programs, found where Debian installs them.
struct Tools {
    haproxy: PathBuf,
    prometheus: PathBuf,
    promtool: PathBuf,
}

/// Where each process listens.
struct Ports {
    replicas: [u16; 2],
    lb: u16,
    lb_metrics: u16,
    prometheus: u16,
}

/// One replica: the `server` name HAProxy gives it, its address and its
/// process.
#[derive(Clone)]
struct Replica {
    name: String,
    addr: String,
    proc: ProcId,
}

/// What the scenario needs.
struct Ctx<'a> {
    http: reqwest::Client,
    fleet: &'a Mutex<Fleet>,
    replicas: Vec<Replica>,
    haproxy: ProcId,
    prometheus: ProcId,
    lb: String,
    lb_metrics: String,
    prometheus_url: String,
    haproxy_log: PathBuf,
    model: String,
}

/// The figures the test prints at the end.
#[derive(Default)]
struct Figures {
    first_by_replica: BTreeMap<String, usize>,
    high_seen: f64,
    echo: Option<bool>,
    victim: String,
    cut: Vec<Cut>,
    survivor_streams: usize,
    kill_requests_ok: usize,
    /// Requests the victim held, unanswered, when it died, then retried.
    retried_held: usize,
    /// Requests first offered to the dead victim (connection refused),
    /// then retried.
    retried_refused: usize,
    redispatched: usize,
    haproxy_retries: f64,
    haproxy_redispatches: f64,
    survivor_series: usize,
}

/// A stream that was running on the replica when it was killed.
struct Cut {
    request_id: String,
    /// What the client saw.
    error: String,
    /// How long after the kill it saw it.
    after: Duration,
    /// HAProxy's termination state for it.
    termination: String,
}

/// Runs the test; see the module documentation.
pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let Some(tools) = find_tools()? else {
        return Ok(());
    };
    let root = workspace_root();
    let dir = target_dir().join("deploy-test");
    // A previous run's Prometheus data and logs would mix with this one's.
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let [r1, r2, lb, lb_metrics, prometheus] = free_ports(5)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("free_ports returned the wrong count"))?;
    let ports = Ports {
        replicas: [r1, r2],
        lb,
        lb_metrics,
        prometheus,
    };
    check_configs(&tools, &root, &dir, &ports)?;

    let model = crate::setup::run(crate::setup::SetupArgs {
        cuda: false,
        references: false,
    })?;
    let binary = build_release_server("build the server")?;
    let model_name = model
        .file_name()
        .context("the model folder has no name")?
        .to_string_lossy()
        .into_owned();

    let fleet = Mutex::new(Fleet::default());
    let ctx = start_all(&tools, &root, &dir, &ports, (&binary, &model), &fleet)?;
    let ctx = Ctx {
        model: model_name,
        ..ctx
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(scenario(&ctx));
    let figures = result.with_context(|| {
        format!(
            "deploy-test failed; the processes' logs are in {}",
            dir.display()
        )
    })?;
    print_figures(&figures, started.elapsed());
    // Dropping the fleet stops HAProxy, Prometheus and the survivor.
    drop(fleet);
    Ok(())
}

/// The tools, or `None` (after saying why) when the test is skipped.
fn find_tools() -> anyhow::Result<Option<Tools>> {
    let find = crate::setup::system::find_program;
    if let (Some(haproxy), Some(prometheus), Some(promtool)) =
        (find("haproxy"), find("prometheus"), find("promtool"))
    {
        return Ok(Some(Tools {
            haproxy,
            prometheus,
            promtool,
        }));
    }
    let missing: Vec<&str> = ["haproxy", "prometheus", "promtool"]
        .into_iter()
        .filter(|name| find(name).is_none())
        .collect();
    let what = format!(
        "{} not found (Debian packages haproxy and prometheus; `cargo xtask setup --references` installs them)",
        missing.join(", ")
    );
    if std::env::var_os("MLX_BATCH_REQUIRE_REFERENCES").is_some() {
        bail!("deploy-test: {what}, and MLX_BATCH_REQUIRE_REFERENCES is set");
    }
    eprintln!("xtask: deploy-test: SKIPPED: {what}");
    Ok(None)
}

/// The environment that fills deploy/haproxy.cfg's addresses.
fn haproxy_env(cmd: &mut Command, ports: &Ports) {
    let [r1, r2] = ports.replicas;
    cmd.env("MLX_BATCH_LB_BIND", format!("127.0.0.1:{}", ports.lb))
        .env(
            "MLX_BATCH_LB_METRICS_BIND",
            format!("127.0.0.1:{}", ports.lb_metrics),
        )
        .env("MLX_BATCH_REPLICA_1", format!("127.0.0.1:{r1}"))
        .env("MLX_BATCH_REPLICA_2", format!("127.0.0.1:{r2}"));
}

/// Runs a checker and fails on a non-zero exit or on any warning in its
/// output: a config that only warns today tends to break on the next
/// version.
fn checked(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: could not start {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || text.contains("WARNING") || text.contains("[ALERT]") {
        bail!("{what} failed ({}):\n{}", out.status, text.trim());
    }
    eprintln!("xtask: deploy-test: {what}: ok");
    Ok(())
}

/// Checks the shipped configs as they are, then writes and checks this
/// run's Prometheus folder (the shipped file with one-second intervals,
/// the shipped rules, targets on this run's ports).
fn check_configs(tools: &Tools, root: &Path, dir: &Path, ports: &Ports) -> anyhow::Result<()> {
    let deploy = root.join("deploy");
    let mut haproxy = Command::new(&tools.haproxy);
    haproxy.arg("-c").arg("-f").arg(deploy.join("haproxy.cfg"));
    haproxy_env(&mut haproxy, ports);
    checked("haproxy -c deploy/haproxy.cfg", &mut haproxy)?;
    checked(
        "promtool check config deploy/prometheus.yml",
        Command::new(&tools.promtool)
            .args(["check", "config"])
            .arg(deploy.join("prometheus.yml")),
    )?;
    checked(
        "promtool check rules deploy/rules.yml",
        Command::new(&tools.promtool)
            .args(["check", "rules"])
            .arg(deploy.join("rules.yml")),
    )?;
    checked(
        "promtool test rules deploy/rules.test.yml",
        Command::new(&tools.promtool)
            .args(["test", "rules"])
            .arg(deploy.join("rules.test.yml"))
            .current_dir(&deploy),
    )?;

    let prom = dir.join("prometheus");
    fs::create_dir_all(prom.join("targets"))
        .with_context(|| format!("creating {}", prom.display()))?;
    let template = fs::read_to_string(deploy.join("prometheus.yml"))
        .context("reading deploy/prometheus.yml")?;
    fs::write(
        prom.join("prometheus.yml"),
        shorten_intervals(&template, TEST_INTERVAL)?,
    )
    .context("writing this run's prometheus.yml")?;
    fs::copy(deploy.join("rules.yml"), prom.join("rules.yml")).context("copying rules.yml")?;
    let [r1, r2] = ports.replicas;
    fs::write(
        prom.join("targets").join("mlx-batch.yml"),
        format!("- targets:\n    - 127.0.0.1:{r1}\n    - 127.0.0.1:{r2}\n"),
    )
    .context("writing the replicas' targets")?;
    fs::write(
        prom.join("targets").join("haproxy.yml"),
        format!("- targets:\n    - 127.0.0.1:{}\n", ports.lb_metrics),
    )
    .context("writing HAProxy's target")?;
    checked(
        "promtool check config (this run's copy)",
        Command::new(&tools.promtool)
            .args(["check", "config"])
            .arg(prom.join("prometheus.yml")),
    )
}

/// The shipped prometheus.yml with its scrape and evaluation intervals set
/// to `interval`; fails if the file no longer has the two 15 s lines this
/// replaces, so the test never runs a config it did not mean to.
fn shorten_intervals(template: &str, interval: &str) -> anyhow::Result<String> {
    let mut replaced = 0;
    let lines: Vec<String> = template
        .lines()
        .map(|line| {
            let trimmed = line.trim();
            for key in ["scrape_interval", "evaluation_interval"] {
                if trimmed == format!("{key}: 15s") {
                    replaced += 1;
                    return line.replace("15s", interval);
                }
            }
            line.to_owned()
        })
        .collect();
    ensure!(
        replaced == 2,
        "deploy/prometheus.yml should set scrape_interval and evaluation_interval to 15s once each (found {replaced} such lines); update the deploy test with it"
    );
    Ok(lines.join("\n") + "\n")
}

/// Starts both replicas, HAProxy and Prometheus.
/// `server` is the `mlx-batch` binary and the model folder it serves.
fn start_all<'a>(
    tools: &Tools,
    root: &Path,
    dir: &Path,
    ports: &Ports,
    (binary, model): (&Path, &Path),
    fleet: &'a Mutex<Fleet>,
) -> anyhow::Result<Ctx<'a>> {
    let mut guard = fleet.lock().unwrap_or_else(PoisonError::into_inner);
    let mut replicas = Vec::new();
    for (i, port) in ports.replicas.iter().enumerate() {
        let name = format!("replica{}", i + 1);
        let mut cmd = Command::new(binary);
        cmd.arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            // Two replicas share this machine, so each keeps a small KV
            // budget and one BLAS thread, as if each had a core of its own.
            .args(["--kv-memory", "256MiB"])
            .env("OPENBLAS_NUM_THREADS", "1")
            // The bench found these two halve OpenBLAS's speed here.
            .env_remove("OPENBLAS_CORETYPE")
            .env_remove("OPENBLAS_L2_SIZE");
        let proc = guard.spawn(&name, &mut cmd, &dir.join(format!("{name}.log")))?;
        replicas.push(Replica {
            name,
            addr: format!("127.0.0.1:{port}"),
            proc,
        });
    }
    let haproxy_log = dir.join("haproxy.log");
    let mut cmd = Command::new(&tools.haproxy);
    // -db keeps HAProxy in the foreground, a child the guard can stop.
    cmd.arg("-db")
        .arg("-f")
        .arg(root.join("deploy").join("haproxy.cfg"));
    haproxy_env(&mut cmd, ports);
    let haproxy = guard.spawn("haproxy", &mut cmd, &haproxy_log)?;
    let prom = dir.join("prometheus");
    let mut cmd = Command::new(&tools.prometheus);
    cmd.arg(format!(
        "--config.file={}",
        prom.join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        prom.join("data").display()
    ))
    .arg(format!(
        "--web.listen-address=127.0.0.1:{}",
        ports.prometheus
    ));
    let prometheus = guard.spawn("prometheus", &mut cmd, &dir.join("prometheus.log"))?;
    let http = reqwest::Client::builder()
        // A proxy from the environment must not sit between the test and
        // loopback.
        .no_proxy()
        .build()
        .context("building the HTTP client")?;
    Ok(Ctx {
        http,
        fleet,
        replicas,
        haproxy,
        prometheus,
        lb: format!("http://127.0.0.1:{}", ports.lb),
        lb_metrics: format!("http://127.0.0.1:{}/metrics", ports.lb_metrics),
        prometheus_url: format!("http://127.0.0.1:{}", ports.prometheus),
        haproxy_log,
        model: String::new(),
    })
}

/// The phases of the test, once every process is started.
async fn scenario(ctx: &Ctx<'_>) -> anyhow::Result<Figures> {
    let mut figures = Figures::default();
    wait_started(ctx).await?;
    figures.echo = Some(echo_probe(ctx).await?);
    first_phase(ctx, &mut figures).await?;
    let (victim, survivor) = kill_phase(ctx, &mut figures).await?;
    prometheus_phase(ctx, &victim, &survivor, &mut figures).await?;
    Ok(figures)
}

/// Polls `probe` every 250 ms until it gives a value; fails after
/// `timeout`, or at once when one of `watch` has exited.
async fn poll<T, F, Fut>(
    ctx: &Ctx<'_>,
    what: &str,
    timeout: Duration,
    watch: &[ProcId],
    mut probe: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        {
            let mut fleet = ctx.fleet.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(id) = watch.iter().find(|id| fleet.exited(**id)) {
                bail!("waiting for {what}: a process it needs exited ({id:?}; see its log)");
            }
        }
        if start.elapsed() > timeout {
            bail!("waiting for {what}: not within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// GETs `url` and returns the body of a 200.
async fn get_ok(http: &reqwest::Client, url: &str) -> Option<String> {
    let response = http
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if response.status() != reqwest::StatusCode::OK {
        return None;
    }
    response.text().await.ok()
}

/// The samples of a PromQL query.
async fn query(ctx: &Ctx<'_>, promql: &str) -> anyhow::Result<Vec<(observe::Labels, f64)>> {
    let url = format!(
        "{}/api/v1/query?query={}",
        ctx.prometheus_url,
        url_encode(promql)
    );
    let body = get_ok(&ctx.http, &url)
        .await
        .with_context(|| format!("Prometheus did not answer {promql}"))?;
    let answer: serde_json::Value =
        serde_json::from_str(&body).context("Prometheus's answer is not JSON")?;
    query_samples(&answer).with_context(|| format!("query {promql}"))
}

/// Waits until the replicas are ready, HAProxy counts both as up and
/// Prometheus scrapes all three.
async fn wait_started(ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let started = Instant::now();
    for replica in &ctx.replicas {
        let url = format!("http://{}/health/ready", replica.addr);
        poll(
            ctx,
            &format!("{} to be ready", replica.name),
            START_TIMEOUT,
            &[replica.proc],
            || get_ok(&ctx.http, &url),
        )
        .await?;
    }
    eprintln!(
        "xtask: deploy-test: both replicas ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let active = "haproxy_backend_active_servers";
    poll(
        ctx,
        "HAProxy to see both replicas up",
        START_TIMEOUT,
        &[ctx.haproxy],
        || async {
            let text = get_ok(&ctx.http, &ctx.lb_metrics).await?;
            (sum_metric(&text, active, &[("proxy", HAPROXY_BACKEND)]) == 2.0).then_some(())
        },
    )
    .await?;
    poll(
        ctx,
        "Prometheus to scrape both replicas and HAProxy",
        START_TIMEOUT,
        &[ctx.prometheus],
        || async {
            let up = query(ctx, "up == 1").await.ok()?;
            let replicas = up
                .iter()
                .filter(|(labels, _)| labels.get("job").is_some_and(|j| j == "mlx-batch"))
                .count();
            let haproxy = up
                .iter()
                .any(|(labels, _)| labels.get("job").is_some_and(|j| j == "haproxy"));
            (replicas == 2 && haproxy).then_some(())
        },
    )
    .await?;
    eprintln!(
        "xtask: deploy-test: HAProxy and Prometheus see both replicas after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Whether the replicas echo an incoming x-request-id: once they do, the
/// first phase also checks the ids that come back through the proxy.
async fn echo_probe(ctx: &Ctx<'_>) -> anyhow::Result<bool> {
    let probe = "deploy-test-echo-probe";
    let chat = Chat {
        base: format!("http://{}", ctx.replicas[0].addr),
        model: ctx.model.clone(),
        prompt: "Say yes.".to_owned(),
        max_tokens: 1,
        request_id: Some(probe.to_owned()),
        priority: None,
        pad_to: 0,
    };
    let reply = complete(&ctx.http, &chat, REQUEST_TIMEOUT)
        .await
        .map_err(anyhow::Error::msg)?;
    ensure!(
        reply.status == 200,
        "a direct request to replica1 failed: {} {}",
        reply.status,
        reply.text
    );
    Ok(reply.request_id.as_deref() == Some(probe))
}

/// The replicas' `/metrics` texts, in replica order.
async fn replica_metrics(ctx: &Ctx<'_>) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for replica in &ctx.replicas {
        let url = format!("http://{}/metrics", replica.addr);
        out.push(
            get_ok(&ctx.http, &url)
                .await
                .with_context(|| format!("{}'s /metrics did not answer", replica.name))?,
        );
    }
    Ok(out)
}

/// Requests a replica has finished, by any reason.
fn finished(metrics: &str) -> f64 {
    sum_metric(metrics, "mlx_batch_requests_finished_total", &[])
}

/// Requests a replica has started as HIGH priority.
fn high(metrics: &str) -> f64 {
    sum_metric(
        metrics,
        "mlx_batch_time_to_first_token_seconds_count",
        &[("priority", "high")],
    )
}

/// HAProxy's log as it is now.
fn haproxy_log(ctx: &Ctx<'_>) -> Vec<LogLine> {
    log_lines(&fs::read_to_string(&ctx.haproxy_log).unwrap_or_default())
}

/// HAProxy writes a request's line when the request ends, which may be a
/// moment after the client has its answer: waits until `ready` holds.
async fn wait_log(
    ctx: &Ctx<'_>,
    what: &str,
    ready: impl Fn(&[LogLine]) -> bool,
) -> anyhow::Result<Vec<LogLine>> {
    poll(ctx, what, Duration::from_secs(10), &[ctx.haproxy], || {
        let lines = haproxy_log(ctx);
        let ok = ready(&lines);
        async move { ok.then_some(lines) }
    })
    .await
}

/// 32 concurrent requests through the proxy: half with a client id, half
/// marked high priority by header.
async fn first_phase(ctx: &Ctx<'_>, figures: &mut Figures) -> anyhow::Result<()> {
    let before = replica_metrics(ctx).await?;
    let started = Instant::now();
    let chats: Vec<Chat> = (0..FIRST_REQUESTS)
        .map(|i| Chat {
            base: ctx.lb.clone(),
            model: ctx.model.clone(),
            prompt: format!("Name a colour and a number bigger than {i}."),
            max_tokens: FIRST_MAX_TOKENS,
            request_id: (i % 2 == 0).then(|| format!("p1-{i}")),
            priority: (i % 4 < 2).then_some("high"),
            pad_to: 0,
        })
        .collect();
    let replies = send_all(ctx, &chats).await;
    let mut by_replica: BTreeMap<String, usize> = BTreeMap::new();
    for (chat, reply) in chats.iter().zip(&replies) {
        let reply = reply
            .as_ref()
            .map_err(|e| anyhow::anyhow!("a first-phase request failed: {e}"))?;
        ensure!(
            reply.status == 200 && !reply.text.is_empty(),
            "a first-phase request got {} {}",
            reply.status,
            reply.text
        );
        let replica = reply
            .replica
            .clone()
            .context("a reply without the x-mlx-batch-replica header")?;
        *by_replica.entry(replica).or_default() += 1;
        if figures.echo == Some(true) {
            check_echo(chat, reply)?;
        }
    }
    let after = replica_metrics(ctx).await?;
    for (i, replica) in ctx.replicas.iter().enumerate() {
        let served = finished(&after[i]) - finished(&before[i]);
        let seen = by_replica.get(&replica.name).copied().unwrap_or(0);
        ensure!(
            served > 0.0,
            "{} served none of the {FIRST_REQUESTS} requests (by its own /metrics); HAProxy did not balance",
            replica.name
        );
        ensure!(
            (served - seen as f64).abs() < 0.5,
            "{} finished {served} requests by its /metrics, but {seen} replies named it",
            replica.name
        );
    }
    let high_seen: f64 = (0..ctx.replicas.len())
        .map(|i| high(&after[i]) - high(&before[i]))
        .sum();
    let high_sent = chats.iter().filter(|c| c.priority.is_some()).count();
    ensure!(
        (high_seen - high_sent as f64).abs() < 0.5,
        "{high_sent} requests carried x-priority: high, but the replicas started {high_seen} as high"
    );
    let sent_ids: Vec<&str> = chats
        .iter()
        .filter_map(|c| c.request_id.as_deref())
        .collect();
    let generated = FIRST_REQUESTS - sent_ids.len();
    let lines = wait_log(ctx, "HAProxy's log of the first phase", |lines| {
        lines.len() >= FIRST_REQUESTS
    })
    .await?;
    for id in &sent_ids {
        ensure!(
            lines.iter().any(|l| l.request_id == *id),
            "HAProxy's log has no request with the client's x-request-id {id}"
        );
    }
    let with_uuid = lines.iter().filter(|l| is_uuid(&l.request_id)).count();
    ensure!(
        with_uuid == generated,
        "{generated} requests came without an x-request-id, but HAProxy gave {with_uuid} a generated one"
    );
    let high_logged = lines.iter().filter(|l| l.priority == "high").count();
    ensure!(
        high_logged == high_sent,
        "HAProxy logged {high_logged} requests with x-priority high, not {high_sent}"
    );
    eprintln!(
        "xtask: deploy-test: first phase: {FIRST_REQUESTS} requests answered in {:.1} s: {by_replica:?}",
        started.elapsed().as_secs_f64()
    );
    figures.first_by_replica = by_replica;
    figures.high_seen = high_seen;
    Ok(())
}

/// With the replicas echoing x-request-id: the client's id comes back as
/// sent, and a request without one gets the UUID HAProxy made.
fn check_echo(chat: &Chat, reply: &Reply) -> anyhow::Result<()> {
    let echoed = reply.request_id.as_deref().unwrap_or_default();
    match &chat.request_id {
        Some(sent) => ensure!(
            echoed == sent,
            "sent x-request-id {sent} through the proxy, got back {echoed:?}"
        ),
        None => ensure!(
            is_uuid(echoed),
            "a request without x-request-id came back with {echoed:?}, not HAProxy's UUID"
        ),
    }
    Ok(())
}

/// Sends every chat at once and returns the replies in order.
async fn send_all(ctx: &Ctx<'_>, chats: &[Chat]) -> Vec<Result<Reply, String>> {
    let tasks: Vec<JoinHandle<Result<Reply, String>>> = chats
        .iter()
        .map(|chat| spawn_chat(ctx, chat.clone()))
        .collect();
    join_chats(tasks).await
}

fn spawn_chat(ctx: &Ctx<'_>, chat: Chat) -> JoinHandle<Result<Reply, String>> {
    let http = ctx.http.clone();
    tokio::spawn(async move { complete(&http, &chat, REQUEST_TIMEOUT).await })
}

async fn join_chats(tasks: Vec<JoinHandle<Result<Reply, String>>>) -> Vec<Result<Reply, String>> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(
            task.await
                .unwrap_or_else(|e| Err(format!("task failed: {e}"))),
        );
    }
    out
}

/// Streams on both replicas, requests in flight, a SIGKILL, more requests:
/// returns the dead replica and the survivor.
async fn kill_phase(ctx: &Ctx<'_>, figures: &mut Figures) -> anyhow::Result<(Replica, Replica)> {
    let mut streams = Vec::new();
    let mut started = Vec::new();
    for i in 0..STREAMS {
        let (tx, rx) = oneshot::channel();
        let chat = Chat {
            base: ctx.lb.clone(),
            model: ctx.model.clone(),
            prompt: "Tell a long story about a lighthouse keeper during a storm.".to_owned(),
            max_tokens: STREAM_MAX_TOKENS,
            request_id: Some(format!("p2-stream-{i}")),
            priority: None,
            pad_to: 0,
        };
        streams.push(tokio::spawn(stream(
            ctx.http.clone(),
            chat,
            tx,
            STREAM_IDLE,
        )));
        started.push(rx);
    }
    // Every stream has sent text: each has started for HAProxy too.
    let mut on: BTreeMap<String, usize> = BTreeMap::new();
    for rx in started {
        let replica = tokio::time::timeout(REQUEST_TIMEOUT, rx)
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .context("a stream ended or stalled before its first text")?;
        *on.entry(replica).or_default() += 1;
    }
    // The replica with the most running streams dies (replica1 on a tie).
    let victim = ctx
        .replicas
        .iter()
        .max_by_key(|r| {
            (
                on.get(&r.name).copied().unwrap_or(0),
                std::cmp::Reverse(r.name.clone()),
            )
        })
        .cloned()
        .context("no replicas")?;
    let survivor = ctx
        .replicas
        .iter()
        .find(|r| r.name != victim.name)
        .cloned()
        .context("only one replica")?;
    let victim_streams = on.get(&victim.name).copied().unwrap_or(0);
    ensure!(
        victim_streams > 0 && victim_streams < STREAMS,
        "the {STREAMS} streams are not spread over both replicas: {on:?}"
    );

    let padded = |id: String| Chat {
        base: ctx.lb.clone(),
        model: ctx.model.clone(),
        prompt: "Write one sentence about rain.".to_owned(),
        max_tokens: KILL_MAX_TOKENS,
        request_id: Some(id),
        priority: None,
        pad_to: PADDED_BODY,
    };
    let mut tasks: Vec<JoinHandle<Result<Reply, String>>> = (0..KILL_REQUESTS)
        .map(|i| spawn_chat(ctx, padded(format!("p2-before-{i}"))))
        .collect();
    // The victim must hold some of them, unanswered, when it dies.
    let victim_metrics = format!("http://{}/metrics", victim.addr);
    poll(
        ctx,
        "requests to be in flight on the replica to kill",
        Duration::from_secs(30),
        &[victim.proc],
        || async {
            let text = get_ok(&ctx.http, &victim_metrics).await?;
            let busy = sum_metric(&text, "mlx_batch_running_requests", &[])
                + sum_metric(&text, "mlx_batch_waiting_requests", &[]);
            (busy > victim_streams as f64).then_some(())
        },
    )
    .await?;
    // Timed from the signal, not from the reaping that follows it.
    let killed_at = Instant::now();
    ctx.fleet
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .kill(victim.proc)?;
    eprintln!(
        "xtask: deploy-test: killed {} (SIGKILL) with {victim_streams} streams running on it",
        victim.name
    );
    // Sent before HAProxy's checks notice the death: the first try of
    // some goes to the dead replica and is refused.
    tasks.extend((0..KILL_REQUESTS).map(|i| spawn_chat(ctx, padded(format!("p2-after-{i}")))));

    let replies = join_chats(tasks).await;
    for reply in &replies {
        let reply = reply
            .as_ref()
            .map_err(|e| anyhow::anyhow!("a request around the kill failed: {e}"))?;
        ensure!(
            reply.status == 200 && !reply.text.is_empty(),
            "a request around the kill got {} {}",
            reply.status,
            reply.text
        );
        ensure!(
            reply.replica.as_deref() == Some(survivor.name.as_str())
                || reply.replica.as_deref() == Some(victim.name.as_str()),
            "a reply named no replica: {reply:?}"
        );
    }
    figures.kill_requests_ok = replies.len();

    let mut outcomes: Vec<StreamOutcome> = Vec::new();
    for task in streams {
        outcomes.push(task.await.context("a stream task failed")?);
    }
    check_streams(&outcomes, &victim, &survivor, killed_at, figures)?;
    check_retries(ctx, &outcomes, &victim, &survivor, figures).await?;
    let counters = get_ok(&ctx.http, &ctx.lb_metrics)
        .await
        .context("HAProxy's /metrics did not answer")?;
    let backend = [("proxy", HAPROXY_BACKEND)];
    figures.haproxy_retries =
        sum_metric(&counters, "haproxy_backend_retry_warnings_total", &backend);
    figures.haproxy_redispatches = sum_metric(
        &counters,
        "haproxy_backend_redispatch_warnings_total",
        &backend,
    );
    figures.victim = victim.name.clone();
    Ok((victim, survivor))
}

/// The dead replica's running streams failed soon after the kill; the
/// survivor's finished.
fn check_streams(
    outcomes: &[StreamOutcome],
    victim: &Replica,
    survivor: &Replica,
    killed_at: Instant,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    for outcome in outcomes {
        let on_victim = outcome.replica.as_deref() == Some(victim.name.as_str());
        match (&outcome.end, on_victim) {
            (StreamEnd::Finished, false) => figures.survivor_streams += 1,
            // A stream may reach its end on the victim just before the kill.
            (StreamEnd::Finished, true) if outcome.ended <= killed_at => {}
            (StreamEnd::Broken(error), true) => {
                let after = outcome.ended.saturating_duration_since(killed_at);
                ensure!(
                    after <= CUT_LIMIT,
                    "stream {} on the dead replica failed only {after:?} after the kill",
                    outcome.request_id
                );
                figures.cut.push(Cut {
                    request_id: outcome.request_id.clone(),
                    error: error.clone(),
                    after,
                    termination: String::new(),
                });
            }
            (end, _) => bail!(
                "stream {} on {} ended {end:?} (the dead replica was {}, the survivor {})",
                outcome.request_id,
                outcome.replica.as_deref().unwrap_or("no replica"),
                victim.name,
                survivor.name
            ),
        }
    }
    ensure!(
        !figures.cut.is_empty(),
        "no stream was still running on {} when it was killed",
        victim.name
    );
    Ok(())
}

/// From HAProxy's log: the dead replica's streams were not retried, and
/// the requests it held or was first offered were, on the survivor.
async fn check_retries(
    ctx: &Ctx<'_>,
    outcomes: &[StreamOutcome],
    victim: &Replica,
    survivor: &Replica,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let ids: Vec<String> = outcomes
        .iter()
        .map(|o| o.request_id.clone())
        .chain((0..KILL_REQUESTS).map(|i| format!("p2-before-{i}")))
        .chain((0..KILL_REQUESTS).map(|i| format!("p2-after-{i}")))
        .collect();
    let lines = wait_log(ctx, "HAProxy's log of the kill", |lines| {
        ids.iter()
            .all(|id| lines.iter().any(|l| &l.request_id == id))
    })
    .await?;
    let line = |id: &str| lines.iter().find(|l| l.request_id == id);
    for cut in &mut figures.cut {
        let id = &cut.request_id;
        let l = line(id).context("a cut stream is not in HAProxy's log")?;
        ensure!(
            l.server == victim.name && l.retries == 0 && !l.redispatched,
            "HAProxy retried stream {id} that had started: {l:?}"
        );
        ensure!(
            l.termination.starts_with('S'),
            "HAProxy did not log stream {id} as cut by the server: {l:?}"
        );
        cut.termination.clone_from(&l.termination);
    }
    for id in ids.iter().filter(|id| !id.starts_with("p2-stream")) {
        let l = line(id).context("a request is not in HAProxy's log")?;
        ensure!(l.status == 200, "request {id} was not answered: {l:?}");
        ensure!(
            l.retries == 0 || l.server == survivor.name,
            "request {id} was retried but not on the survivor: {l:?}"
        );
        if l.retries > 0 && id.starts_with("p2-before") {
            figures.retried_held += 1;
        }
        if l.retries > 0 && id.starts_with("p2-after") {
            figures.retried_refused += 1;
        }
        if l.redispatched {
            figures.redispatched += 1;
        }
    }
    ensure!(
        figures.retried_held > 0,
        "no request was retried, although {} held some when it died",
        victim.name
    );
    Ok(())
}

/// Prometheus: the dead replica is `up == 0` with its alert pending, the
/// survivor's series and the rules' results are there.
async fn prometheus_phase(
    ctx: &Ctx<'_>,
    victim: &Replica,
    survivor: &Replica,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let dead_up = format!("up{{job=\"mlx-batch\",instance=\"{}\"}} == 0", victim.addr);
    poll(
        ctx,
        "Prometheus to report the dead replica down",
        PROMETHEUS_TIMEOUT,
        &[ctx.prometheus],
        || async { query(ctx, &dead_up).await.ok().filter(|s| !s.is_empty()) },
    )
    .await?;
    let ready = query(
        ctx,
        &format!("mlx_batch_ready{{instance=\"{}\"}}", survivor.addr),
    )
    .await?;
    ensure!(
        ready.len() == 1 && ready[0].1 == 1.0,
        "Prometheus has mlx_batch_ready {ready:?} for the survivor, not 1"
    );
    let series = query(
        ctx,
        &format!(
            "{{__name__=~\"mlx_batch_.+\",instance=\"{}\"}}",
            survivor.addr
        ),
    )
    .await?;
    for name in [
        "mlx_batch_tokens_generated_total",
        "mlx_batch_time_to_first_token_seconds",
        "mlx_batch_waiting_requests",
        "mlx_batch_kv_blocks_used",
        "mlx_batch_kv_blocks_free",
        "mlx_batch_live",
    ] {
        ensure!(
            series
                .iter()
                .any(|(labels, _)| labels.get("__name__").is_some_and(|n| n == name)),
            "Prometheus has no {name} for the survivor"
        );
    }
    figures.survivor_series = series.len();
    let rate = format!(
        "instance:mlx_batch_tokens_generated:rate1m{{instance=\"{}\"}} > 0",
        survivor.addr
    );
    poll(
        ctx,
        "the tokens/s recording rule for the survivor",
        PROMETHEUS_TIMEOUT,
        &[ctx.prometheus],
        || async { query(ctx, &rate).await.ok().filter(|s| !s.is_empty()) },
    )
    .await?;
    let alert = format!(
        "ALERTS{{alertname=\"MlxBatchReplicaDown\",alertstate=\"pending\",instance=\"{}\"}}",
        victim.addr
    );
    poll(
        ctx,
        "the MlxBatchReplicaDown alert to be pending for the dead replica",
        PROMETHEUS_TIMEOUT,
        &[ctx.prometheus],
        || async { query(ctx, &alert).await.ok().filter(|s| !s.is_empty()) },
    )
    .await?;
    Ok(())
}

fn print_figures(f: &Figures, elapsed: Duration) {
    let line = |text: String| eprintln!("xtask: deploy-test: {text}");
    line(format!(
        "{FIRST_REQUESTS} concurrent requests through HAProxy, by replica: {}; {} of them HIGH by x-priority, seen as HIGH by the replicas",
        f.first_by_replica
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        f.high_seen
    ));
    line(match f.echo {
        Some(true) => "x-request-id: the replicas echo it; the client's came back as sent, HAProxy's UUID where the client sent none".to_owned(),
        _ => "x-request-id: HAProxy passed the client's and set a UUID where there was none (its log); the replicas do not echo it yet, so that end of the check is inactive".to_owned(),
    });
    for cut in &f.cut {
        line(format!(
            "stream {} on {} ended with an error {} ms after the kill (HAProxy: {}, not retried): {}",
            cut.request_id,
            f.victim,
            cut.after.as_millis(),
            cut.termination,
            cut.error
        ));
    }
    line(format!(
        "{} streams on the survivor finished; {} requests sent around the kill all succeeded: by HAProxy's log {} held by the dead replica and {} refused by it were retried ({} of them on another replica); HAProxy's counters: {} retries, {} redispatches",
        f.survivor_streams,
        f.kill_requests_ok,
        f.retried_held,
        f.retried_refused,
        f.redispatched,
        f.haproxy_retries,
        f.haproxy_redispatches
    ));
    line(format!(
        "Prometheus: {} mlx_batch_* series for the survivor, up == 0 for {} with MlxBatchReplicaDown pending",
        f.survivor_series, f.victim
    ));
    line(format!("passed in {}", crate::progress::minutes(elapsed)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_prometheus_config_gets_short_intervals_and_nothing_else() {
        let template =
            fs::read_to_string(workspace_root().join("deploy").join("prometheus.yml")).unwrap();
        let short = shorten_intervals(&template, "1s").unwrap();
        assert!(short.contains("scrape_interval: 1s"));
        assert!(short.contains("evaluation_interval: 1s"));
        assert!(!short.contains("15s"));
        let changed = template
            .lines()
            .zip(short.lines())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(changed, 2);
        assert!(shorten_intervals("global:\n  scrape_interval: 30s\n", "1s").is_err());
    }
}
