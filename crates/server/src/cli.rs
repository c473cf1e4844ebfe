//! The command line: `mlx-batch serve | generate | import-gguf`.
//!
//! Every default is visible in `--help`, and the model folder defaults to
//! the one `cargo xtask setup` makes, so `mlx-batch serve` works with no
//! arguments on a set-up checkout.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::bail;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// The environment variable that names the default model folder.
pub const MODEL_ENV: &str = "MLX_BATCH_MODEL";

/// The folder `cargo xtask setup` writes the default model to, relative to
/// the workspace root.
pub const DEFAULT_MODEL_DIR: &str = ".models/SmolLM2-135M-Instruct";

/// An OpenAI-compatible LLM server with continuous batching on MLX.
#[derive(Debug, Parser)]
#[command(name = "mlx-batch", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// How log lines on stderr look: `text` for people (coloured only on a
    /// terminal) or `json`, one object per line, for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The shape of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`,
    /// `span`).
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI API over HTTP.
    Serve(ServeArgs),
    /// Generate one continuation and stream it to stdout.
    Generate(GenerateArgs),
    /// Convert a Llama-family GGUF file into a model folder.
    ImportGguf(ImportArgs),
    /// Load-test any OpenAI-compatible server (this one or a peer).
    Bench(loadgen::BenchArgs),
}

/// Where MLX runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The GPU when MLX has one, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// The GPU (Metal or CUDA).
    Gpu,
}

/// Options shared by every command that loads a model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model folder (Hugging Face / mlx-community layout). Defaults to
    /// $MLX_BATCH_MODEL, else the folder made by `cargo xtask setup`.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Where MLX runs.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
}

/// `mlx-batch serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The model and device.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Most sequences in one batch (decodes and prefill chunks together).
    #[arg(long, default_value_t = 32)]
    pub max_batch_size: usize,
    /// Most tokens fed through the model in one step; longer prompts are
    /// prefilled in chunks.
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Memory for the KV cache, for example "512MiB" or "2GiB".
    #[arg(long, value_parser = parse_bytes, default_value = "2GiB", conflicts_with = "kv_blocks")]
    pub kv_memory: u64,
    /// KV cache size in blocks of 16 tokens, instead of --kv-memory.
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// The most memory MLX may use, weights and KV cache included, for
    /// example "8GiB"; "auto" is 80% of the machine's memory (where it can
    /// be read), "none" leaves MLX's own default. The KV cache must fit
    /// beside the weights, and MLX keeps freed buffers only within what is
    /// left.
    #[arg(long, value_parser = parse_memory_limit, default_value = "auto")]
    pub memory_limit: MemoryLimit,
    /// The most freed memory MLX keeps for reuse. Each step's temporary
    /// buffers differ in size, so an unbounded cache grows the process far
    /// past what is in use.
    #[arg(long, value_parser = parse_bytes, default_value = "256MiB")]
    pub mlx_cache_limit: u64,
    /// Most requests waiting for admission; more are refused with 429.
    #[arg(long, default_value_t = 1024)]
    pub max_queue: usize,
    /// Priority levels a waiting request gains per second, so that LOW work
    /// is never starved.
    #[arg(long, default_value_t = 0.1)]
    pub aging_rate: f64,
    /// A request still queued after this long gets 504, for example "30s",
    /// "2m" or "none".
    #[arg(long, value_parser = parse_timeout, default_value = "300s")]
    pub request_timeout: Timeout,
    /// Never take a running request out of a full batch for a more urgent
    /// one. By default a waiting request that outranks a running one (by
    /// priority after aging) pauses it, keeping its KV cache, and enters
    /// the batch at the next step.
    #[arg(long)]
    pub no_preemption: bool,
    /// How many times one request may be paused or preempted for more
    /// urgent work before it stays in the batch to the end.
    #[arg(long, default_value_t = 2)]
    pub max_preemptions: u32,
    /// Most prompt tokens one request feeds in a step, so that a long
    /// prompt leaves room for others to start beside it.
    #[arg(long, default_value_t = 128)]
    pub max_prefill_chunk: usize,
    /// Do not keep KV blocks of earlier prompts for reuse. By default full
    /// blocks of prompts and answers stay cached (evicted least recently
    /// used when memory is needed), and a request whose prompt starts with
    /// them, for example the same system prompt or conversation history,
    /// computes only the rest (`usage.prompt_tokens_details.cached_tokens`).
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Liveness (`GET /health`) fails after this many whole steps fail in a
    /// row; readiness (`GET /health/ready`) fails with it.
    #[arg(long, default_value_t = 3)]
    pub unhealthy_after_failures: u64,
    /// Liveness fails when requests are waiting or running and no step has
    /// finished for this long (a stalled engine), for example "60s" or
    /// "none".
    #[arg(long, value_parser = parse_timeout, default_value = "60s")]
    pub stall_timeout: Timeout,
    /// Time a client has to send a request's headers; also how long a
    /// keep-alive connection may wait for its next request at most.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's whole body after its headers;
    /// later, it gets 408 and the connection is closed (a client that
    /// trickles its body cannot hold a connection).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub body_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub keep_alive_timeout: Duration,
    /// A streamed answer whose client has stopped reading for this long is
    /// cancelled, freeing its KV cache.
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    pub stream_stall_timeout: Duration,
    /// The sampling temperature of requests that set none. OpenAI's API
    /// defaults to 1; set 0 for greedy decoding by default.
    #[arg(long, default_value_t = 1.0)]
    pub default_temperature: f32,
    /// The most connections served at once; more are closed at once. It is
    /// lowered to fit below the process's file limit, which the server
    /// raises to its hard limit at start.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
}

