//! The Poisson arrival schedule: deterministic, with the right statistics.

use loadgen::poisson_schedule;

#[test]
fn same_seed_same_schedule() {
    assert_eq!(poisson_schedule(3.0, 500, 9), poisson_schedule(3.0, 500, 9));
    assert_ne!(
        poisson_schedule(3.0, 500, 9),
        poisson_schedule(3.0, 500, 10)
    );
}

#[test]
fn gaps_are_exponential_with_mean_one_over_rate() {
    let rate = 4.0;
    let n = 100_000;
    let times: Vec<f64> = poisson_schedule(rate, n, 1)
        .iter()
        .map(|d| d.as_secs_f64())
        .collect();
    let mut prev = 0.0;
    let gaps: Vec<f64> = times
        .iter()
        .map(|t| {
            let g = t - prev;
            prev = *t;
            g
        })
        .collect();
    let mean = gaps.iter().sum::<f64>() / n as f64;
    let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64;
    // The standard error of the mean is 1/(rate*sqrt(n)) ~ 0.3% here: 2% is
    // far outside chance, and an exponential has its sd equal to its mean.
    assert!((mean - 1.0 / rate).abs() < 0.02 / rate, "mean gap {mean}");
    assert!(
        (var.sqrt() - mean).abs() < 0.05 * mean,
        "sd {} mean {mean}",
        var.sqrt()
    );
    // About e^-1 of the gaps exceed the mean.
    let above = gaps.iter().filter(|g| **g > 1.0 / rate).count() as f64 / n as f64;
    assert!(
        (above - (-1.0f64).exp()).abs() < 0.01,
        "share above mean {above}"
    );
    // The whole run takes about n / rate seconds.
    let total = times[n - 1];
    assert!((total - n as f64 / rate).abs() < 0.02 * n as f64 / rate);
}
