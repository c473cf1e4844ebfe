//! Deterministic token generation: the next token depends only on the seed
//! and the tokens before it.

use crate::StopRule;

/// A rolling hash of a sequence's context.
///
/// Feeding the same tokens in any chunking gives the same state, which is
/// what makes chunked prefill and recomputation invisible in the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextHash(u64);

impl ContextHash {
    /// The state of an empty context under `seed` (`None` counts as 0).
    pub fn new(seed: Option<u64>) -> Self {
        Self(mix(seed.unwrap_or(0) ^ 0x9E37_79B9_7F4A_7C15))
    }

    /// Appends one token.
    pub fn push(&mut self, token: u32) {
        self.0 = mix(self.0 ^ u64::from(token).wrapping_mul(0xA24B_AED4_963E_E407));
    }

    /// The token sampled after the context hashed so far.
    pub fn next_token(&self, vocab: u32, stop: Option<StopRule>) -> u32 {
        let draw = mix(self.0.wrapping_add(0xD6E8_FEB8_6659_FD93));
        if let Some(rule) = stop {
            if (draw >> 32).is_multiple_of(u64::from(rule.one_in.max(1))) {
                return rule.token;
            }
        }
        let vocab = u64::from(vocab.max(1));
        // The remainder is below `vocab`, which is a u32.
        u32::try_from(draw % vocab).unwrap_or(0)
    }
}

/// SplitMix64's finaliser: a cheap, well-mixed 64-bit permutation.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The tokens a sequence with this prompt and seed generates when it runs
/// alone, up to `max_tokens` or the first stop token (included).
pub fn expected_tokens(
    prompt: &[u32],
    seed: Option<u64>,
    max_tokens: usize,
    vocab: u32,
    stop: Option<StopRule>,
) -> Vec<u32> {
    let mut hash = ContextHash::new(seed);
    prompt.iter().for_each(|&t| hash.push(t));
    let mut out = Vec::with_capacity(max_tokens);
    while out.len() < max_tokens {
        let token = hash.next_token(vocab, stop);
        out.push(token);
        if stop.is_some_and(|s| s.token == token) {
            break;
        }
        hash.push(token);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_the_hash() {
        let mut a = ContextHash::new(Some(3));
        let mut b = ContextHash::new(Some(3));
        for t in [5, 6, 7] {
            a.push(t);
        }
        b.push(5);
        let mid = b;
        b.push(6);
        b.push(7);
        assert_eq!(a, b);
        assert_ne!(a, mid);
    }

    #[test]
    fn seeds_and_prompts_change_the_tokens() {
        let base = expected_tokens(&[1, 2, 3], Some(1), 8, 1000, None);
        assert_eq!(base.len(), 8);
        assert!(base.iter().all(|&t| t < 1000));
        assert_ne!(base, expected_tokens(&[1, 2, 3], Some(2), 8, 1000, None));
        assert_ne!(base, expected_tokens(&[1, 2, 4], Some(1), 8, 1000, None));
        assert_eq!(base, expected_tokens(&[1, 2, 3], Some(1), 8, 1000, None));
    }

    #[test]
    fn a_stop_rule_ends_the_expected_tokens_at_the_stop_token() {
        let stop = Some(StopRule {
            token: 7,
            one_in: 3,
        });
        let out = expected_tokens(&[9], None, 200, 50, stop);
        assert_eq!(out.last(), Some(&7));
        assert_eq!(out.iter().filter(|&&t| t == 7).count(), 1);
        assert!(out.len() < 200, "one in three should stop long before 200");
    }
}
