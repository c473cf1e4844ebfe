//! A simulated model backend that implements [`batching_types::Backend`]
//! without any model, for the scheduler's tests and benchmarks and the
//! server's tests.
//!
//! The main design decision is that every token is a pure function of the
//! sequence's context: the next token is a hash of the sampling seed and all
//! tokens before it (see [`tokens`]). So a sequence draws the same tokens
//! whether it runs alone or in a batch of 256, and a sequence that was
//! preempted and rebuilt from its prompt plus the tokens generated so far
//! continues exactly where it stopped. Tests can therefore compare any
//! scheduled run against [`tokens::expected_tokens`] computed alone.
//!
//! The second decision is that time is a cost model, not real work: a step
//! costs `step_cost` plus a cost per prefill and per decode token, and the
//! backend either sleeps for it, advances a [`batching_types::ManualClock`]
//! by it (deterministic virtual time), or only reports it. The backend also
//! checks the scheduler's side of the [`batching_types::Backend`] contract
//! on every call and can inject faults through a shared [`SimControl`].

mod backend;
mod config;
mod control;
mod error;
pub mod tokens;

pub use backend::SimBackend;
pub use config::{SimConfig, StopRule, TimeMode};
pub use control::{SimControl, SimStats};
pub use error::SimError;
