//! The one error type of this crate.

/// Why the queue refused something.
///
/// A refused put never loses the request: [`QueueError::Full`] and
/// [`QueueError::DuplicateId`] hand the item back, so the caller can answer
/// its client (for example with HTTP 503) or retry later.
#[derive(Debug, thiserror::Error)]
pub enum QueueError<T> {
    /// The queue holds as many items as its capacity allows.
    #[error("the waiting queue is full; the request was handed back")]
    Full(T),
    /// An item with the same request id is already queued.
    #[error("a request with the same id is already queued; the request was handed back")]
    DuplicateId(T),
    /// The configuration cannot work, for example a negative aging rate.
    #[error("invalid queue configuration: {0}")]
    InvalidConfig(String),
}

impl<T> QueueError<T> {
    /// The item that was handed back, if this error carries one.
    pub fn into_inner(self) -> Option<T> {
        match self {
            Self::Full(item) | Self::DuplicateId(item) => Some(item),
            Self::InvalidConfig(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::QueueError;

    /// A type with neither `Display` nor `Debug`, to prove the messages do
    /// not need them.
    struct Opaque(u32);

    #[test]
    fn errors_hand_the_item_back() {
        assert_eq!(QueueError::Full(Opaque(3)).into_inner().unwrap().0, 3);
        assert_eq!(
            QueueError::DuplicateId(Opaque(4)).into_inner().unwrap().0,
            4
        );
        assert!(QueueError::<Opaque>::InvalidConfig("x".into())
            .into_inner()
            .is_none());
    }

    #[test]
    fn messages_do_not_need_the_item_to_be_printable() {
        assert_eq!(
            QueueError::Full(Opaque(0)).to_string(),
            "the waiting queue is full; the request was handed back"
        );
        assert_eq!(
            QueueError::DuplicateId(Opaque(0)).to_string(),
            "a request with the same id is already queued; the request was handed back"
        );
        assert_eq!(
            QueueError::<Opaque>::InvalidConfig("capacity must be at least 1".into()).to_string(),
            "invalid queue configuration: capacity must be at least 1"
        );
    }
}
