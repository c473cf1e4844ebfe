//! The continuous-batching scheduler of mlx-batch.
//!
//! # Main design decision: one engine thread, a synchronous core
//!
//! A single engine thread owns the backend (MLX arrays must stay on the
//! thread that made them, so the backend is even *built* there, from a
//! factory closure) and runs steps back to back while there is work; when
//! idle it blocks on its submit channel. Everything that decides a step —
//! sweeping cancelled and expired requests, planning, admission, KV block
//! accounting, preemption — is the synchronous [`Engine`], which the
//! threaded loop behind [`SchedulerHandle`] merely wraps. Tests drive the
//! `Engine` one [`Engine::step`] at a time with a
//! [`batching_types::ManualClock`] and snapshot its [`StepTrace`]s.
//!
//! # How a step is formed
//!
//! Decode first: every running sequence gets its next token, and when KV
//! blocks run out the least urgent running request (highest effective
//! priority value, newest among equals) is preempted: its blocks are freed,
//! the backend forgets it, and it goes back into the aging queue with its
//! original enqueue time and its generated tokens, to be recomputed from
//! prompt plus generated tokens later (token indices simply continue).
//! Then prefills already under way continue, and then waiting requests are
//! admitted in queue order (`batching-queue`'s priority queue with aging)
//! while the batch has room under `max_batch_size`, the per-step token
//! budget `max_batch_tokens`, and free KV blocks for the whole prompt. A
//! prompt longer than the budget left is prefilled in chunks, so it delays
//! running decodes by at most one budget per step.
//!
//! Requests that could never fit, even alone, are refused at submit, so the
//! engine never deadlocks; every accepted request receives exactly one
//! finish event, including at shutdown and if the engine thread dies.

mod blocks;
pub mod bound;
mod config;
mod engine;
mod error;
mod handle;
pub mod metrics;
mod shared;
mod trace;

pub use blocks::BlockAllocator;
pub use bound::{WaitBound, WaitBoundInputs};
pub use config::{ContextOverflow, SchedulerConfig};
pub use engine::Engine;
pub use error::SchedulerError;
pub use handle::{RequestStream, SchedulerHandle};
pub use shared::EngineHealth;
pub use trace::StepTrace;
