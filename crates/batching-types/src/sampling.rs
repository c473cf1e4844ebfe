//! Per-request sampling parameters.

use crate::TypesError;

/// How the next token is chosen from the model's logits.
///
/// The defaults are greedy decoding (`temperature` 0). A `seed` makes a
/// request reproducible even while it shares a batch with others: backends
/// derive the random draw for each token from the seed and the token's
/// position only, never from a shared generator.
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
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            seed: None,
            stop_token_ids: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// The largest temperature accepted; OpenAI's API allows up to 2.
    pub const MAX_TEMPERATURE: f32 = 2.0;

    /// True when the next token is simply the most likely one.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
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
