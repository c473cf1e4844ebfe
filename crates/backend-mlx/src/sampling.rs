//! Picking the next token from one row of logits, on the host.
//!
//! Sampling runs in Rust on the logits that the step's single evaluation
//! produced, not as MLX operations: it adds no operation or host sync to the
//! step, and it makes reproducibility easy to guarantee. The random draw of
//! a seeded request depends only on `(seed, position)`, hashed by
//! SplitMix64, never on a shared generator or on the batch, so a sequence
//! decoded alone, beside others, or recomputed after a preemption draws the
//! same tokens.

use batching_types::SamplingParams;

/// SplitMix64's finaliser: a fast, well-mixed 64-bit hash.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in `[0, 1)` determined by `seed` and `position` only.
pub fn uniform_at(seed: u64, position: u64) -> f64 {
    let bits = splitmix64(splitmix64(seed) ^ position);
    // The top 53 bits make an exactly representable double in [0, 1).
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// The index of the largest logit; the first one on ties, like MLX's
/// `argmax`. NaNs never win.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best as u32
}

/// Chooses a token from `logits` for the token at absolute `position` of a
/// sequence. `seed` is the request's seed (the backend draws one at
/// registration for requests that have none, so even those stay stable
/// across preemption).
pub fn sample(logits: &[f32], params: &SamplingParams, seed: u64, position: u64) -> u32 {
    if params.is_greedy() || logits.is_empty() {
        return argmax(logits);
    }
    let inv_t = 1.0 / f64::from(params.temperature);
    let max = logits
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    // Candidates as (token, unnormalised probability); exp(-745) is 0 in
    // f64, so tokens far below the maximum drop out here, which also keeps
    // the top-p sort short.
    let mut candidates: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter_map(|(i, &v)| {
            let p = ((f64::from(v) - f64::from(max)) * inv_t).exp();
            (p > 0.0).then_some((i as u32, p))
        })
        .collect();
    if candidates.is_empty() {
        return argmax(logits);
    }
    let descending = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if let Some(k) = params.top_k {
        let k = (k as usize).max(1);
        if k < candidates.len() {
            candidates.select_nth_unstable_by(k - 1, descending);
            candidates.truncate(k);
        }
    }
    if params.top_p < 1.0 {
        candidates.sort_unstable_by(descending);
        let total: f64 = candidates.iter().map(|c| c.1).sum();
        let threshold = f64::from(params.top_p) * total;
        let mut cumulative = 0.0;
        let mut keep = candidates.len();
        for (i, c) in candidates.iter().enumerate() {
            cumulative += c.1;
            if cumulative >= threshold {
                keep = i + 1;
                break;
            }
        }
        candidates.truncate(keep);
    } else {
        // A fixed order makes the draw independent of how the selection
        // above happened to permute the candidates.
        candidates.sort_unstable_by_key(|c| c.0);
    }
    let total: f64 = candidates.iter().map(|c| c.1).sum();
    let target = uniform_at(seed, position) * total;
    let mut cumulative = 0.0;
    for &(token, p) in &candidates {
        cumulative += p;
        if target < cumulative {
            return token;
        }
    }
    // Rounding can leave `target` a hair above the final sum.
    candidates.last().map_or(0, |c| c.0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn params(temperature: f32, top_p: f32, top_k: Option<u32>) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -2.0, -1.0]), 2);
        assert_eq!(sample(&[0.0, 5.0, 1.0], &params(0.0, 1.0, None), 1, 0), 1);
        assert_eq!(
            sample(&[0.0, 5.0, 9.0], &params(1.5, 1.0, Some(1)), 1, 0),
            2
        );
    }

    #[test]
    fn flat_logits_spread_draws_over_every_token() {
        let logits = [0.0f32; 4];
        let mut counts = [0usize; 4];
        for pos in 0..400 {
            counts[sample(&logits, &params(1.0, 1.0, None), 7, pos) as usize] += 1;
        }
        for c in counts {
            assert!((60..140).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn probabilities_follow_the_softmax() {
        // p = softmax([ln 1, ln 3]) = [0.25, 0.75].
        let logits = [0.0f32, 3f32.ln()];
        let ones = (0..4000)
            .filter(|&pos| sample(&logits, &params(1.0, 1.0, None), 3, pos) == 1)
            .count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        // Probabilities 0.6, 0.3, 0.1: top_p 0.8 keeps tokens 0 and 1.
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        for pos in 0..500 {
            assert_ne!(sample(&logits, &params(1.0, 0.8, None), 11, pos), 2);
        }
    }

    proptest! {
        #[test]
        fn same_seed_and_position_give_the_same_token(
            logits in prop::collection::vec(-10.0f32..10.0, 1..64),
            seed in any::<u64>(),
            pos in 0u64..10_000,
            t in 0.1f32..2.0,
            top_p in 0.05f32..=1.0,
            top_k in prop::option::of(1u32..16),
        ) {
            let p = params(t, top_p, top_k);
            prop_assert_eq!(sample(&logits, &p, seed, pos), sample(&logits, &p, seed, pos));
        }

        #[test]
        fn top_k_draws_stay_among_the_k_best(
            logits in prop::collection::vec(-10.0f32..10.0, 2..64),
            seed in any::<u64>(),
            pos in 0u64..10_000,
            k in 1u32..8,
        ) {
            let token = sample(&logits, &params(1.0, 1.0, Some(k)), seed, pos) as usize;
            let better = logits.iter().filter(|&&v| v > logits[token]).count();
            prop_assert!(better < k as usize, "token {} has {} better logits", token, better);
        }

        #[test]
        fn uniform_draws_are_in_the_unit_interval(seed in any::<u64>(), pos in any::<u64>()) {
            let u = uniform_at(seed, pos);
            prop_assert!((0.0..1.0).contains(&u));
        }
    }
}
