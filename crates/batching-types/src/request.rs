//! A request as the scheduler sees it.

use std::{fmt, time::Instant};

use crate::{EventSender, Priority, RequestStatus, SamplingParams, TypesError};

/// A request's identity inside the engine. The server maps its own
/// client-facing ids (for example `chatcmpl-...`) onto these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "req-{}", self.0)
    }
}

/// What a caller provides to make a [`BatchRequest`]; a config struct rather
/// than a long argument list.
#[derive(Debug, Clone, Default)]
pub struct NewRequest {
    /// The engine-wide unique id.
    pub request_id: u64,
    /// The model the request is for.
    pub model_id: String,
    /// The tokenized prompt; must not be empty.
    pub prompt_tokens: Vec<u32>,
    /// The most tokens to generate; must be at least 1.
    pub max_tokens: usize,
    /// How urgent the request is.
    pub priority: Priority,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// A request still waiting at this instant ends with a timeout.
    pub deadline: Option<Instant>,
}

/// One generation request moving through the engine.
///
/// Its status can only change through [`BatchRequest::set_status`], which
/// enforces the lifecycle of [`RequestStatus`].
#[derive(Debug)]
pub struct BatchRequest {
    /// The engine-wide unique id.
    pub request_id: RequestId,
    /// The model the request is for.
    pub model_id: String,
    /// The tokenized prompt, never empty.
    pub prompt_tokens: Vec<u32>,
    /// The most tokens to generate, at least 1.
    pub max_tokens: usize,
    /// How urgent the request is.
    pub priority: Priority,
    status: RequestStatus,
    /// Tokens generated so far; kept across preemption so the request
    /// resumes by recomputation instead of starting over.
    pub generated_tokens: Vec<u32>,
    /// Delivers tokens, then exactly one finish event, to the client.
    pub events: EventSender,
    /// When the request was made.
    pub created_at: Instant,
    /// When its prefill first started; `None` until then.
    pub started_at: Option<Instant>,
    /// When it first entered the waiting queue. A preempted request keeps
    /// this, and so keeps the aging it has earned.
    pub enqueued_at: Option<Instant>,
    /// A request still waiting at this instant ends with a timeout.
    pub deadline: Option<Instant>,
    /// The KV blocks assigned to it, in order; empty while waiting (a
    /// paused request keeps its own).
    pub block_table: Vec<u32>,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// How many times it has been taken out of the batch (paused or
    /// preempted); the scheduler stops preempting it for urgency at a limit.
    pub preemptions: u32,
    /// Prompt tokens served from the prefix cache at its first admission;
    /// `None` until then.
    pub cached_prompt_tokens: Option<usize>,
}

impl BatchRequest {
    /// Validates `spec` and makes a WAITING request created at `now`.
    pub fn new(spec: NewRequest, events: EventSender, now: Instant) -> Result<Self, TypesError> {
        if spec.prompt_tokens.is_empty() {
            return Err(TypesError::EmptyPrompt);
        }
        if spec.max_tokens == 0 {
            return Err(TypesError::ZeroMaxTokens);
        }
        spec.sampling.validate()?;
        Ok(Self {
            request_id: RequestId(spec.request_id),
            model_id: spec.model_id,
            prompt_tokens: spec.prompt_tokens,
            max_tokens: spec.max_tokens,
            priority: spec.priority,
            status: RequestStatus::Waiting,
            generated_tokens: Vec::new(),
            events,
            created_at: now,
            started_at: None,
            enqueued_at: None,
            deadline: spec.deadline,
            block_table: Vec::new(),
            sampling: spec.sampling,
            preemptions: 0,
            cached_prompt_tokens: None,
        })
    }

    /// The priority the request was submitted with, before any aging.
    pub fn base_priority(&self) -> Priority {
        self.priority
    }

    /// The current lifecycle status.
    pub fn status(&self) -> RequestStatus {
        self.status
    }

    /// Moves to `to` if the lifecycle allows it. Entering PREFILLING for the
    /// first time records `started_at`.
    pub fn set_status(&mut self, to: RequestStatus, now: Instant) -> Result<(), TypesError> {
        self.status = self.status.transition(to)?;
        if to == RequestStatus::Prefilling && self.started_at.is_none() {
            self.started_at = Some(now);
        }
        Ok(())
    }