/// `mlx-batch generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// The model and device.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Format the prompt as one user message with the chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// `mlx-batch import-gguf`.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// The GGUF file.
    pub file: PathBuf,
    /// The model folder to write.
    pub out_dir: PathBuf,
}

/// A request timeout, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub Option<Duration>);

/// `--memory-limit`: a size, the machine's share, or MLX's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLimit {
    /// 80% of the machine's memory, where it can be read.
    Auto,
    /// MLX's own default.
    None,
    /// This many bytes.
    Bytes(u64),
}

impl MemoryLimit {
    /// The limit in bytes, `None` for MLX's default.
    pub fn resolve(self) -> Option<u64> {
        match self {
            Self::Auto => machine_memory().map(|total| total / 5 * 4),
            Self::None => None,
            Self::Bytes(b) => Some(b),
        }
    }
}

/// The machine's memory from `/proc/meminfo` (Linux); `None` elsewhere.
fn machine_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Parses "auto", "none" or a size such as "8GiB".
pub fn parse_memory_limit(text: &str) -> Result<MemoryLimit, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(MemoryLimit::Auto),
        "none" => Ok(MemoryLimit::None),
        _ => parse_bytes(text).map(MemoryLimit::Bytes),
    }
}

/// Parses "2GiB", "512MiB", "1.5GB", "1048576" into bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let (value, unit) = number_and_unit(text.trim())
        .ok_or_else(|| format!("{text:?} is not a size such as 2GiB or 512MiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("{text:?} is not a usable size"));
    }
    // Rounding a byte count down loses less than one byte.
    Ok(bytes as u64)
}

/// Splits "1.5GiB" into 1.5 and "GiB": the leading number and the rest.
fn number_and_unit(text: &str) -> Option<(f64, &str)> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    Some((number.parse().ok()?, unit))
}

