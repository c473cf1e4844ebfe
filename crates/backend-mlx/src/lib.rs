//! The MLX backend: runs the model on Apple's MLX through `mlx-rs`.
//!
//! The main design decision is that MLX is used **as a prebuilt library on
//! every platform**: our own `mlx-sys` links the official MLX wheel that
//! `cargo xtask setup` installs (CPU on Linux, CUDA with an NVIDIA GPU, Metal
//! on macOS), and this crate depends on `mlx-sys` directly only to give its
//! binaries the rpath to it (see `build.rs`). The same code therefore runs
//! in CI on a Linux CPU and on a Mac or NVIDIA GPU; the [`Device`] is a
//! run-time choice, defaulting to the GPU when MLX reports one.
//!
//! On a CPU, f32 matmul goes through OpenBLAS (linked by `mlx-sys`), which is
//! the only MLX CPU path that gains from batching; quantized kernels are kept
//! for GPUs.

mod backend;
#[cfg(target_os = "linux")]
pub mod blas;
mod device;
mod error;
pub mod jit;
pub mod kv_pool;
pub mod model;
pub mod profile;
pub mod sampling;
mod team;

pub use backend::{LoadOptions, MlxBackend, DEFAULT_KV_MEMORY_BYTES};
pub use device::Device;
pub use error::BackendError;
pub use model::{ModelDType, ModelInfo};
pub use profile::{Stage, StepProfile};
