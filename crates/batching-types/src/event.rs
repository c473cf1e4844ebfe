//! What a client receives: tokens, then exactly one finish event.

use std::fmt;

use tokio::sync::mpsc;

use crate::FailureKind;

/// Why a request stopped producing tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// The model produced a stop token (or the server matched a stop string).
    Stop,
    /// `max_tokens` tokens were generated.
    Length,
    /// The sequence reached the model's context length.
    ContextLength,
    /// The client went away or the request was cancelled explicitly.
    Cancelled,
    /// The request's deadline passed.
    Timeout,
    /// The backend failed for this request.
    Error,
}

impl FinishReason {
    /// The lower-case name used in logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ContextLength => "context_length",
            Self::Cancelled => "cancelled",
            Self::Timeout => "timeout",
            Self::Error => "error",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Token counts reported with the finish event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Tokens in the prompt as submitted.
    pub prompt_tokens: usize,
    /// Tokens generated and delivered.
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache instead of being
    /// computed (at the request's first admission).
    pub cached_tokens: usize,
}

/// A sampled token's log probability and the most likely alternatives, as
/// the request's sampling asked for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenLogprobs {
    /// The sampled token's log probability.
    pub logprob: f32,
    /// The most likely tokens and their log probabilities, most likely
    /// first.
    pub top: Vec<(u32, f32)>,
}

/// One event on a request's output stream.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputEvent {
    /// A generated token; `index` counts from 0 with no gaps.
    Token {
        /// The token id.
        token: u32,
        /// Its position among the generated tokens.
        index: usize,
        /// Its log probabilities, when the request asked for them.
        logprobs: Option<TokenLogprobs>,
    },
    /// The last event of every stream, sent exactly once.
    Finished {
        /// Why generation ended.
        reason: FinishReason,
        /// Token counts.
        usage: Usage,
        /// A human-readable explanation for `Error` and `Timeout`.
        message: Option<String>,
        /// For `Error`, what kind of failure it was (the client's error code).
        failure: Option<FailureKind>,
    },
}

/// The scheduler's end of a request's output stream.
///
/// It is unbounded on purpose: the engine loop must never wait for a slow
/// client, and a request's output is bounded by its `max_tokens` anyway.
pub type EventSender = mpsc::UnboundedSender<OutputEvent>;

/// The client's end of a request's output stream. Dropping it tells the
/// scheduler that the client has gone.
pub type EventReceiver = mpsc::UnboundedReceiver<OutputEvent>;

/// A new output stream.
pub fn event_channel() -> (EventSender, EventReceiver) {
    mpsc::unbounded_channel()
}
