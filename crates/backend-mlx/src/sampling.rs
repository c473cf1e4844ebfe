//! Picking the next token from one row of logits, on the host.
//!
//! Sampling runs in Rust on the logits that the step's single evaluation
//! produced, not as MLX operations: it adds no operation or host sync to the
//! step, and it makes reproducibility easy to guarantee. The random draw of
//! a seeded request depends only on `(seed, position)`, hashed by
//! SplitMix64, never on a shared generator or on the batch, so a sequence
//! decoded alone, beside others, or recomputed after a preemption draws the
//! same tokens.
//!
//! A row whose request asks for nothing but temperature, top-k, top-p and
//! min-p is read as it is. Otherwise [`sample_row`] copies it and applies,
//! in order, logit bias, the repetition penalty, presence and frequency
//! penalties, temperature (where log probabilities are read: the model's
//! distribution before any truncation), the grammar's mask, and then draws
//! as above.

use std::collections::{HashMap, HashSet};

use batching_types::{mask_allows, SamplingParams, TokenLogprobs};

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
    if params.min_p > 0.0 {
        // Probabilities here are relative to the most likely token's (1).
        let floor = f64::from(params.min_p);
        candidates.retain(|c| c.1 >= floor);
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

/// What a sequence has seen, for penalties: how often each token was
/// generated, and every token of its prompt and output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    counts: HashMap<u32, u32>,
    seen: HashSet<u32>,
}

impl History {
    /// The history of a sequence whose context is `context`, of which the
    /// last `generated` tokens are its own output.
    pub fn new(context: &[u32], generated: usize) -> Self {
        let mut h = Self::default();
        let split = context.len().saturating_sub(generated);
        h.seen.extend(context[..split].iter().copied());
        for &t in &context[split..] {
            h.push(t);
        }
        h
    }

    /// Records a generated token.
    pub fn push(&mut self, token: u32) {
        *self.counts.entry(token).or_insert(0) += 1;
        self.seen.insert(token);
    }
}

/// A drawn token and, when asked for, its log probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The token.
    pub token: u32,
    /// Its log probability and the top alternatives.
    pub logprobs: Option<TokenLogprobs>,
}

