//! A small item type shared by the integration tests.

#![allow(dead_code)]

use std::time::Instant;

use batching_queue::QueueItem;
use batching_types::{Priority, RequestId};

/// The least an item needs to be queued.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: u64,
    pub priority: Priority,
    pub enqueued_at: Option<Instant>,
}

impl Item {
    pub fn new(id: u64, priority: Priority) -> Self {
        Self {
            id,
            priority,
            enqueued_at: None,
        }
    }
}

impl QueueItem for Item {
    fn id(&self) -> RequestId {
        RequestId::from(self.id)
    }

    fn base_priority(&self) -> Priority {
        self.priority
    }

    fn enqueued_at(&self) -> Option<Instant> {
        self.enqueued_at
    }

    fn set_enqueued_at(&mut self, at: Instant) {
        self.enqueued_at = Some(at);
    }
}
