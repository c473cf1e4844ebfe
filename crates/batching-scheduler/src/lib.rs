//! The continuous-batching scheduler of mlx-batch.
//!
//! # Main design decision: one engine thread, a synchronous core
//!
//! A single engine thread owns the backend (MLX arrays must stay on the
//! thread that made them, so the backend is even *built* there, from a
//! factory closure) and runs steps back to back while there is work; when
//! idle it blocks on its submit channel. Everything that decides a step —
//! sweeping cancelled and expired requests, planning, admission, KV block
//! accounting, preemption — is the synchronous [`Scheduler`], which the
//! threaded loop behind [`SchedulerHandle`] merely wraps. Tests drive the
//! `Scheduler` one [`Scheduler::step`] at a time with a
//! [`batching_types::ManualClock`] and snapshot its [`StepTrace`]s.
//!
//! # How a step is formed
//!
//! First, urgency enters the batch: while the most urgent waiting requests
//! (in `batching-queue`'s aged order) outrank running ones and the batch or
//! the KV blocks are full, the least urgent outranked running request is
//! *paused* (it keeps its blocks and its backend cache and waits in the
//! queue under its original rank), and caches of less urgent requests are
//! dropped when blocks are needed (those resume by recomputation).
//!
//! The rule: a waiting request may displace a running one only if it
//! *outranks* it in the queue's own order, effective priority
//! `base - aging_rate * seconds since first queued` (ties to the earlier
//! arrival). Running and paused requests keep aging from their first
//! enqueue, so a request that has aged past a class is never preempted by
//! newer work of that class (a LOW request queued `2 / aging_rate` seconds
//! ago outranks every HIGH request that arrives after that), and none is
//! taken out for urgency more than `max_preemptions` times. Nothing is
//! taken out unless the waiting request then fits. The one exception to the
//! limit is progress itself: when a running decode needs a block and every
//! other holder has used up its preemptions, the least urgent of them still
//! gives up its cache, since otherwise nothing could advance. [`bound`] gives the
//! longest any request can wait, queued plus paused.
//!
//! Then decodes: every running sequence gets its next token, and when KV
//! blocks run out the least urgent holder of blocks (running or paused,
//! those under the preemption limit first) gives up its cache: it goes
//! back into the aging queue with its original enqueue time and its
//! generated tokens, to be recomputed from prompt plus generated tokens
//! later (token indices simply continue). Then prefills already under way
//! continue, and then waiting requests are admitted, or paused ones
//! resumed where they stopped, in queue order while the batch has room
//! under `max_batch_size`, the per-step token budget `max_batch_tokens`,
//! and free KV blocks for the whole prompt. No request feeds more than
//! `max_prefill_chunk` prompt tokens in one step, so a long prompt is
//! prefilled in chunks beside everyone else instead of taking whole steps.
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
pub use engine::Scheduler;
pub use error::{BackendSource, BuildPanicked, SchedulerError, ThreadStart};
pub use handle::{RequestStream, SchedulerHandle};
pub use shared::SchedulerStatus;
pub use trace::StepTrace;
