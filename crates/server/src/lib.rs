//! The `mlx-batch` server: OpenAI-compatible HTTP over the
//! continuous-batching scheduler, and the command line around it.
//!
//! The main design decision is that the HTTP layer talks to the rest of the
//! system through two small seams, [`service::GenerationService`] (submit a request, get
//! its event stream; report health) and [`text_model::TextModel`] (encode,
//! chat template with tools, streaming detokenizer, grammar compiler). Routes therefore hold no model or
//! scheduling logic, they are tested over real HTTP with the simulated
//! backend and a byte-level model, and the binary plugs in the real
//! scheduler and tokenizer. A response owns its engine event stream, so a
//! client that disconnects cancels its request by simply going away.
//!
//! The `mlx` feature (on by default) adds the MLX backend, the commands that
//! load a model and the binary. Without it the crate is the HTTP layer alone,
//! which is what the fuzz target in `fuzz/` builds.

pub mod app;
pub mod byte_model;
pub mod cli;
#[cfg(feature = "mlx")]
pub mod commands;
pub mod connections;
pub mod generation;
pub mod health;
#[cfg(feature = "mlx")]
pub mod mlx_text;
pub mod openai;
pub mod prepare;
pub mod request_id;
pub mod routes;
pub mod scheduler_service;
pub mod service;
pub mod sse;
pub mod stop;
pub mod structured;
pub mod telemetry;
pub mod text_model;
