//! The one error enum of this crate.

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
    /// A sequence was added with bad arguments (an id in use, an empty or
    /// too long context, invalid sampling parameters).
    #[error("sequence: {0}")]
    Sequence(String),
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
