//! Small value types parsed from the command line: lengths, sweeps and the
//! priority mix.

use std::{fmt, str::FromStr};

use batching_types::Priority;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::LoadgenError;

/// A length in tokens: fixed (`128`) or uniform over an inclusive range
/// (`32..256`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LengthSpec {
    /// The smallest length drawn.
    pub min: u32,
    /// The largest length drawn (equal to `min` for a fixed length).
    pub max: u32,
}

impl LengthSpec {
    /// A fixed length.
    pub fn fixed(n: u32) -> Self {
        Self { min: n, max: n }
    }

    /// Draws one length, uniformly over `min..=max`.
    pub fn sample(&self, rng: &mut impl Rng) -> u32 {
        if self.min == self.max {
            self.min
        } else {
            rng.random_range(self.min..=self.max)
        }
    }
}

impl fmt::Display for LengthSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..{}", self.min, self.max)
        }
    }
}

impl FromStr for LengthSpec {
    type Err = LoadgenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |t: &str| {
            t.trim()
                .parse::<u32>()
                .map_err(|e| LoadgenError::arg("length", format!("{t:?}: {e}")))
        };
        let spec = match s.split_once("..") {
            Some((a, b)) => Self {
                min: parse(a)?,
                max: parse(b.trim_start_matches('='))?,
            },
            None => Self::fixed(parse(s)?),
        };
        if spec.min == 0 || spec.min > spec.max {
            return Err(LoadgenError::arg(
                "length",
                format!("{s:?}: need 1 <= min <= max"),
            ));
        }
        Ok(spec)
    }
}

/// Parses a comma-separated list such as `1,8,32`.
pub fn parse_list<T: FromStr>(s: &str, arg: &'static str) -> Result<Vec<T>, LoadgenError>
where
    T::Err: fmt::Display,
{
    let items = s
        .split(',')
        .filter(|t| !t.trim().is_empty())
        .map(|t| {
            t.trim()
                .parse::<T>()
                .map_err(|e| LoadgenError::arg(arg, format!("{t:?}: {e}")))
        })
        .collect::<Result<Vec<T>, _>>()?;
    if items.is_empty() {
        return Err(LoadgenError::arg(arg, "empty list"));
    }
    Ok(items)
}

/// How often each priority is drawn, as normalised weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriorityMix {
    /// `(priority name, weight)` pairs, weights summing to 1.
    pub weights: Vec<(String, f64)>,
}

impl PriorityMix {
    /// Draws a priority according to the weights.
    pub fn sample(&self, rng: &mut impl Rng) -> Priority {
        let x: f64 = rng.random();
        let mut acc = 0.0;
        for (name, w) in &self.weights {
            acc += w;
            if x < acc {
                return name.parse().unwrap_or_default();
            }
        }
        // Rounding can leave `acc` a hair under 1: the last entry takes it.
        self.weights
            .last()
            .and_then(|(name, _)| name.parse().ok())
            .unwrap_or_default()
    }
}

impl FromStr for PriorityMix {
    type Err = LoadgenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut weights = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (name, w) = part.split_once('=').ok_or_else(|| {
                LoadgenError::arg("priority-mix", format!("{part:?}: want name=weight"))
            })?;
            let p: Priority = name
                .parse()
                .map_err(|e| LoadgenError::arg("priority-mix", format!("{e}")))?;
            let w: f64 = w
                .trim()
                .parse()
                .map_err(|e| LoadgenError::arg("priority-mix", format!("{w:?}: {e}")))?;
            if !(w.is_finite() && w >= 0.0) {
                return Err(LoadgenError::arg(
                    "priority-mix",
                    format!("weight {w} must be >= 0"),
                ));
            }
            weights.push((p.as_str().to_owned(), w));
        }
        let total: f64 = weights.iter().map(|(_, w)| w).sum();
        if total <= 0.0 {
            return Err(LoadgenError::arg("priority-mix", "weights sum to zero"));
        }
        for (_, w) in &mut weights {
            *w /= total;
        }
        Ok(Self { weights })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn lengths_parse_fixed_and_ranges() {
        assert_eq!("128".parse::<LengthSpec>().unwrap(), LengthSpec::fixed(128));
        let r: LengthSpec = "32..256".parse().unwrap();
        assert_eq!((r.min, r.max), (32, 256));
        let r: LengthSpec = "4..=8".parse().unwrap();
        assert_eq!((r.min, r.max), (4, 8));
        assert!("0".parse::<LengthSpec>().is_err());
        assert!("9..3".parse::<LengthSpec>().is_err());
        assert!("x".parse::<LengthSpec>().is_err());
        assert_eq!(r.to_string(), "4..8");
    }

    #[test]
    fn range_samples_stay_inside() {
        let r: LengthSpec = "5..9".parse().unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let draws: Vec<u32> = (0..1000).map(|_| r.sample(&mut rng)).collect();
        assert!(draws.iter().all(|d| (5..=9).contains(d)));
        assert!(draws.contains(&5) && draws.contains(&9));
    }

    #[test]
    fn lists_parse() {
        assert_eq!(parse_list::<usize>("1, 8,32", "c").unwrap(), vec![1, 8, 32]);
        assert!(parse_list::<usize>("", "c").is_err());
        assert!(parse_list::<usize>("1,x", "c").is_err());
    }

    #[test]
    fn priority_mix_normalises_and_samples_in_proportion() {
        let mix: PriorityMix = "high=1,normal=6,low=3".parse().unwrap();
        assert!((mix.weights[0].1 - 0.1).abs() < 1e-12);
        let mut rng = StdRng::seed_from_u64(7);
        let n = 20_000;
        let highs = (0..n)
            .filter(|_| mix.sample(&mut rng) == Priority::High)
            .count();
        let share = highs as f64 / n as f64;
        assert!((share - 0.1).abs() < 0.02, "high share {share}");
        assert!("urgent=1".parse::<PriorityMix>().is_err());
        assert!("high=0".parse::<PriorityMix>().is_err());
        assert!("high".parse::<PriorityMix>().is_err());
    }
}
