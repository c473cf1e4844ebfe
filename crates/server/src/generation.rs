//! One response being generated: engine events in, text deltas out.
//!
//! Chat and text completions, streamed or not, all read a request the same
//! way: decode tokens incrementally, hide end-of-sequence tokens, cut at the
//! first stop string, and turn the finish event into an OpenAI finish
//! reason or an error. Dropping a [`Generation`] drops the engine's event
//! stream, which cancels the request and frees its KV blocks; that is how a
//! client that disconnects mid-stream, or a matched stop string, ends the
//! work on the engine side.

use batching_types::{FailureKind, FinishReason, OutputEvent, TokenLogprobs};
use futures::StreamExt;

use crate::{
    openai::{errors::ApiError, types::UsageOut},
    service::EventStream,
    stop::{StopMatcher, StopOutcome},
    text_model::StreamDecoder,
};

/// How a response ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    /// `stop` or `length`, or the error to report.
    pub outcome: Result<&'static str, ApiError>,
    /// Token counts.
    pub usage: UsageOut,
}

/// A generated token with its log probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    /// The token.
    pub token: u32,
    /// Its log probability and the top alternatives.
    pub logprobs: TokenLogprobs,
}

/// What one read produced: new text, and the finish when it is the last.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Text to send; may be empty in the last step.
    pub text: String,
    /// Set in the last step only.
    pub finish: Option<Finish>,
    /// The log probabilities of the tokens read since the last step (when
    /// the request asked for them): those whose text this step carries, and
    /// any whose text is still held back by the detokenizer or a possible
    /// stop string.
    pub logprobs: Vec<TokenInfo>,
}

/// A whole answer, as [`Generation::collect`] returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Collected {
    /// The text.
    pub text: String,
    /// `stop` or `length`.
    pub reason: &'static str,
    /// Token counts.
    pub usage: UsageOut,
    /// Every output token's log probabilities, when asked for.
    pub logprobs: Vec<TokenInfo>,
}

/// Everything a [`Generation`] needs besides the event stream.
pub struct GenerationConfig {
    /// The incremental detokenizer.
    pub decoder: Box<dyn StreamDecoder>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Tokens that end generation and are not text.
    pub eos_token_ids: Vec<u32>,
    /// Prompt length, for usage when the server ends the request itself.
    pub prompt_tokens: usize,
    /// The request's name, for log lines written outside its handler (a
    /// streamed body outlives the handler's span).
    pub request_name: String,
}

/// Reads one request's events.
pub struct Generation {
    events: Option<EventStream>,
    decoder: Box<dyn StreamDecoder>,
    stop: StopMatcher,
    eos: Vec<u32>,
    prompt_tokens: usize,
    completion_tokens: usize,
    finished: bool,
    request_name: String,
    /// Log probabilities not yet handed out in a step.
    logprobs: Vec<TokenInfo>,
}

impl Generation {
    /// Starts reading `events`.
    pub fn new(events: EventStream, config: GenerationConfig) -> Self {
        Self {
            events: Some(events),
            decoder: config.decoder,
            stop: StopMatcher::new(config.stop),
            eos: config.eos_token_ids,
            prompt_tokens: config.prompt_tokens,
            completion_tokens: 0,
            finished: false,
            request_name: config.request_name,
            logprobs: Vec::new(),
        }
    }

    /// The next piece of text, or `None` once the finish was returned.
    pub async fn next_step(&mut self) -> Option<Step> {
        if self.finished {
            return None;
        }
        loop {
            let event = match self.events.as_mut() {
                Some(events) => events.next().await,
                None => None,
            };
            let step = match event {
                Some(OutputEvent::Token {
                    token, logprobs, ..
                }) => self.on_token(token, logprobs),
                Some(OutputEvent::Finished {
                    reason,
                    usage,
                    message,
                    failure,
                }) => Some(self.on_finished(
                    reason,
                    UsageOut::new(
                        usage.prompt_tokens,
                        usage.completion_tokens,
                        usage.cached_tokens,
                    ),
                    message,
                    failure,
                )),
                None => {
                    let usage = self.usage();
                    Some(self.end(
                        String::new(),
                        Err(ApiError::unavailable(
                            "The inference engine stopped before the request finished.",
                        )),
                        usage,
                    ))
                }
            };
            if step.is_some() {
                return step;
            }
        }
    }

