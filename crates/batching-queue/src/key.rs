//! The fixed sort key that makes aging cheap.

use std::{cmp::Ordering, time::Instant};

use batching_types::Priority;

/// Where an item stands in service order; smaller is served first.
///
/// `order` is `base_priority + aging_rate * seconds_since_origin(enqueued_at)`
/// (see the crate documentation for why this never needs recomputing).
/// Equal `order`s fall back to the earlier `enqueued_at` and then to the
/// earlier put, which is the FIFO rule among equals.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServiceKey {
    order: f64,
    enqueued_at: Instant,
    seq: u64,
}

impl ServiceKey {
    /// The key of an item with `base` priority that entered a queue at
    /// `enqueued_at`, as the `seq`-th put of a queue whose time starts at
    /// `origin`.
    pub(crate) fn new(
        base: Priority,
        enqueued_at: Instant,
        origin: Instant,
        aging_rate: f64,
        seq: u64,
    ) -> Self {
        Self {
            order: f64::from(base.value()) + aging_rate * signed_secs_since(origin, enqueued_at),
            enqueued_at,
            seq,
        }
    }
}

/// Seconds from `origin` to `at`, negative when `at` is earlier. A request
/// put back after preemption may have entered a queue before this one
/// existed, so the offset must be allowed to go below zero.
pub(crate) fn signed_secs_since(origin: Instant, at: Instant) -> f64 {
    match at.checked_duration_since(origin) {
        Some(after) => after.as_secs_f64(),
        None => -origin.duration_since(at).as_secs_f64(),
    }
}

impl Ord for ServiceKey {
    fn cmp(&self, other: &Self) -> Ordering {
        // `total_cmp` gives a total order even for values a NaN check in
        // the config already rules out, so the map's invariants never
        // depend on that check.
        self.order
            .total_cmp(&other.order)
            .then_with(|| self.enqueued_at.cmp(&other.enqueued_at))
            .then_with(|| self.seq.cmp(&other.seq))
    }
}

impl PartialOrd for ServiceKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for ServiceKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for ServiceKey {}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn offsets_are_signed() {
        let origin = Instant::now() + Duration::from_secs(100);
        assert_eq!(
            signed_secs_since(origin, origin + Duration::from_millis(1500)),
            1.5
        );
        assert_eq!(
            signed_secs_since(origin, origin - Duration::from_millis(2500)),
            -2.5
        );
        assert_eq!(signed_secs_since(origin, origin), 0.0);
    }

    #[test]
    fn key_orders_by_value_then_arrival_then_seq() {
        let t0 = Instant::now();
        let t20 = t0 + Duration::from_secs(20);
        let low_at_0 = ServiceKey::new(Priority::Low, t0, t0, 0.1, 5);
        let high_at_20 = ServiceKey::new(Priority::High, t20, t0, 0.1, 1);
        // Both keys are exactly 2.0; the earlier arrival wins despite its
        // larger sequence number.
        assert_eq!(low_at_0.order, high_at_20.order);
        assert!(low_at_0 < high_at_20);
        let same_a = ServiceKey::new(Priority::Normal, t0, t0, 0.1, 1);
        let same_b = ServiceKey::new(Priority::Normal, t0, t0, 0.1, 2);
        assert!(same_a < same_b);
        assert_eq!(same_a, same_a);
    }
}
