//! Percentiles over latency samples.

use serde::{Deserialize, Serialize};

/// The percentile `p` (0..=100) of already sorted `sorted` samples, by
/// linear interpolation between the two closest ranks (numpy's default), so
/// small samples still give a value between real observations.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

/// A latency distribution summarised in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// How many samples there were.
    pub count: usize,
    /// Their mean.
    pub mean: f64,
    /// The median.
    pub p50: f64,
    /// The 90th percentile.
    pub p90: f64,
    /// The 99th percentile.
    pub p99: f64,
    /// The largest sample.
    pub max: f64,
}

impl Percentiles {
    /// Summarises `samples` (any order); `None` when there are none. NaN
    /// samples are dropped, since they can only come from a clock bug and
    /// would poison the sort.
    pub fn from_samples(samples: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut v: Vec<f64> = samples.into_iter().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        Some(Self {
            count: v.len(),
            mean,
            p50: percentile(&v, 50.0)?,
            p90: percentile(&v, 90.0)?,
            p99: percentile(&v, 99.0)?,
            max: *v.last()?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        // Rank for p50 is 49.5: halfway between 50 and 51.
        assert_eq!(percentile(&v, 50.0), Some(50.5));
        assert!((percentile(&v, 90.0).unwrap() - 90.1).abs() < 1e-9);
        assert!((percentile(&v, 99.0).unwrap() - 99.01).abs() < 1e-9);
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&v, 101.0), None);
        assert_eq!(percentile(&[1.0, 3.0], 50.0), Some(2.0));
    }

    #[test]
    fn summary_of_unsorted_samples() {
        let p = Percentiles::from_samples([5.0, 1.0, 4.0, 2.0, 3.0, f64::NAN]).unwrap();
        assert_eq!(p.count, 5);
        assert_eq!(p.mean, 3.0);
        assert_eq!(p.p50, 3.0);
        assert_eq!(p.max, 5.0);
        assert!((p.p90 - 4.6).abs() < 1e-9);
        assert!(Percentiles::from_samples([]).is_none());
    }

    proptest! {
        #[test]
        fn percentiles_are_ordered_and_bounded(v in prop::collection::vec(0.0f64..1e6, 1..200)) {
            let p = Percentiles::from_samples(v.iter().copied()).unwrap();
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            prop_assert!(min <= p.p50 && p.p50 <= p.p90 && p.p90 <= p.p99 && p.p99 <= p.max);
            prop_assert!(min <= p.mean && p.mean <= p.max);
            prop_assert_eq!(p.count, v.len());
        }
    }
}
