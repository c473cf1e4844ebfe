//! What each subcommand does, on top of the library.

pub mod generate;
pub mod import;
pub mod serve;

use std::path::{Path, PathBuf};

use anyhow::Context;
use backend_mlx::{Device, LoadOptions, MlxBackend};
use batching_scheduler::{SchedulerConfig, SchedulerHandle};
use batching_types::SystemClock;

use crate::{
    cli::{resolve_model_dir, DeviceArg, ModelArgs},
    mlx_text::MlxTextModel,
    scheduler_service::SchedulerService,
};

/// A loaded model behind a running scheduler.
pub struct Loaded {
    /// The scheduler, behind the engine seam.
    pub engine: SchedulerService,
    /// The model's text side.
    pub model: MlxTextModel,
}

/// How big the KV cache is.
#[derive(Debug, Clone, Copy)]
pub enum KvSize {
    /// A memory budget in bytes.
    Bytes(u64),
    /// A number of tokens.
    Tokens(usize),
}

/// How much memory the backend may use.
#[derive(Debug, Clone, Copy)]
pub struct MemoryPlan {
    /// The KV cache's size.
    pub kv: KvSize,
    /// The most memory MLX may use in all; `None` leaves MLX's default.
    pub limit: Option<u64>,
    /// The most freed memory MLX keeps for reuse; `None` for MLX's default.
    pub cache_limit: Option<u64>,
}

impl From<KvSize> for MemoryPlan {
    fn from(kv: KvSize) -> Self {
        Self {
            kv,
            limit: None,
            cache_limit: Some(DEFAULT_CACHE_LIMIT),
        }
    }
}

/// MLX's buffer cache when nothing else is said: enough to reuse a step's
/// temporaries, small beside the KV budget.
pub const DEFAULT_CACHE_LIMIT: u64 = 256 << 20;

/// Loads the model on the engine thread and starts the scheduler over it.
pub fn load(
    args: &ModelArgs,
    scheduler: SchedulerConfig,
    memory: MemoryPlan,
) -> anyhow::Result<Loaded> {
    let (dir, model) = load_text(args)?;
    let engine = start_engine(&dir, args, scheduler, memory)?;
    Ok(Loaded { engine, model })
}

/// The model's folder and its text side (tokenizer, chat template): quick,
/// and all the HTTP layer needs before the weights are in memory.
pub fn load_text(args: &ModelArgs) -> anyhow::Result<(PathBuf, MlxTextModel)> {
    let dir = resolve_model_dir(args.model.as_ref())?;
    let model = MlxTextModel::load(&dir)?;
    Ok((dir, model))
}

/// Loads the weights on the engine thread and starts the scheduler over
/// them: seconds of blocking work.
pub fn start_engine(
    dir: &Path,
    args: &ModelArgs,
    scheduler: SchedulerConfig,
    memory: MemoryPlan,
) -> anyhow::Result<SchedulerService> {
    let device = match args.device {
        DeviceArg::Auto => Device::best_available(),
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Gpu => Device::Gpu.ensure_available()?,
    };
    let mut options = LoadOptions::new(dir);
    options.device = device;
    options.max_batch_size = scheduler.max_batch_size;
    options.memory_limit = memory.limit;
    options.cache_limit = memory.cache_limit;
    match memory.kv {
        KvSize::Bytes(bytes) => options.kv_memory_bytes = Some(bytes),
        KvSize::Tokens(tokens) => options.kv_tokens = Some(tokens),
    }
    tracing::info!(dir = %dir.display(), %device, "loading the model");
    // The backend is built on the engine thread: MLX arrays stay on the
    // thread that made them.
    let handle = SchedulerHandle::spawn(scheduler, SystemClock, move || MlxBackend::load(&options))
        .context("starting the engine")?;
    let capacity = handle.capacity();
    tracing::info!(
        kv_tokens = capacity.kv_tokens,
        max_context = capacity.max_context,
        jit = ?backend_mlx::jit::enable(),
        "engine ready"
    );
    let max_sequence_tokens = handle.max_sequence_tokens();
    Ok(SchedulerService::new(handle, max_sequence_tokens))
}
