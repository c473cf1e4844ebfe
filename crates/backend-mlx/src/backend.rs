//! [`MlxBackend`]: the [`Backend`] that the scheduler drives.
//!
//! Each step turns the plan into one [`StepBatch`], builds one MLX graph for
//! it, evaluates it once (the step's only host sync), and samples on the
//! host. Keys and values live in a [`KvPool`] of blocks addressed by the
//! block tables that come with the plan: the scheduler's ids are the
//! memory. Items that cannot run (an unknown id, a chunk past its context, a
//! context past the model's limit) fail alone and are left out of the batch.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    path::PathBuf,
};

use batching_types::{
    Backend, BackendCapacity, BackendMemory, KvBlocks, RequestId, SamplingParams, SequenceOutcome,
    SequenceResult, StepItem, StepOutput, StepPlan, WorkKind,
};
use mlx_rs::Dtype;

use crate::{
    error::BackendError,
    kv_pool::KvPool,
    model::{llama::Decode, Chunk, LlamaModel, ModelConfig, ModelDType, ModelInfo, StepBatch},
    profile::{Profiler, Stage, StepProfile},
    sampling::{self, History},
    Device,
};

/// The KV memory budget when neither `kv_tokens` nor `kv_memory_bytes` is
/// given.
pub const DEFAULT_KV_MEMORY_BYTES: u64 = 2 << 30;

/// How to load a model; a config struct so that new knobs do not break
/// callers.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// A Hugging Face / mlx-community model folder.
    pub model_dir: PathBuf,
    /// Where MLX runs.
    pub device: Device,
    /// Weight dtype; `None` picks f32 on a CPU (dequantizing quantized
    /// weights, since only f32 matmul batches on MLX's CPU backend) and the
    /// stored weights on a GPU.
    pub dtype: Option<ModelDType>,
    /// KV capacity in tokens; `None` derives it from `kv_memory_bytes`.
    pub kv_tokens: Option<usize>,
    /// KV memory budget; `None` means [`DEFAULT_KV_MEMORY_BYTES`].
    pub kv_memory_bytes: Option<u64>,
    /// The most sequences the scheduler will batch (a sizing hint).
    pub max_batch_size: usize,
    /// The most memory MLX may use, weights and KV pool included; `None`
    /// leaves MLX's own default. The KV budget must fit beside the weights.
    pub memory_limit: Option<u64>,
    /// The most freed memory MLX keeps for reuse (its buffer cache), at most
    /// what the memory limit leaves beside the weights and the KV budget;
    /// `None` leaves MLX's default, which may keep up to the memory limit.
    pub cache_limit: Option<u64>,
}

impl LoadOptions {
    /// Defaults for `model_dir`: the best device, automatic dtype, 2 GiB of
    /// KV cache, batches of up to 32.
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        Self {
            model_dir: model_dir.into(),
            device: Device::default(),
            dtype: None,
            kv_tokens: None,
            kv_memory_bytes: None,
            max_batch_size: 32,
            memory_limit: None,
            cache_limit: None,
        }
    }

    /// The dtype that `dtype: None` resolves to on `device`.
    pub fn resolved_dtype(&self) -> ModelDType {
        self.dtype.unwrap_or(match self.device {
            Device::Cpu => ModelDType::F32,
            Device::Gpu => ModelDType::Native,
        })
    }
}

/// One registered sequence.
struct Sequence {
    /// Tokens written to the pool (context and generated).
    cached: usize,
    context: Vec<u32>,
    /// Context tokens already in the cache.
    prefilled: usize,
    /// The last sampled token, fed by the next decode.
    last: Option<u32>,
    sampling: SamplingParams,
    seed: u64,
    /// What penalties look at.
    history: History,
}

/// A Llama-family model on MLX with a paged KV cache.
///
/// Not `Send` in spirit: MLX arrays belong to the thread that made them, so
/// the scheduler builds the backend on its engine thread.
pub struct MlxBackend {
    model: LlamaModel,
    pool: KvPool,
    sequences: HashMap<RequestId, Sequence>,
    capacity: BackendCapacity,
    info: ModelInfo,
    /// The last step's logits (`[samples, vocab]`, f32, evaluated) and the
    /// row of each sequence that sampled, kept for inspection and tests.
    last_logits: Option<(mlx_rs::Array, HashMap<RequestId, usize>)>,
    profiler: Profiler,
    /// The memory limit, when one is set: steps that would not fit are
    /// refused before they run.
    memory_limit: Option<u64>,
}