/// Parses "30s", "500ms", "2m", "1h", a bare number of seconds, or "none".
pub fn parse_timeout(text: &str) -> Result<Timeout, String> {
    let t = text.trim().to_ascii_lowercase();
    if t == "none" || t == "0" {
        return Ok(Timeout(None));
    }
    let (value, unit) = number_and_unit(&t)
        .ok_or_else(|| format!("{text:?} is not a duration such as 30s, 2m or none"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {text:?}")),
    };
    Duration::try_from_secs_f64(seconds)
        .map(|d| Timeout(Some(d)))
        .map_err(|_| format!("{text:?} is not a usable duration"))
}

/// Parses a duration such as `10s`, `500ms` or `2m` (not `none`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    match parse_timeout(text)? {
        Timeout(Some(d)) if !d.is_zero() => Ok(d),
        _ => Err(format!("{text:?} must be a positive duration such as 10s")),
    }
}

/// The model folder to use: `--model`, else `$MLX_BATCH_MODEL`, else the
/// folder `cargo xtask setup` makes in this checkout. Fails with a one-line
/// hint when it does not exist.
pub fn resolve_model_dir(explicit: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    let (dir, from) = match (explicit, std::env::var_os(MODEL_ENV)) {
        (Some(dir), _) => (dir.clone(), "--model"),
        (None, Some(dir)) => (PathBuf::from(dir), MODEL_ENV),
        (None, None) => (default_model_dir(), "the default"),
    };
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    if from == "the default" {
        bail!(
            "no model at {} (the default): run `cargo xtask setup` to install it, or pass --model DIR",
            dir.display()
        );
    }
    bail!(
        "no model at {} (from {from}): the folder needs a config.json",
        dir.display()
    )
}

/// The default model folder, baked in at compile time from this crate's
/// location in the workspace.
pub fn default_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(DEFAULT_MODEL_DIR)
}

impl ServeArgs {
    /// The socket address to bind.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("2XB").is_err());
        assert!(parse_bytes("0").is_err());
    }

    #[test]
    fn timeouts_parse_with_units_and_none() {
        assert_eq!(
            parse_timeout("30s"),
            Ok(Timeout(Some(Duration::from_secs(30))))
        );
        assert_eq!(
            parse_timeout("2m"),
            Ok(Timeout(Some(Duration::from_secs(120))))
        );
        assert_eq!(
            parse_timeout("250ms"),
            Ok(Timeout(Some(Duration::from_millis(250))))
        );
        assert_eq!(
            parse_timeout("45"),
            Ok(Timeout(Some(Duration::from_secs(45))))
        );
        assert_eq!(parse_timeout("none"), Ok(Timeout(None)));
        assert!(parse_timeout("soon").is_err());
    }

    #[test]
    fn serve_defaults_are_the_documented_ones() {
        let cli = Cli::try_parse_from(["mlx-batch", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.addr().to_string(), "127.0.0.1:8080");
        assert_eq!(args.max_batch_size, 32);
        assert_eq!(args.kv_memory, 2 << 30);
        assert_eq!(args.kv_blocks, None);
        assert_eq!(args.model.device, DeviceArg::Auto);
        assert_eq!(
            args.request_timeout,
            Timeout(Some(Duration::from_secs(300)))
        );
    }

    #[test]
    fn kv_memory_and_kv_blocks_conflict() {
        let err = Cli::try_parse_from([
            "mlx-batch",
            "serve",
            "--kv-memory",
            "1GiB",
            "--kv-blocks",
            "10",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn a_missing_model_folder_names_the_setup_command() {
        let missing = PathBuf::from("definitely/not/here");
        let err = resolve_model_dir(Some(&missing)).unwrap_err().to_string();
        assert!(err.contains("definitely/not/here"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn generate_and_import_parse() {
        let cli = Cli::try_parse_from([
            "mlx-batch",
            "generate",
            "--prompt",
            "Hi",
            "--chat",
            "--max-tokens",
            "5",
            "--seed",
            "3",
        ])
        .unwrap();
        let Command::Generate(g) = cli.command else {
            panic!("not generate")
        };
        assert!(g.chat && g.max_tokens == 5 && g.seed == Some(3) && g.prompt == "Hi");
        let cli = Cli::try_parse_from(["mlx-batch", "import-gguf", "a.gguf", "out"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::ImportGguf(ImportArgs { .. })
        ));
    }
}
