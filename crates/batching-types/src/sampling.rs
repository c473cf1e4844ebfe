//! Per-request sampling parameters.

use crate::{SharedConstraint, SharedStopCondition, TypesError};

/// How the next token is chosen from the model's logits.
///
/// The defaults are greedy decoding (`temperature` 0) with nothing else
/// applied. A `seed` makes a request reproducible even while it shares a
/// batch with others: backends derive the random draw for each token from
/// the seed and the token's position only, never from a shared generator.
///
/// The order a backend applies them in: the constraint's mask, logit bias,
/// the repetition penalty (over prompt and generated tokens), presence and
/// frequency penalties (over generated tokens), temperature; log
/// probabilities are read there; then top-k, top-p and min-p truncate, and
/// the token is drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy; larger values flatten the distribution.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability
    /// reaches `top_p`. 1.0 disables it.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; `None` disables it.
    pub top_k: Option<u32>,
    /// Seed for reproducible sampling; `None` draws from entropy.
    pub seed: Option<u64>,
    /// Generation ends, with reason `stop`, when one of these is produced.
    pub stop_token_ids: Vec<u32>,
    /// Keep only tokens whose probability is at least `min_p` times the
    /// most likely one's; 0 disables it.
    pub min_p: f32,
    /// Subtracted from the logit of every token generated at least once
    /// (OpenAI's `presence_penalty`, -2 to 2).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated
    /// (OpenAI's `frequency_penalty`, -2 to 2).
    pub frequency_penalty: f32,
    /// Divides positive and multiplies negative logits of every token in the
    /// prompt or the output (the CTRL / Hugging Face rule); 1 disables it.
    pub repetition_penalty: f32,
    /// Added to the logits of these tokens (OpenAI's `logit_bias`, -100 to
    /// 100; -100 in effect bans a token).
    pub logit_bias: Vec<(u32, f32)>,
    /// Report each sampled token's log probability and this many of the
    /// most likely alternatives (0 to [`SamplingParams::MAX_TOP_LOGPROBS`]);
    /// `None` reports none.
    pub logprobs: Option<usize>,
    /// A grammar the output must follow (structured output, tool calls).
    pub constraint: Option<SharedConstraint>,
    /// Ends the request, as a stop, when it says so (stop strings).
    pub stop_condition: Option<SharedStopCondition>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            seed: None,
            stop_token_ids: Vec::new(),
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            logprobs: None,
            constraint: None,
            stop_condition: None,
        }
    }
}

impl SamplingParams {
    /// The largest temperature accepted; OpenAI's API allows up to 2.
    pub const MAX_TEMPERATURE: f32 = 2.0;
    /// The most alternatives `logprobs` may ask for, as in OpenAI's API.
    pub const MAX_TOP_LOGPROBS: usize = 20;

    /// True when the next token is simply the most likely one.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
    }

    /// True when the logits are used as the model gives them: no
    /// constraint, bias or penalty changes them.
    pub fn is_plain(&self) -> bool {
        self.constraint.is_none()
            && self.logit_bias.is_empty()
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.repetition_penalty == 1.0
    }

    /// Checks every field's range and names the first offending parameter.
    pub fn validate(&self) -> Result<(), TypesError> {
        if !self.temperature.is_finite()
            || !(0.0..=Self::MAX_TEMPERATURE).contains(&self.temperature)
        {
            return Err(TypesError::InvalidSampling {
                param: "temperature",
                reason: format!(
                    "{} is not between 0 and {}",
                    self.temperature,
                    Self::MAX_TEMPERATURE
                ),
            });
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(TypesError::InvalidSampling {
                param: "top_p",
                reason: format!("{} is not in (0, 1]", self.top_p),
            });
        }
        if self.top_k == Some(0) {
            return Err(TypesError::InvalidSampling {
                param: "top_k",
                reason: "0 is not allowed; omit top_k to disable it".to_owned(),
            });
        }
        if !self.min_p.is_finite() || !(0.0..=1.0).contains(&self.min_p) {
            return Err(TypesError::InvalidSampling {
                param: "min_p",
                reason: format!("{} is not between 0 and 1", self.min_p),
            });
        }
        for (param, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !value.is_finite() || !(-2.0..=2.0).contains(&value) {
                return Err(TypesError::InvalidSampling {
                    param,
                    reason: format!("{value} is not between -2 and 2"),
                });
            }
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(TypesError::InvalidSampling {
                param: "repetition_penalty",
                reason: format!("{} is not greater than 0", self.repetition_penalty),
            });
        }
        if let Some(&(token, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !b.is_finite() || !(-100.0..=100.0).contains(b))
        {
            return Err(TypesError::InvalidSampling {
                param: "logit_bias",
                reason: format!("the bias {bias} of token {token} is not between -100 and 100"),
            });
        }
        if let Some(n) = self.logprobs.filter(|&n| n > Self::MAX_TOP_LOGPROBS) {
            return Err(TypesError::InvalidSampling {
                param: "top_logprobs",
                reason: format!("{n} is more than {}", Self::MAX_TOP_LOGPROBS),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::SamplingParams;

    #[test]
    fn defaults_are_greedy_and_valid() {
        let p = SamplingParams::default();
        assert!(p.is_greedy());
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn out_of_range_values_name_their_parameter() {
        let cases = [
            (
                SamplingParams {
                    temperature: -0.1,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_k: Some(0),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SamplingParams {
                    min_p: 1.5,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    logit_bias: vec![(5, 150.0)],
                    ..Default::default()
                },
                "logit_bias",
            ),
            (
                SamplingParams {
                    logprobs: Some(21),
                    ..Default::default()
                },
                "top_logprobs",
            ),
        ];
        for (params, name) in cases {
            let err = params.validate().unwrap_err().to_string();
            assert!(err.contains(name), "{err} should name {name}");
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        };
        assert!(p.is_greedy());
    }
}