impl std::fmt::Debug for MlxBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlxBackend")
            .field("info", &self.info)
            .field("capacity", &self.capacity)
            .field("sequences", &self.sequences.len())
            .finish_non_exhaustive()
    }
}

/// What one plan item turned into.
enum Planned {
    Failed(String),
    Pending,
    /// Sample from logits row `usize` for the token at `u64`.
    Sample(usize, u64),
}

impl MlxBackend {
    /// Loads the model in `options.model_dir` onto `options.device`.
    pub fn load(options: &LoadOptions) -> Result<Self, BackendError> {
        let device = options.device.ensure_available()?;
        mlx_rs::Device::set_default(&device.to_mlx());
        let dir = &options.model_dir;
        let config = ModelConfig::read(dir)?;
        let info = ModelInfo::from_config(dir, &config);
        let dtype = options.resolved_dtype();
        let store = crate::model::weights::WeightStore::open(dir, dtype)?;
        // The compiled CPU kernels are only worth it when MLX's JIT builds
        // them for this machine; enable that before anything compiles.
        let fused = device == Device::Cpu;
        if fused {
            crate::jit::enable();
        }
        let model = LlamaModel::load(config, &store, dtype, fused)?;
        drop(store);
        let layout = model.kv_layout();
        let kv_dtype = model.dtype();
        let kv_tokens = match (options.kv_tokens, options.kv_memory_bytes) {
            (Some(tokens), _) => tokens,
            (None, bytes) => {
                let bytes = bytes.unwrap_or(DEFAULT_KV_MEMORY_BYTES);
                (bytes / layout.bytes_per_token(kv_dtype).max(1) as u64) as usize
            }
        };
        if kv_tokens == 0 {
            return Err(BackendError::NoKvBudget);
        }
        let mut cache_limit = options.cache_limit;
        if let Some(limit) = options.memory_limit {
            let weights = mlx_rs::memory::active_memory()? as u64;
            let kv_bytes = (kv_tokens * layout.bytes_per_token(kv_dtype)) as u64;
            let room = limit.checked_sub(weights.saturating_add(kv_bytes)).ok_or(
                BackendError::MemoryLimit {
                    weights_mib: weights >> 20,
                    kv_mib: kv_bytes >> 20,
                    limit_mib: limit >> 20,
                },
            )?;
            mlx_rs::memory::set_memory_limit(limit as usize)?;
            // Freed buffers are kept only within what neither the weights
            // nor the KV pool can claim.
            cache_limit = Some(cache_limit.map_or(room, |c| c.min(room)));
        }
        if let Some(cache) = cache_limit {
            mlx_rs::memory::set_cache_limit(cache as usize)?;
        }
        let capacity = BackendCapacity {
            kv_tokens,
            max_context: info.max_context.min(kv_tokens),
        };
        Ok(Self {
            pool: KvPool::new(layout, kv_dtype),
            model,
            sequences: HashMap::new(),
            capacity,
            info,
            last_logits: None,
            profiler: Profiler::default(),
            memory_limit: options.memory_limit,
        })
    }

    /// The logits (f32, over the vocabulary) from which the last step
    /// sampled `id`'s token, if it sampled one.
    pub fn last_logits(&self, id: RequestId) -> Option<&[f32]> {
        let (logits, rows) = self.last_logits.as_ref()?;
        let row = *rows.get(&id)?;
        let vocab = logits.dim(1) as usize;
        logits.as_slice::<f32>().get(row * vocab..(row + 1) * vocab)
    }

    /// The model's name, architecture and limits.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The loaded model.
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// The weights' dtype as loaded.
    pub fn dtype(&self) -> Dtype {
        self.model.dtype()
    }

    /// Bytes the KV pool holds now.
    pub fn kv_allocated_bytes(&self) -> usize {
        self.pool.allocated_bytes()
    }

    /// Bytes of one KV block over all layers (0 before `configure_kv`).
    pub fn kv_block_bytes(&self) -> usize {
        self.pool.block_bytes()
    }

    /// Turns step profiling on or off (see [`crate::profile`]): while on,
    /// every step evaluates stage by stage and records where its time went.
    pub fn set_profiling(&mut self, on: bool) {
        self.profiler.set_enabled(on);
    }

    /// The time per stage of the steps profiled since the last call.
    pub fn take_profile(&mut self) -> StepProfile {
        self.profiler.take()
    }

