//! Glue shared by the streaming endpoints: wait for the first piece of a
//! response before committing to a status code, then stream the rest.
//!
//! Waiting for the first piece means that a request refused or timed out
//! in the queue still gets a proper HTTP error (504, 503...) rather than a
//! 200 followed by an error event.

use futures::{stream, Stream, StreamExt};

use crate::{
    generation::{Generation, Step, TokenInfo},
    openai::{errors::ApiError, types::UsageOut},
};

/// One thing to tell a streaming client.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// New text, and the log probabilities of the tokens read with it
    /// (either may be empty, not both).
    Text(String, Vec<TokenInfo>),
    /// The normal end.
    Finish {
        /// `stop` or `length`.
        reason: &'static str,
        /// Token counts.
        usage: UsageOut,
    },
    /// The request failed after the stream began.
    Error(ApiError),
}

/// Reads the first step; fails with the HTTP error when the request ended
/// in an error before producing any text.
pub async fn first_step(generation: &mut Generation) -> Result<Step, ApiError> {
    let Some(step) = generation.next_step().await else {
        return Err(ApiError::internal("the response ended without a finish"));
    };
    match step.finish {
        Some(ref finish) if step.text.is_empty() => match &finish.outcome {
            Err(e) => Err(e.clone()),
            Ok(_) => Ok(step),
        },
        _ => Ok(step),
    }
}

/// The items of a response whose first step has been read already.
pub fn items(first: Step, generation: Generation) -> impl Stream<Item = StreamItem> + Send {
    let first_items = stream::iter(step_items(first));
    let rest = stream::unfold(generation, |mut generation| async move {
        let step = generation.next_step().await?;
        Some((stream::iter(step_items(step)), generation))
    })
    .flatten();
    first_items.chain(rest)
}

fn step_items(step: Step) -> Vec<StreamItem> {
    let mut out = Vec::with_capacity(2);
    if !step.text.is_empty() || !step.logprobs.is_empty() {
        out.push(StreamItem::Text(step.text, step.logprobs));
    }
    if let Some(finish) = step.finish {
        out.push(match finish.outcome {
            Ok(reason) => StreamItem::Finish {
                reason,
                usage: finish.usage,
            },
            Err(e) => StreamItem::Error(e),
        });
    }
    out
}
