//! How a queue is configured.

/// The aging rate the original plan chose: a waiting request gains one
/// priority level every ten seconds.
pub const DEFAULT_AGING_RATE: f64 = 0.1;

/// Settings of a [`PriorityQueueWithAging`](crate::PriorityQueueWithAging).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueConfig {
    /// Priority levels gained per second of waiting; finite and not negative.
    /// Zero turns aging off (plain priority order, FIFO within a level).
    pub aging_rate: f64,
    /// The most items the queue holds; `None` means unbounded. Must not be
    /// zero, since such a queue could never accept anything.
    pub capacity: Option<usize>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            aging_rate: DEFAULT_AGING_RATE,
            capacity: None,
        }
    }
}

impl QueueConfig {
    /// Explains why this configuration cannot work, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if !self.aging_rate.is_finite() || self.aging_rate < 0.0 {
            return Some(format!(
                "aging rate must be a finite number >= 0, got {}",
                self.aging_rate
            ));
        }
        if self.capacity == Some(0) {
            return Some("capacity must be at least 1 (use None for unbounded)".to_owned());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_plans_rate_and_unbounded() {
        let c = QueueConfig::default();
        assert_eq!(c.aging_rate, 0.1);
        assert_eq!(c.capacity, None);
        assert_eq!(c.problem(), None);
    }

    #[test]
    fn rejects_unusable_values() {
        for rate in [-0.1, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let c = QueueConfig {
                aging_rate: rate,
                capacity: None,
            };
            assert!(c.problem().is_some(), "rate {rate} should be refused");
        }
        let zero = QueueConfig {
            capacity: Some(0),
            ..QueueConfig::default()
        };
        assert!(zero.problem().is_some());
        let ok = QueueConfig {
            aging_rate: 0.0,
            capacity: Some(1),
        };
        assert_eq!(ok.problem(), None);
    }
}
