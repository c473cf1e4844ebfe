//! The scheduler's configuration and its validation.

use std::time::Duration;

use crate::SchedulerError;

/// What to do with a request whose prompt plus `max_tokens` is longer than
/// the model's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContextOverflow {
    /// Refuse it at submit with [`SchedulerError::ContextTooLong`].
    #[default]
    Refuse,
    /// Accept it and end generation with
    /// [`batching_types::FinishReason::ContextLength`] when the sequence
    /// reaches the context length. The prompt alone must still fit.
    Truncate,
}

/// How the scheduler forms batches; every field has a default.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// The most sequences in one step (decodes and prefill chunks together),
    /// and the most requests holding KV blocks at once.
    pub max_batch_size: usize,
    /// The most tokens fed through the model in one step; a longer prompt is
    /// prefilled in chunks across steps. Must be at least `max_batch_size`
    /// so that every running sequence can always decode.
    pub max_batch_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// The most submitted requests waiting for their first admission;
    /// `None` means unbounded. A submit past it fails at once.
    pub max_queue: Option<usize>,
    /// Priority levels a waiting request gains per second of waiting.
    pub aging_rate: f64,
    /// How long running requests may continue after shutdown begins
    /// before they are cancelled.
    pub shutdown_grace: Duration,
    /// How many failed whole steps a request survives (it is re-queued and
    /// recomputed each time) before it ends with an error.
    pub max_step_retries: u32,
    /// Refuse or truncate requests longer than the model's context.
    pub context_overflow: ContextOverflow,
    /// Whether a waiting request that outranks a running one may take its
    /// place in a full batch (pausing it), and may drop the caches of less
    /// urgent requests to get KV blocks. Off, a waiting request only enters
    /// when a slot and blocks free up by themselves.
    pub preemption: bool,
    /// How many times a request may be taken out of the batch for urgency
    /// before it becomes unpreemptible, so that no request is pushed back
    /// without end.
    pub max_preemptions: u32,
    /// The most prompt tokens one request feeds in a step, so that a long
    /// prompt leaves budget for others to be admitted beside it (vLLM's
    /// `long_prefill_token_threshold`). Values above `max_batch_tokens`
    /// act as `max_batch_tokens`.
    pub max_prefill_chunk: usize,
    /// Keep full KV blocks of prompts and answers after their requests end
    /// and share them with later requests that start with the same tokens
    /// (see [`crate::BlockAllocator`]).
    pub prefix_cache: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_batch_tokens: 512,
            block_size: 16,
            max_queue: Some(1024),
            aging_rate: 0.1,
            shutdown_grace: Duration::from_secs(30),
            max_step_retries: 1,
            context_overflow: ContextOverflow::Refuse,
            preemption: true,
            max_preemptions: 2,
            max_prefill_chunk: 128,
            prefix_cache: true,
        }
    }
}

impl SchedulerConfig {
    /// Checks every field and names the first offending one.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let invalid = |msg: String| Err(SchedulerError::InvalidConfig(msg));
        if self.max_batch_size == 0 {
            return invalid("max_batch_size must be at least 1".into());
        }
        if self.max_batch_tokens < self.max_batch_size {
            return invalid(format!(
                "max_batch_tokens ({}) must be at least max_batch_size ({}) so every running sequence can decode",
                self.max_batch_tokens, self.max_batch_size
            ));
        }
        if self.block_size == 0 {
            return invalid("block_size must be at least 1".into());
        }
        if self.max_queue == Some(0) {
            return invalid("max_queue must be at least 1 (or None for unbounded)".into());
        }
        if self.max_prefill_chunk == 0 {
            return invalid("max_prefill_chunk must be at least 1".into());
        }
        if !self.aging_rate.is_finite() || self.aging_rate < 0.0 {
            return invalid(format!(
                "aging_rate must be a finite number >= 0, got {}",
                self.aging_rate
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_fields_are_named() {
        assert!(SchedulerConfig::default().validate().is_ok());
        let cases = [
            (
                SchedulerConfig {
                    max_batch_size: 0,
                    ..Default::default()
                },
                "max_batch_size",
            ),
            (
                SchedulerConfig {
                    max_batch_tokens: 8,
                    ..Default::default()
                },
                "max_batch_tokens",
            ),
            (
                SchedulerConfig {
                    block_size: 0,
                    ..Default::default()
                },
                "block_size",
            ),
            (
                SchedulerConfig {
                    max_queue: Some(0),
                    ..Default::default()
                },
                "max_queue",
            ),
            (
                SchedulerConfig {
                    max_prefill_chunk: 0,
                    ..Default::default()
                },
                "max_prefill_chunk",
            ),
            (
                SchedulerConfig {
                    aging_rate: f64::NAN,
                    ..Default::default()
                },
                "aging_rate",
            ),
        ];
        for (config, field) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
    }
}
