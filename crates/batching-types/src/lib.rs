//! The vocabulary every other mlx-batch crate speaks: request lifecycle,
//! priorities, sampling parameters, output events and the [`Backend`]
//! contract that the scheduler drives.
//!
//! The main design decision is that this crate holds *data and rules only*.
//! It knows nothing about HTTP, MLX or how a batch is formed; it encodes the
//! rules that must hold no matter who drives a request (for example which
//! status transitions are legal) so that every layer checks them the same way
//! and an illegal move is an error value rather than a silent corruption.
//!
//! Time is injected through the [`Clock`] trait so that the queue and the
//! scheduler can be tested with a [`ManualClock`] that never sleeps.

mod backend;
mod clock;
mod constraint;
mod error;
mod event;
mod failure;
mod priority;
mod request;
mod sampling;
mod status;

pub use backend::{
    Backend, BackendCapacity, BackendMemory, KvBlocks, SequenceOutcome, SequenceResult, StepItem,
    StepOutput, StepPlan, WorkKind,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use constraint::{
    mask_allows, ConstraintError, Shared, SharedConstraint, SharedStopCondition, StopCondition,
    TokenConstraint,
};
pub use error::TypesError;
pub use event::{
    event_channel, EventReceiver, EventSender, FinishReason, OutputEvent, TokenLogprobs, Usage,
};
pub use failure::{Failure, FailureKind};
pub use priority::Priority;
pub use request::{BatchRequest, NewRequest, RequestId};
pub use sampling::SamplingParams;
pub use status::RequestStatus;
