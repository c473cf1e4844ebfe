//! What the queue needs to know about the things it orders.

use std::time::Instant;

use batching_types::{BatchRequest, Priority, RequestId};

/// An item the aging queue can order.
///
/// The queue only reads an id, a base priority and the instant the item
/// first entered a queue. Keeping this a trait lets benchmarks and tests use
/// small items instead of full [`BatchRequest`]s.
pub trait QueueItem {
    /// The id used by [`remove`](crate::PriorityQueueWithAging::remove) and
    /// for duplicate detection.
    fn id(&self) -> RequestId;
    /// The priority before any aging.
    fn base_priority(&self) -> Priority;
    /// When the item first entered a waiting queue, if it ever did.
    fn enqueued_at(&self) -> Option<Instant>;
    /// Records when the item entered the queue; called by the queue only
    /// when [`QueueItem::enqueued_at`] is `None`.
    fn set_enqueued_at(&mut self, at: Instant);
}

impl QueueItem for BatchRequest {
    fn id(&self) -> RequestId {
        self.request_id
    }

    fn base_priority(&self) -> Priority {
        BatchRequest::base_priority(self)
    }

    fn enqueued_at(&self) -> Option<Instant> {
        self.enqueued_at
    }

    fn set_enqueued_at(&mut self, at: Instant) {
        self.enqueued_at = Some(at);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use batching_types::{event_channel, NewRequest};

    #[test]
    fn batch_request_exposes_its_fields() {
        let (tx, _rx) = event_channel();
        let now = Instant::now();
        let spec = NewRequest {
            request_id: 11,
            prompt_tokens: vec![1],
            max_tokens: 1,
            priority: Priority::Low,
            ..Default::default()
        };
        let mut r = BatchRequest::new(spec, tx, now).unwrap();
        assert_eq!(QueueItem::id(&r), RequestId::from(11));
        assert_eq!(QueueItem::base_priority(&r), Priority::Low);
        assert_eq!(QueueItem::enqueued_at(&r), None);
        r.set_enqueued_at(now);
        assert_eq!(r.enqueued_at, Some(now));
    }
}
