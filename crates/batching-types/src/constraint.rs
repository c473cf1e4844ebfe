//! Constrained decoding: a grammar that says, token by token, which tokens
//! a sequence may produce next.
//!
//! The backend asks a sequence's constraint for its mask before it samples
//! and tells it the sampled token after. The constraint belongs to the
//! request, not to the backend: it is shared ([`SharedConstraint`]), so a
//! sequence that is preempted and recomputed keeps the grammar state of the
//! tokens it has already produced. This crate only defines the contract;
//! the server builds constraints from JSON schemas and tool definitions.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Why a constraint cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("constraint: {0}")]
pub struct ConstraintError(pub String);

/// A grammar over token ids, advanced one sampled token at a time.
pub trait TokenConstraint: Send {
    /// Writes the tokens allowed next as a bit set over the vocabulary:
    /// bit `t % 32` of `mask[t / 32]` allows token `t`. `mask` holds
    /// `vocab.div_ceil(32)` words and arrives zeroed. Once the grammar is
    /// complete, only end-of-sequence tokens are allowed.
    fn fill_mask(&mut self, mask: &mut [u32]) -> Result<(), ConstraintError>;

    /// Advances past `token`, which the last mask allowed.
    fn consume(&mut self, token: u32) -> Result<(), ConstraintError>;

    /// True once nothing more may follow: the sequence should stop.
    fn is_finished(&self) -> bool;
}

/// A constraint shared by a request and the backend that samples for it;
/// clones share one grammar state.
pub type SharedConstraint = Shared<dyn TokenConstraint>;

impl Shared<dyn TokenConstraint> {
    /// Shares `constraint`.
    pub fn new(constraint: impl TokenConstraint + 'static) -> Self {
        Self(Arc::new(Mutex::new(constraint)))
    }
}

/// Decides, token by token, whether a request is done: the server's stop
/// strings, matched on the text as the engine delivers each token, so a
/// match ends the request at once, as a stop, before another step runs.
pub trait StopCondition: Send {
    /// Takes the next delivered token; true when the request must stop.
    fn on_token(&mut self, token: u32) -> bool;
}

/// A stop condition handed to the engine with a request.
pub type SharedStopCondition = Shared<dyn StopCondition>;

impl Shared<dyn StopCondition> {
    /// Shares `condition`.
    pub fn new(condition: impl StopCondition + 'static) -> Self {
        Self(Arc::new(Mutex::new(condition)))
    }
}

/// State shared by a request and the engine parts that advance it (its
/// grammar, its stop condition); clones share one state.
pub struct Shared<T: ?Sized>(Arc<Mutex<T>>);

impl<T: ?Sized> Shared<T> {
    /// Exclusive access to the state. Every method of the shared traits
    /// either advances the state or fails, so a lock poisoned by a panic
    /// elsewhere holds no half-made change and is used as it is.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T: ?Sized> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T: ?Sized> std::fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared(..)")
    }
}

/// Two handles are equal when they share one state.
impl<T: ?Sized> PartialEq for Shared<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Whether bit `token` of `mask` is set.
pub fn mask_allows(mask: &[u32], token: u32) -> bool {
    mask.get((token / 32) as usize)
        .is_some_and(|w| w >> (token % 32) & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_bits_map_to_tokens() {
        let mask = [0b101u32, 1 << 31];
        assert!(mask_allows(&mask, 0));
        assert!(!mask_allows(&mask, 1));
        assert!(mask_allows(&mask, 2));
        assert!(mask_allows(&mask, 63));
        assert!(!mask_allows(&mask, 62));
        assert!(!mask_allows(&mask, 64), "past the mask is not allowed");
    }
}