    /// Registered sequences.
    pub fn num_sequences(&self) -> usize {
        self.sequences.len()
    }

    fn plan_item<'a>(
        &self,
        (item, step_item): (usize, &StepItem),
        table: Option<&'a Vec<u32>>,
        batch: &mut StepBatch<'a>,
        chunks_tokens: &mut Vec<u32>,
        chunk_samples: &mut Vec<(usize, usize)>,
    ) -> Planned {
        let StepItem { id, kind } = *step_item;
        let Some(seq) = self.sequences.get(&id) else {
            return Planned::Failed(format!("{id} is not registered"));
        };
        let Some(table) = table else {
            return Planned::Failed(format!("{id} has no block table in the plan"));
        };
        let cached = seq.cached;
        let max_context = self.capacity.max_context;
        let bs = self.pool.blocks().map_or(1, |b| b.block_size);
        let num_blocks = self.pool.blocks().map_or(0, |b| b.num_blocks);
        let after = match kind {
            WorkKind::Decode => cached + 1,
            WorkKind::Prefill { len } => seq.prefilled + len,
        };
        if table.len() < after.div_ceil(bs) || table.iter().any(|&b| b as usize >= num_blocks) {
            return Planned::Failed(format!(
                "{id}: its block table {table:?} does not hold {after} tokens in a pool of {num_blocks} blocks of {bs}"
            ));
        }
        match kind {
            WorkKind::Decode => {
                let Some(last) = seq.last.filter(|_| seq.prefilled == seq.context.len()) else {
                    return Planned::Failed(format!("{id} decodes before its prefill finished"));
                };
                if cached + 1 >= max_context {
                    return Planned::Failed(format!(
                        "{id} reached the model's context of {max_context} tokens"
                    ));
                }
                batch.tokens.push(last);
                batch.decodes.push(Decode {
                    table,
                    position: cached,
                });
                let index = batch.decodes.len() - 1;
                batch.sample_at.push(index);
                Planned::Sample(batch.sample_at.len() - 1, (cached + 1) as u64)
            }
            WorkKind::Prefill { len } => {
                let end = seq.prefilled + len;
                if len == 0 || end > seq.context.len() {
                    return Planned::Failed(format!(
                        "{id}: a prefill of {len} tokens from {} runs past its {} context tokens",
                        seq.prefilled,
                        seq.context.len()
                    ));
                }
                let start = chunks_tokens.len();
                chunks_tokens.extend_from_slice(&seq.context[seq.prefilled..end]);
                batch.chunks.push(Chunk {
                    table,
                    start,
                    len,
                    position: seq.prefilled,
                });
                if end == seq.context.len() {
                    // Resolved to a logits row once the decode count is known.
                    chunk_samples.push((item, start + len - 1));
                    Planned::Sample(usize::MAX, end as u64)
                } else {
                    Planned::Pending
                }
            }
        }
    }
}

impl Backend for MlxBackend {
    type Error = BackendError;

    fn capacity(&self) -> BackendCapacity {
        self.capacity
    }

    fn configure_kv(&mut self, blocks: KvBlocks) -> Result<(), Self::Error> {
        if blocks.block_size == 0
            || blocks.num_blocks.saturating_mul(blocks.block_size) > self.capacity.kv_tokens
        {
            return Err(BackendError::KvLayout {
                num_blocks: blocks.num_blocks,
                block_size: blocks.block_size,
                kv_tokens: self.capacity.kv_tokens,
            });
        }
        if !self.sequences.is_empty() {
            return Err(BackendError::KvLayoutInUse);
        }
        self.pool.configure(blocks);
        Ok(())
    }

    fn add_sequence(
        &mut self,
        id: RequestId,
        context: &[u32],
        sampling: &SamplingParams,
    ) -> Result<(), Self::Error> {
        if self.sequences.contains_key(&id) {
            return Err(BackendError::DuplicateSequence(id));
        }
        if context.is_empty() {
            return Err(BackendError::EmptyContext(id));
        }
        if context.len() >= self.capacity.max_context {
            return Err(BackendError::ContextTooLong {
                id,
                tokens: context.len(),
                max_context: self.capacity.max_context,
            });
        }
        let vocab = self.info.vocab_size as u32;
        if let Some(bad) = context.iter().find(|&&t| t >= vocab) {
            return Err(BackendError::TokenOutOfVocab {
                id,
                token: *bad,
                vocab,
            });
        }
        sampling
            .validate()
            .map_err(|source| BackendError::InvalidSampling { id, source })?;
        // Unseeded requests get a seed now, so that a preempted request
        // recomputed later still draws the same tokens.
        let seed = sampling
            .seed
            .unwrap_or_else(|| RandomState::new().hash_one(id.seq()));
        if self.pool.blocks().is_none() {
            return Err(BackendError::KvNotConfigured);
        }
        self.sequences.insert(
            id,
            Sequence {
                cached: 0,
                context: context.to_vec(),
                prefilled: 0,
                last: None,
                sampling: sampling.clone(),
                seed,
                history: History::new(context, 0),
            },
        );
        Ok(())
    }

