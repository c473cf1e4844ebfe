//! The cost model and behaviour switches of the simulated backend.

use std::time::Duration;

use batching_types::ManualClock;

use crate::SimError;

/// What the backend does with the cost of a step.
#[derive(Debug, Clone, Default)]
pub enum TimeMode {
    /// Only account the cost (see [`crate::SimStats::virtual_time`]); never
    /// sleep. The default, so unit tests are fast.
    #[default]
    Virtual,
    /// Really sleep for the cost, for server tests and wall-clock benches.
    Sleep,
    /// Advance this clock by the cost, so a scheduler driven by the same
    /// clock sees deterministic virtual time.
    Advance(ManualClock),
}

/// When the backend emits a stop token instead of a content token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopRule {
    /// The token emitted to stop, for example an end-of-sequence id.
    pub token: u32,
    /// About one in `one_in` sampled tokens is the stop token, decided by
    /// the context hash, so it is as deterministic as every other token.
    pub one_in: u32,
}

/// Configuration of [`crate::SimBackend`]; every field has a default.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Fixed cost of every non-empty step (kernel launches, sampling).
    pub step_cost: Duration,
    /// Cost of each prompt token fed in a prefill chunk.
    pub prefill_token_cost: Duration,
    /// Cost of each decoded token.
    pub decode_token_cost: Duration,
    /// KV cache slots summed over all sequences.
    pub kv_tokens: usize,
    /// The longest sequence the simulated model supports.
    pub max_context: usize,
    /// Tokens are drawn from `0..vocab`.
    pub vocab: u32,
    /// Optional stop token emission.
    pub stop: Option<StopRule>,
    /// Sleep, advance a clock, or only account the cost.
    pub time: TimeMode,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            step_cost: Duration::from_millis(10),
            prefill_token_cost: Duration::from_micros(50),
            decode_token_cost: Duration::from_micros(200),
            kv_tokens: 16 * 1024,
            max_context: 8192,
            vocab: 49_152,
            stop: None,
            time: TimeMode::Virtual,
        }
    }
}

impl SimConfig {
    /// A backend whose steps cost nothing, for measuring scheduler overhead.
    pub fn free() -> Self {
        Self {
            step_cost: Duration::ZERO,
            prefill_token_cost: Duration::ZERO,
            decode_token_cost: Duration::ZERO,
            ..Self::default()
        }
    }

    /// Checks that the numbers describe a usable backend.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.vocab == 0 {
            return Err(SimError::InvalidConfig("vocab must be at least 1"));
        }
        if self.kv_tokens == 0 || self.max_context == 0 {
            return Err(SimError::InvalidConfig(
                "kv_tokens and max_context must be at least 1",
            ));
        }
        if self.stop.is_some_and(|s| s.one_in == 0) {
            return Err(SimError::InvalidConfig("stop.one_in must be at least 1"));
        }
        Ok(())
    }

    /// The simulated cost of a step that feeds `prefill` prompt tokens and
    /// `decode` decode tokens; an empty step costs nothing.
    pub fn step_cost_for(&self, prefill: usize, decode: usize) -> Duration {
        if prefill == 0 && decode == 0 {
            return Duration::ZERO;
        }
        let prefill = u32::try_from(prefill).unwrap_or(u32::MAX);
        let decode = u32::try_from(decode).unwrap_or(u32::MAX);
        self.step_cost + self.prefill_token_cost * prefill + self.decode_token_cost * decode
    }
}