/// Draws the token at `position` from `logits` under `params`, with the
/// penalties of `history` and the grammar's `mask` (a bit set over the
/// vocabulary; `None` allows everything); see the module documentation for
/// the order of the steps.
pub fn sample_row(
    logits: &[f32],
    params: &SamplingParams,
    history: &History,
    mask: Option<&[u32]>,
    seed: u64,
    position: u64,
) -> Sampled {
    if params.is_plain() && mask.is_none() && params.logprobs.is_none() {
        return Sampled {
            token: sample(logits, params, seed, position),
            logprobs: None,
        };
    }
    let mut row = logits.to_vec();
    for &(token, bias) in &params.logit_bias {
        if let Some(v) = row.get_mut(token as usize) {
            *v += bias;
        }
    }
    if params.repetition_penalty != 1.0 {
        let rp = params.repetition_penalty;
        for &t in &history.seen {
            if let Some(v) = row.get_mut(t as usize) {
                *v = if *v > 0.0 { *v / rp } else { *v * rp };
            }
        }
    }
    if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
        for (&t, &n) in &history.counts {
            if let Some(v) = row.get_mut(t as usize) {
                *v -= params.presence_penalty + params.frequency_penalty * n as f32;
            }
        }
    }
    // Read before the mask: the model's distribution, not the grammar's.
    let distribution = params
        .logprobs
        .map(|_| LogSoftmax::new(row.clone(), params));
    if let Some(mask) = mask {
        for (t, v) in row.iter_mut().enumerate() {
            if !mask_allows(mask, t as u32) {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    let token = sample(&row, params, seed, position);
    let logprobs = distribution
        .zip(params.logprobs)
        .map(|(d, top)| d.report(token, top));
    Sampled { token, logprobs }
}

/// The log-softmax of a row after temperature, read lazily.
struct LogSoftmax {
    row: Vec<f32>,
    inv_t: f64,
    /// `log(sum(exp(row * inv_t)))`.
    lse: f64,
}

impl LogSoftmax {
    fn new(row: Vec<f32>, params: &SamplingParams) -> Self {
        // Greedy decoding reports the model's own distribution.
        let t = if params.temperature > 0.0 {
            f64::from(params.temperature)
        } else {
            1.0
        };
        let inv_t = 1.0 / t;
        let max = row
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        let max = f64::from(max) * inv_t;
        let sum: f64 = row
            .iter()
            .map(|&v| (f64::from(v) * inv_t - max).exp())
            .sum();
        Self {
            row,
            inv_t,
            lse: max + sum.ln(),
        }
    }

    fn logprob(&self, token: u32) -> f32 {
        self.row
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&v| {
                (f64::from(v) * self.inv_t - self.lse) as f32
            })
    }

    fn report(&self, token: u32, top: usize) -> TokenLogprobs {
        let mut best: Vec<u32> = (0..self.row.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| {
            self.row[*b as usize]
                .total_cmp(&self.row[*a as usize])
                .then(a.cmp(b))
        };
        let top = top.min(best.len());
        if top > 0 && top < best.len() {
            best.select_nth_unstable_by(top - 1, by_logit);
        }
        best.truncate(top);
        best.sort_unstable_by(by_logit);
        TokenLogprobs {
            logprob: self.logprob(token),
            top: best.into_iter().map(|t| (t, self.logprob(t))).collect(),
        }
    }
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

    fn with(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn logprobs_are_the_log_softmax_and_the_greedy_token_leads_the_top() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let p = with(|p| p.logprobs = Some(3));
        let s = sample_row(&logits, &p, &History::default(), None, 1, 0);
        assert_eq!(s.token, 1);
        let lp = s.logprobs.unwrap();
        let lse = logits.iter().map(|&v| f64::from(v).exp()).sum::<f64>().ln();
        assert!((f64::from(lp.logprob) - (3.0 - lse)).abs() < 1e-6);
        assert_eq!(
            lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 2, 0]
        );
        assert_eq!(lp.top[0].1, lp.logprob);
        let total: f64 = (0..4).map(|t| f64::from(lp_of(&logits, &p, t)).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    fn lp_of(logits: &[f32], p: &SamplingParams, t: u32) -> f32 {
        LogSoftmax::new(logits.to_vec(), p).logprob(t)
    }

    #[test]
    fn temperature_shapes_the_reported_distribution() {
        let logits = [0.0f32, 2.0];
        let hot = with(|p| {
            p.temperature = 2.0;
            p.logprobs = Some(0);
        });
        let lp = sample_row(&logits, &hot, &History::default(), None, 1, 0)
            .logprobs
            .unwrap();
        assert!(lp.top.is_empty());
        let expected = 1.0 - (1f64.exp() + 1.0).ln();
        let t1 = lp_of(&logits, &hot, 1);
        assert!((f64::from(t1) - expected).abs() < 1e-6, "{t1}");
    }

    #[test]
    fn a_large_negative_bias_bans_a_token_and_a_positive_one_forces_it() {
        let logits = [5.0f32, 1.0, 0.0];
        let banned = with(|p| p.logit_bias = vec![(0, -100.0)]);
        assert_eq!(
            sample_row(&logits, &banned, &History::default(), None, 1, 0).token,
            1
        );
        let forced = with(|p| p.logit_bias = vec![(2, 100.0)]);
        assert_eq!(
            sample_row(&logits, &forced, &History::default(), None, 1, 0).token,
            2
        );
    }

    #[test]
    fn penalties_count_generated_tokens_and_repetition_covers_the_prompt() {
        let logits = [3.0f32, 2.5, 0.0];
        // Token 0 was generated twice: a frequency penalty of 1 costs it 2.
        let history = History::new(&[9, 0, 0], 2);
        let freq = with(|p| p.frequency_penalty = 1.0);
        assert_eq!(sample_row(&logits, &freq, &history, None, 1, 0).token, 1);
        let presence = with(|p| p.presence_penalty = 0.6);
        assert_eq!(
            sample_row(&logits, &presence, &history, None, 1, 0).token,
            1
        );
        // The prompt alone (nothing generated) is not penalised by presence.
        let prompt_only = History::new(&[0], 0);
        assert_eq!(
            sample_row(&logits, &presence, &prompt_only, None, 1, 0).token,
            0
        );
        // Repetition covers the prompt: 3 / 2 < 2.5.
        let rep = with(|p| p.repetition_penalty = 2.0);
        assert_eq!(sample_row(&logits, &rep, &prompt_only, None, 1, 0).token, 1);
    }

    #[test]
    fn the_mask_leaves_only_allowed_tokens_and_logprobs_stay_unmasked() {
        let logits = [5.0f32, 1.0, 0.0, 4.0];
        let mask = [0b0100u32];
        let p = with(|p| p.logprobs = Some(1));
        let s = sample_row(&logits, &p, &History::default(), Some(&mask), 1, 0);
        assert_eq!(s.token, 2);
        let lp = s.logprobs.unwrap();
        assert_eq!(lp.top[0].0, 0, "the model's own favourite is reported");
        assert!(lp.logprob < lp.top[0].1);
        // Sampled draws stay inside the mask too.
        let hot = with(|p| p.temperature = 1.0);
        for pos in 0..200 {
            let t = sample_row(&logits, &hot, &History::default(), Some(&[0b0110]), 3, pos).token;
            assert!(t == 1 || t == 2, "{t}");
        }
    }

    #[test]
    fn min_p_drops_tokens_far_below_the_best() {
        // Probabilities relative to the best: 1, e^-1 (0.37), e^-5.
        let logits = [0.0f32, -1.0, -5.0];
        let p = with(|p| {
            p.temperature = 1.0;
            p.min_p = 0.3;
        });
        for pos in 0..300 {
            assert_ne!(sample(&logits, &p, 5, pos), 2);
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