    fn mark_generated(&mut self, id: RequestId, tokens: usize) -> Result<(), Self::Error> {
        let Some(seq) = self.sequences.get_mut(&id) else {
            return Err(BackendError::UnknownSequence(id));
        };
        seq.history = History::new(&seq.context, tokens.min(seq.context.len()));
        Ok(())
    }

    fn use_cached_prefix(&mut self, id: RequestId, tokens: usize) -> Result<(), Self::Error> {
        let bs = self.pool.blocks().map_or(0, |b| b.block_size);
        let Some(seq) = self.sequences.get_mut(&id) else {
            return Err(BackendError::UnknownSequence(id));
        };
        if seq.cached != 0 || tokens >= seq.context.len() || bs == 0 || !tokens.is_multiple_of(bs) {
            return Err(BackendError::CachedPrefix {
                id,
                tokens,
                context: seq.context.len(),
                block_size: bs,
            });
        }
        seq.prefilled = tokens;
        seq.cached = tokens;
        Ok(())
    }

    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, Self::Error> {
        self.profiler.begin();
        let mut batch = StepBatch::default();
        let mut chunk_tokens = Vec::new();
        let mut chunk_samples = Vec::new();
        let mut planned = Vec::with_capacity(plan.items.len());
        for (i, item) in plan.items.iter().enumerate() {
            let p = self.plan_item(
                (i, item),
                plan.block_tables.get(i),
                &mut batch,
                &mut chunk_tokens,
                &mut chunk_samples,
            );
            planned.push(p);
        }
        // Prefill tokens follow the decodes in the stacked activation.
        let n_dec = batch.decodes.len();
        batch.tokens.extend_from_slice(&chunk_tokens);
        for chunk in &mut batch.chunks {
            chunk.start += n_dec;
        }
        for (item, token_index) in chunk_samples {
            batch.sample_at.push(token_index + n_dec);
            if let Some(Planned::Sample(row, _)) = planned.get_mut(item) {
                *row = batch.sample_at.len() - 1;
            }
        }

        self.check_memory(&batch)?;
        self.last_logits = None;
        let logits = self
            .model
            .forward_profiled(&batch, &mut self.pool, &mut self.profiler)?;
        match &logits {
            Some(l) => {
                // Grammar masks are computed on the host while the device
                // runs the step.
                mlx_rs::transforms::async_eval([l])?;
            }
            None => mlx_rs::transforms::eval(self.pool.all_arrays())?,
        }
        let vocab_width = self.info.vocab_size;
        let masks = self.grammar_masks(plan, &planned, vocab_width);
        if let Some(l) = &logits {
            mlx_rs::transforms::eval([l])?;
        }
        let empty: &[f32] = &[];
        let host = logits.as_ref().map_or(empty, |l| l.as_slice::<f32>());
        let vocab = logits.as_ref().map_or(0, |l| l.dim(1) as usize);

        let mut rows = HashMap::new();
        let mut results = Vec::with_capacity(plan.items.len());
        for ((item, p), mask) in plan.items.iter().zip(planned).zip(masks) {
            let mut logprobs = None;
            let outcome = match p {
                Planned::Failed(message) => SequenceOutcome::Failed(message),
                Planned::Pending => {
                    self.advance(item.id, item.kind);
                    SequenceOutcome::Pending
                }
                Planned::Sample(row, position) => {
                    let Some(row_logits) = host.get(row * vocab..(row + 1) * vocab) else {
                        return Err(BackendError::MissingLogits { id: item.id, row });
                    };
                    let Some(seq) = self.sequences.get_mut(&item.id) else {
                        results.push(SequenceResult {
                            id: item.id,
                            outcome: SequenceOutcome::Failed("released during the step".into()),
                            logprobs: None,
                        });
                        continue;
                    };
                    match mask {
                        Err(message) => SequenceOutcome::Failed(message),
                        Ok(mask) => {
                            let sampled = sampling::sample_row(
                                row_logits,
                                &seq.sampling,
                                &seq.history,
                                mask.as_deref(),
                                seq.seed,
                                position,
                            );
                            let token = sampled.token;
                            let consumed = match &seq.sampling.constraint {
                                Some(c) => c.lock().consume(token).map_err(|e| e.to_string()),
                                None => Ok(()),
                            };
                            match consumed {
                                Err(message) => SequenceOutcome::Failed(message),
                                Ok(()) => {
                                    seq.history.push(token);
                                    seq.last = Some(token);
                                    logprobs = sampled.logprobs;
                                    rows.insert(item.id, row);
                                    self.advance(item.id, item.kind);
                                    SequenceOutcome::Token(token)
                                }
                            }
                        }
                    }
                }
            };
            results.push(SequenceResult {
                id: item.id,
                outcome,
                logprobs,
            });
        }
        self.last_logits = logits.map(|l| (l, rows));
        self.profiler.host(Stage::Sample);
        self.profiler.end();
        Ok(StepOutput { results })
    }