    /// True once `max_tokens` tokens exist or the status is terminal.
    pub fn is_complete(&self) -> bool {
        self.generated_tokens.len() >= self.max_tokens || self.status.is_terminal()
    }

    /// Prompt plus generated tokens: what its KV cache holds once prefilled.
    pub fn effective_tokens(&self) -> usize {
        self.prompt_tokens.len() + self.generated_tokens.len()
    }

    /// The tokens a backend must prefill to (re)build this request's cache:
    /// the prompt followed by everything generated so far.
    pub fn context_tokens(&self) -> Vec<u32> {
        let mut tokens = Vec::with_capacity(self.effective_tokens());
        tokens.extend_from_slice(&self.prompt_tokens);
        tokens.extend_from_slice(&self.generated_tokens);
        tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_channel;

    fn spec() -> NewRequest {
        NewRequest {
            request_id: 7,
            model_id: "m".into(),
            prompt_tokens: vec![1, 2, 3],
            max_tokens: 2,
            ..Default::default()
        }
    }

    #[test]
    fn a_new_request_waits_with_no_blocks() {
        let (tx, _rx) = event_channel();
        let now = Instant::now();
        let r = BatchRequest::new(spec(), tx, now).unwrap();
        assert_eq!(r.status(), RequestStatus::Waiting);
        assert_eq!(r.request_id, RequestId(7));
        assert_eq!(r.created_at, now);
        assert!(r.started_at.is_none() && r.enqueued_at.is_none());
        assert!(r.block_table.is_empty() && r.generated_tokens.is_empty());
        assert_eq!(r.base_priority(), Priority::Normal);
        assert_eq!(r.effective_tokens(), 3);
        assert!(!r.is_complete());
    }

    #[test]
    fn empty_prompts_and_zero_max_tokens_are_refused() {
        let (tx, _rx) = event_channel();
        let now = Instant::now();
        let empty = NewRequest {
            prompt_tokens: vec![],
            ..spec()
        };
        assert_eq!(
            BatchRequest::new(empty, tx.clone(), now).unwrap_err(),
            TypesError::EmptyPrompt
        );
        let zero = NewRequest {
            max_tokens: 0,
            ..spec()
        };
        assert_eq!(
            BatchRequest::new(zero, tx.clone(), now).unwrap_err(),
            TypesError::ZeroMaxTokens
        );
        let bad_sampling = NewRequest {
            sampling: SamplingParams {
                top_p: 2.0,
                ..Default::default()
            },
            ..spec()
        };
        assert!(matches!(
            BatchRequest::new(bad_sampling, tx, now),
            Err(TypesError::InvalidSampling { param: "top_p", .. })
        ));
    }

    #[test]
    fn started_at_is_set_on_first_prefill_only() {
        let (tx, _rx) = event_channel();
        let t0 = Instant::now();
        let mut r = BatchRequest::new(spec(), tx, t0).unwrap();
        let t1 = t0 + std::time::Duration::from_secs(1);
        r.set_status(RequestStatus::Prefilling, t1).unwrap();
        assert_eq!(r.started_at, Some(t1));
        r.set_status(RequestStatus::Waiting, t1).unwrap();
        let t2 = t1 + std::time::Duration::from_secs(1);
        r.set_status(RequestStatus::Prefilling, t2).unwrap();
        assert_eq!(r.started_at, Some(t1), "preemption keeps the first start");
    }

    #[test]
    fn completion_counts_tokens_and_terminal_states() {
        let (tx, _rx) = event_channel();
        let now = Instant::now();
        let mut r = BatchRequest::new(spec(), tx, now).unwrap();
        r.generated_tokens.push(9);
        assert!(!r.is_complete());
        assert_eq!(r.effective_tokens(), 4);
        assert_eq!(r.context_tokens(), vec![1, 2, 3, 9]);
        r.generated_tokens.push(9);
        assert!(r.is_complete());

        let (tx, _rx) = event_channel();
        let mut c = BatchRequest::new(spec(), tx, now).unwrap();
        c.set_status(RequestStatus::Cancelled, now).unwrap();
        assert!(c.is_complete());
        assert!(c.set_status(RequestStatus::Prefilling, now).is_err());
        assert_eq!(
            c.status(),
            RequestStatus::Cancelled,
            "a refused move changes nothing"
        );
    }
}
