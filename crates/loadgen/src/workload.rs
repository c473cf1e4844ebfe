//! The requests a run sends, drawn once from a seed.

use batching_types::Priority;
use rand::{rngs::StdRng, SeedableRng};

use crate::{prompt::build_prompt, LengthSpec, PriorityMix};

/// How a run's requests are drawn.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Prompt length in tokens.
    pub prompt_tokens: LengthSpec,
    /// `max_tokens` per request.
    pub max_tokens: LengthSpec,
    /// Priorities to send; `None` sends no `priority` field.
    pub priority_mix: Option<PriorityMix>,
    /// The seed for lengths, priorities and prompt text.
    pub seed: u64,
}

/// One request to send.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    /// Its position in the workload.
    pub index: usize,
    /// The prompt text.
    pub prompt: String,
    /// The prompt length it aims for, in tokens.
    pub prompt_tokens: u32,
    /// The `max_tokens` to send.
    pub max_tokens: u32,
    /// The priority to send, if any.
    pub priority: Option<Priority>,
    /// Whether it is a HIGH-priority probe.
    pub probe: bool,
    /// A whole chat history to send instead of `prompt` as one user
    /// message (multi-turn conversations); the answer's text is then kept
    /// in the record.
    pub messages: Option<Vec<(String, String)>>,
}

impl WorkloadConfig {
    /// Draws `n` requests. The same config always gives the same requests, so
    /// every concurrency level and every server sees the same work.
    pub fn generate(&self, n: usize) -> Vec<RequestSpec> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        (0..n)
            .map(|index| {
                let prompt_tokens = self.prompt_tokens.sample(&mut rng);
                let max_tokens = self.max_tokens.sample(&mut rng);
                let priority = self.priority_mix.as_ref().map(|m| m.sample(&mut rng));
                RequestSpec {
                    index,
                    prompt: build_prompt(
                        prompt_tokens,
                        self.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    ),
                    prompt_tokens,
                    max_tokens,
                    priority,
                    probe: false,
                    messages: None,
                }
            })
            .collect()
    }

    /// Draws `n` HIGH-priority probes, numbered after `first_index`, with
    /// prompts unlike any in the load.
    pub fn probes(&self, n: usize, first_index: usize) -> Vec<RequestSpec> {
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_add(0x5EED));
        (0..n)
            .map(|i| {
                let prompt_tokens = self.prompt_tokens.sample(&mut rng);
                let max_tokens = self.max_tokens.sample(&mut rng);
                RequestSpec {
                    index: first_index + i,
                    prompt: build_prompt(prompt_tokens, !(self.seed.wrapping_add(i as u64))),
                    prompt_tokens,
                    max_tokens,
                    priority: Some(Priority::High),
                    probe: true,
                    messages: None,
                }
            })
            .collect()
    }
}