    /// Reads everything and returns the whole answer, or the error.
    pub async fn collect(mut self) -> Result<Collected, ApiError> {
        let mut text = String::new();
        let mut logprobs = Vec::new();
        while let Some(step) = self.next_step().await {
            text.push_str(&step.text);
            logprobs.extend(step.logprobs);
            if let Some(finish) = step.finish {
                return finish.outcome.map(|reason| Collected {
                    text,
                    reason,
                    usage: finish.usage,
                    logprobs,
                });
            }
        }
        Err(ApiError::internal("the response ended without a finish"))
    }

    fn usage(&self) -> UsageOut {
        UsageOut::new(self.prompt_tokens, self.completion_tokens, 0)
    }

    fn on_token(&mut self, token: u32, logprobs: Option<TokenLogprobs>) -> Option<Step> {
        self.completion_tokens += 1;
        if self.eos.contains(&token) {
            // The finish event follows; an end-of-sequence token is no text.
            return None;
        }
        if let Some(logprobs) = logprobs {
            self.logprobs.push(TokenInfo { token, logprobs });
        }
        let text = match self.decoder.push(token) {
            Ok(text) => text,
            Err(e) => {
                let usage = self.usage();
                return Some(self.end(
                    String::new(),
                    Err(ApiError::internal(format!(
                        "could not decode token {token}: {e}"
                    ))),
                    usage,
                ));
            }
        };
        match self.stop.push(&text) {
            StopOutcome::Continue(text) if text.is_empty() => None,
            StopOutcome::Continue(text) => Some(Step {
                text,
                finish: None,
                logprobs: std::mem::take(&mut self.logprobs),
            }),
            StopOutcome::Stopped(text) => {
                let usage = self.usage();
                Some(self.end(text, Ok("stop"), usage))
            }
        }
    }

    fn on_finished(
        &mut self,
        reason: FinishReason,
        usage: UsageOut,
        message: Option<String>,
        failure: Option<FailureKind>,
    ) -> Step {
        let tail = self.decoder.flush();
        let (mut text, stopped) = match self.stop.push(&tail) {
            StopOutcome::Stopped(text) => (text, true),
            StopOutcome::Continue(text) => (text, false),
        };
        let mut stopped_by_string = stopped;
        if !stopped {
            let (rest, stopped) = match self.stop.finish() {
                StopOutcome::Stopped(rest) => (rest, true),
                StopOutcome::Continue(rest) => (rest, false),
            };
            text.push_str(&rest);
            stopped_by_string = stopped;
        }
        let message = message.unwrap_or_else(|| format!("the request ended: {reason}"));
        let outcome = match reason {
            _ if stopped_by_string => Ok("stop"),
            FinishReason::Stop => Ok("stop"),
            FinishReason::Length | FinishReason::ContextLength => Ok("length"),
            FinishReason::Timeout => Err(ApiError::timeout(message)),
            FinishReason::Cancelled => Err(ApiError::unavailable(message)),
            FinishReason::Error => Err(ApiError::failure(
                failure.unwrap_or(FailureKind::Internal),
                message,
            )),
        };
        self.end(text, outcome, usage)
    }

    /// Ends the response; dropping the event stream cancels the request in
    /// the engine if it is still running (a matched stop string).
    fn end(
        &mut self,
        text: String,
        outcome: Result<&'static str, ApiError>,
        usage: UsageOut,
    ) -> Step {
        self.events = None;
        self.finished = true;
        Step {
            text,
            finish: Some(Finish { outcome, usage }),
            logprobs: std::mem::take(&mut self.logprobs),
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.finished {
            // The client went away before the end: the event stream drops
            // with us, and the engine cancels the request.
            metrics::counter!("mlx_batch_server_client_disconnects_total").increment(1);
            tracing::info!(
                request_id = %self.request_name,
                "client disconnected; request cancelled"
            );
        }
    }
}
