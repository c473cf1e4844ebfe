//! The model: configuration, weights and the Llama-family forward pass.

pub(crate) mod attention;
pub mod config;
pub(crate) mod fused;
pub(crate) mod host_ops;
pub(crate) mod linear;
pub mod llama;
pub(crate) mod rope;
pub(crate) mod weights;

pub use config::{ModelConfig, ModelInfo, QuantSpec, RopeScaling};
pub use llama::{Chunk, LlamaModel, StepBatch};
pub use weights::ModelDType;