    fn memory(&self) -> BackendMemory {
        let read = |f: fn() -> mlx_rs::error::Result<usize>| f().map_or(0, |b| b as u64);
        BackendMemory {
            active_bytes: read(mlx_rs::memory::active_memory),
            peak_bytes: read(mlx_rs::memory::peak_memory),
            cache_bytes: read(mlx_rs::memory::cache_memory),
            kv_bytes: self.pool.allocated_bytes() as u64,
        }
    }

    fn release(&mut self, id: RequestId) {
        // The scheduler owns the blocks, and a released sequence's full
        // blocks may be read again through the prefix cache: the pool keeps
        // them, even when no sequence is left.
        self.sequences.remove(&id);
    }
}

impl MlxBackend {
    /// The grammar mask of every item that samples under a constraint
    /// (`Ok(None)` for the others), or why its grammar cannot go on.
    fn grammar_masks(
        &self,
        plan: &StepPlan,
        planned: &[Planned],
        vocab: usize,
    ) -> Vec<Result<Option<Vec<u32>>, String>> {
        plan.items
            .iter()
            .zip(planned)
            .map(|(item, p)| {
                let constraint = match p {
                    Planned::Sample(..) => self
                        .sequences
                        .get(&item.id)
                        .and_then(|s| s.sampling.constraint.as_ref()),
                    _ => None,
                };
                let Some(constraint) = constraint else {
                    return Ok(None);
                };
                let mut mask = vec![0u32; vocab.div_ceil(32)];
                constraint
                    .lock()
                    .fill_mask(&mut mask)
                    .map(|()| Some(mask))
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    /// Refuses a step whose working set would not fit in the memory limit
    /// beside the weights and the whole KV budget (which the pool may still
    /// grow into), before anything changes: the scheduler then retries with
    /// less work. MLX's CPU allocator never fails at its limit, it only
    /// waits, and past the machine's memory the process is killed: this
    /// check is what turns memory pressure into an error that can be shed.
    fn check_memory(&self, batch: &StepBatch<'_>) -> Result<(), BackendError> {
        let Some(limit) = self.memory_limit else {
            return Ok(());
        };
        let bs = self.pool.blocks().map_or(1, |b| b.block_size);
        let needed = self.model.step_working_set(batch, bs);
        let active = mlx_rs::memory::active_memory()? as u64;
        let kv_budget = self.capacity.kv_tokens as u64
            * self.model.kv_layout().bytes_per_token(self.model.dtype()) as u64;
        let unallocated_kv = kv_budget.saturating_sub(self.pool.allocated_bytes() as u64);
        if active + unallocated_kv + needed > limit {
            return Err(BackendError::OutOfMemory {
                needed_mib: needed >> 20,
                active_mib: (active + unallocated_kv) >> 20,
                limit_mib: limit >> 20,
            });
        }
        Ok(())
    }

    /// Records what a successful item wrote into the cache.
    fn advance(&mut self, id: RequestId, kind: WorkKind) {
        let Some(seq) = self.sequences.get_mut(&id) else {
            return;
        };
        let written = match kind {
            WorkKind::Prefill { len } => {
                seq.prefilled += len;
                len
            }
            WorkKind::Decode => 1,
        };
        seq.cached += written;
    }
}
