//! The one error enum of this crate.

use batching_types::{Failure, FailureKind, RequestId, TypesError};

use crate::Device;

/// Everything that can go wrong in the MLX backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A device name other than `cpu` or `gpu`.
    #[error("unknown device {0:?}: expected \"cpu\" or \"gpu\"")]
    UnknownDevice(String),
    /// The device was asked for but MLX has none of that kind here.
    #[error("device {0} is not available: this MLX build sees no GPU (Metal or CUDA)")]
    DeviceUnavailable(Device),
    /// An MLX operation failed.
    #[error("MLX: {0}")]
    Mlx(#[from] mlx_rs::error::Exception),
    /// Reading or writing an MLX file failed.
    #[error("MLX I/O: {0}")]
    MlxIo(#[from] mlx_rs::error::IoError),
    /// A model file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A configuration file is malformed or asks for something unsupported.
    #[error("{}: {message}", path.display())]
    Config {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A weight is missing, has the wrong shape or dtype, or its file is
    /// corrupt.
    #[error("{}: tensor {tensor:?}: {message}", file.display())]
    Weights {
        /// The safetensors file (or the model folder when no file has it).
        file: std::path::PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What is wrong with it.
        message: String,
    },
    /// A dtype name other than f32, f16, bf16 or native.
    #[error("unknown dtype {0:?}: expected f32, f16, bf16 or native")]
    UnknownDType(String),
    /// The KV budget is too small for a single token.
    #[error("the KV budget holds no token; raise kv_tokens or kv_memory_bytes")]
    NoKvBudget,
    /// A block layout the budget cannot hold.
    #[error("{num_blocks} KV blocks of {block_size} tokens do not fit in the {kv_tokens} KV tokens this backend holds")]
    KvLayout {
        /// Blocks asked for.
        num_blocks: usize,
        /// Tokens per block.
        block_size: usize,
        /// Tokens the budget holds.
        kv_tokens: usize,
    },
    /// The layout was set again while sequences are registered.
    #[error("the KV layout cannot change while sequences are registered")]
    KvLayoutInUse,
    /// A sequence came before the KV layout.
    #[error("configure_kv must come before any sequence")]
    KvNotConfigured,
    /// A sequence id that is already registered.
    #[error("{0} is already registered")]
    DuplicateSequence(RequestId),
    /// A sequence id that is not registered.
    #[error("{0} is not registered")]
    UnknownSequence(RequestId),
    /// A sequence with no context tokens.
    #[error("{0} has an empty context")]
    EmptyContext(RequestId),
    /// A context that fills the model's whole context length.
    #[error("{id}: {tokens} context tokens leave no room in the model's context of {max_context}")]
    ContextTooLong {
        /// The sequence.
        id: RequestId,
        /// Its context tokens.
        tokens: usize,
        /// The model's context length.
        max_context: usize,
    },
    /// A token id outside the vocabulary.
    #[error("{id}: token {token} is outside the vocabulary of {vocab}")]
    TokenOutOfVocab {
        /// The sequence.
        id: RequestId,
        /// The token.
        token: u32,
        /// The vocabulary size.
        vocab: u32,
    },
    /// Sampling parameters out of range.
    #[error("{id}: {source}")]
    InvalidSampling {
        /// The sequence.
        id: RequestId,
        /// What is wrong, naming the parameter.
        source: TypesError,
    },
    /// A prefix-cache claim that does not fit the sequence.
    #[error("{id}: a cached prefix of {tokens} tokens does not fit its {context} context tokens in blocks of {block_size}")]
    CachedPrefix {
        /// The sequence.
        id: RequestId,
        /// Tokens claimed.
        tokens: usize,
        /// Its context tokens.
        context: usize,
        /// Tokens per block.
        block_size: usize,
    },
    /// The step produced fewer logits rows than it sampled (a bug).
    #[error("{id}: no logits row {row}")]
    MissingLogits {
        /// The sequence.
        id: RequestId,
        /// The row it should have had.
        row: usize,
    },
    /// A step whose working set would not fit in the memory limit, refused
    /// before it ran (so nothing changed). MLX's CPU allocator never fails
    /// at its limit (it only waits), and past the machine's memory the
    /// process is killed, so the backend checks first.
    #[error(
        "out of memory: the step needs about {needed_mib} MiB beside the {active_mib} MiB in use, over the limit of {limit_mib} MiB"
    )]
    OutOfMemory {
        /// What the step's temporaries would take.
        needed_mib: u64,
        /// What MLX holds now (weights, KV pool, kept temporaries).
        active_mib: u64,
        /// The memory limit.
        limit_mib: u64,
    },
    /// The weights and the KV budget do not fit in the memory limit.
    #[error(
        "the weights ({weights_mib} MiB) and the KV budget ({kv_mib} MiB) do not fit in the memory limit of {limit_mib} MiB; lower the KV memory or raise the limit"
    )]
    MemoryLimit {
        /// MiB the loaded weights take.
        weights_mib: u64,
        /// MiB the KV budget takes.
        kv_mib: u64,
        /// The limit, in MiB.
        limit_mib: u64,
    },
}

impl Failure for BackendError {
    fn kind(&self) -> FailureKind {
        match self {
            Self::OutOfMemory { .. } => FailureKind::OutOfMemory,
            Self::EmptyContext(_)
            | Self::ContextTooLong { .. }
            | Self::TokenOutOfVocab { .. }
            | Self::InvalidSampling { .. } => FailureKind::InvalidRequest,
            Self::UnknownDevice(_)
            | Self::DeviceUnavailable(_)
            | Self::UnknownDType(_)
            | Self::Io { .. }
            | Self::MlxIo(_)
            | Self::Config { .. }
            | Self::Weights { .. }
            | Self::NoKvBudget
            | Self::MemoryLimit { .. } => FailureKind::Unavailable,
            Self::Mlx(_)
            | Self::KvLayout { .. }
            | Self::KvLayoutInUse
            | Self::KvNotConfigured
            | Self::DuplicateSequence(_)
            | Self::UnknownSequence(_)
            | Self::CachedPrefix { .. }
            | Self::MissingLogits { .. } => FailureKind::Internal,
        }
    }
}
