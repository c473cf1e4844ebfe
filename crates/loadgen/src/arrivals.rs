//! Open-loop arrival times: a seeded Poisson process.

use std::time::Duration;

use rand::{rngs::StdRng, Rng, SeedableRng};

/// The start offsets of `n` requests arriving as a Poisson process of `rate`
/// requests per second, from `seed`.
///
/// Gaps are exponential with mean `1 / rate`, drawn by inversion
/// (`-ln(1 - u) / rate`), so the schedule depends only on the seed and is the
/// same on every machine. The first request starts at its first gap, not at
/// zero, as in a real Poisson stream.
pub fn poisson_schedule(rate: f64, n: usize, seed: u64) -> Vec<Duration> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = 0.0_f64;
    (0..n)
        .map(|_| {
            let u: f64 = rng.random();
            t += -(1.0 - u).ln() / rate;
            Duration::from_secs_f64(t)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_monotonic() {
        let s = poisson_schedule(5.0, 1000, 1);
        assert!(s.windows(2).all(|w| w[0] <= w[1]));
    }
}
