//! The request lifecycle and its checked transitions.

use std::fmt;

use crate::TypesError;

/// Where a request is in its life.
///
/// ```text
/// WAITING -> PREFILLING -> RUNNING -> COMPLETED
///    ^            |  ^        |  ^
///    |            v  |        v  |
///    +--------- PAUSED <------+--+   (preemption for urgency keeps the cache)
///    ^            |           |
///    +------------+-----------+      (preemption for memory drops it)
/// any non-terminal state -> CANCELLED
/// ```
///
/// PAUSED comes back to the state it left (PREFILLING or RUNNING), or falls
/// to WAITING when its cache has to be dropped for memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestStatus {
    /// Queued, holding no KV blocks.
    Waiting,
    /// Its prompt is being run through the model, possibly in chunks.
    Prefilling,
    /// Decoding one token per step.
    Running,
    /// Taken out of the batch for a more urgent request; it keeps its KV
    /// blocks and its backend cache and waits in the queue to resume where
    /// it stopped.
    Paused,
    /// Finished normally (stop token, max tokens, context length).
    Completed,
    /// Ended early: the client left, a deadline passed, or an error occurred.
    Cancelled,
}

impl RequestStatus {
    /// True for the two states a request never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled)
    }

    /// Whether the lifecycle allows moving from `self` to `to`.
    pub fn can_transition_to(self, to: Self) -> bool {
        use RequestStatus::*;
        match (self, to) {
            (Waiting, Prefilling) | (Prefilling, Running) | (Running, Completed) => true,
            // Preemption: the request gives its blocks back and is recomputed later.
            (Prefilling, Waiting) | (Running, Waiting) => true,
            // Pausing keeps the cache; resuming returns to where it left, and
            // a paused cache dropped for memory leaves the request waiting.
            (Prefilling, Paused) | (Running, Paused) => true,
            (Paused, Prefilling) | (Paused, Running) | (Paused, Waiting) => true,
            (from, Cancelled) => !from.is_terminal(),
            _ => false,
        }
    }

    /// Returns `to` when the move is legal and an error otherwise; never panics.
    pub fn transition(self, to: Self) -> Result<Self, TypesError> {
        if self.can_transition_to(to) {
            Ok(to)
        } else {
            Err(TypesError::InvalidTransition { from: self, to })
        }
    }

    /// The lower-case name used in logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Prefilling => "prefilling",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for RequestStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::RequestStatus::{self, *};

    const ALL: [RequestStatus; 6] = [Waiting, Prefilling, Running, Paused, Completed, Cancelled];

    #[test]
    fn the_happy_path_is_allowed() {
        assert_eq!(Waiting.transition(Prefilling), Ok(Prefilling));
        assert_eq!(Prefilling.transition(Running), Ok(Running));
        assert_eq!(Running.transition(Completed), Ok(Completed));
    }

    #[test]
    fn preemption_returns_to_waiting() {
        assert_eq!(Prefilling.transition(Waiting), Ok(Waiting));
        assert_eq!(Running.transition(Waiting), Ok(Waiting));
    }

    #[test]
    fn a_paused_request_resumes_where_it_left_or_drops_to_waiting() {
        assert_eq!(Running.transition(Paused), Ok(Paused));
        assert_eq!(Prefilling.transition(Paused), Ok(Paused));
        assert_eq!(Paused.transition(Running), Ok(Running));
        assert_eq!(Paused.transition(Prefilling), Ok(Prefilling));
        assert_eq!(Paused.transition(Waiting), Ok(Waiting));
        assert!(Waiting.transition(Paused).is_err(), "nothing to pause");
        assert!(Paused.transition(Completed).is_err(), "it must run to end");
    }

    #[test]
    fn every_non_terminal_state_can_be_cancelled() {
        for s in [Waiting, Prefilling, Running, Paused] {
            assert_eq!(s.transition(Cancelled), Ok(Cancelled), "{s}");
        }
    }

    #[test]
    fn terminal_states_stay_terminal() {
        for from in [Completed, Cancelled] {
            for to in ALL {
                assert!(from.transition(to).is_err(), "{from} -> {to} must fail");
            }
        }
    }

    #[test]
    fn the_exact_set_of_legal_moves() {
        let legal: Vec<_> = ALL
            .iter()
            .flat_map(|&a| ALL.iter().map(move |&b| (a, b)))
            .filter(|(a, b)| a.can_transition_to(*b))
            .collect();
        assert_eq!(
            legal,
            vec![
                (Waiting, Prefilling),
                (Waiting, Cancelled),
                (Prefilling, Waiting),
                (Prefilling, Running),
                (Prefilling, Paused),
                (Prefilling, Cancelled),
                (Running, Waiting),
                (Running, Paused),
                (Running, Completed),
                (Running, Cancelled),
                (Paused, Waiting),
                (Paused, Prefilling),
                (Paused, Running),
                (Paused, Cancelled),
            ]
        );
    }

    #[test]
    fn an_illegal_move_names_both_states() {
        let err = Waiting.transition(Completed).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid status transition from waiting to completed"
        );
    }
}
