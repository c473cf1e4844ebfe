//! A request as the scheduler sees it.

use std::{fmt, time::Instant};

use crate::{EventSender, Priority, RequestStatus, SamplingParams, TypesError};

/// A request's identity, one from the HTTP edge to the backend.
///
/// It has a *name*, the id users see: the `x-request-id` a client sent, or
/// one the server made up, printed in every log line, error message and
/// trace of the request, and used in its response id. The engine also
/// gives it a sequence number, unique among all requests of the process;
/// equality, hashing and ordering use that number only, so two clients
/// that send the same `x-request-id` never collide inside the engine. The
/// name is stored inline (at most [`RequestId::MAX_NAME`] bytes of visible
/// ASCII), which keeps the id `Copy`.
#[derive(Clone, Copy)]
pub struct RequestId {
    seq: u64,
    len: u8,
    name: [u8; RequestId::MAX_NAME],
}

impl RequestId {
    /// The longest name, in bytes.
    pub const MAX_NAME: usize = 64;

    /// An id with sequence number `seq` and the given name; fails unless
    /// the name is 1 to [`RequestId::MAX_NAME`] visible ASCII characters
    /// (what an HTTP header and a log line can carry unescaped).
    pub fn named(seq: u64, name: &str) -> Result<Self, TypesError> {
        Self::check_name(name)?;
        let mut buf = [0u8; Self::MAX_NAME];
        buf[..name.len()].copy_from_slice(name.as_bytes());
        Ok(Self {
            seq,
            len: name.len() as u8,
            name: buf,
        })
    }

    /// Checks a name without making an id.
    pub fn check_name(name: &str) -> Result<(), TypesError> {
        if name.is_empty()
            || name.len() > Self::MAX_NAME
            || !name.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(TypesError::InvalidRequestId(name.to_owned()));
        }
        Ok(())
    }

    /// The engine-wide sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The name users see.
    pub fn name(&self) -> &str {
        // Built only from a checked `&str`, so always ASCII.
        std::str::from_utf8(&self.name[..usize::from(self.len)]).unwrap_or("?")
    }
}

/// An id named `req-<seq>`, for requests that came without a name.
impl From<u64> for RequestId {
    fn from(seq: u64) -> Self {
        let name = format!("req-{seq}");
        let mut buf = [0u8; Self::MAX_NAME];
        let len = name.len().min(Self::MAX_NAME);
        buf[..len].copy_from_slice(&name.as_bytes()[..len]);
        Self {
            seq,
            len: len as u8,
            name: buf,
        }
    }
}

impl PartialEq for RequestId {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
    }
}

impl Eq for RequestId {}

impl std::hash::Hash for RequestId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.seq.hash(state);
    }
}

impl PartialOrd for RequestId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for RequestId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.seq.cmp(&other.seq)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({}, {:?})", self.seq, self.name())
    }
}

/// What a caller provides to make a [`BatchRequest`]; a config struct rather
/// than a long argument list.
#[derive(Debug, Clone, Default)]
pub struct NewRequest {
    /// The engine-wide sequence number; the engine assigns it at submit,
    /// whatever the caller put here.
    pub request_id: u64,
    /// The request's name (see [`RequestId`]), for example the client's
    /// `x-request-id`; `None` names it `req-<sequence number>`.
    pub name: Option<String>,
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
        let request_id = match &spec.name {
            Some(name) => RequestId::named(spec.request_id, name)?,
            None => RequestId::from(spec.request_id),
        };
        Ok(Self {
            request_id,
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
        assert_eq!(r.request_id, RequestId::from(7));
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
    fn an_id_is_its_name_to_people_and_its_number_to_the_engine() {
        let a = RequestId::named(1, "abc-123").unwrap();
        let b = RequestId::named(2, "abc-123").unwrap();
        assert_eq!(a.to_string(), "abc-123");
        assert_ne!(a, b, "the same name twice is two requests");
        assert!(a < b);
        assert_eq!(RequestId::from(9).to_string(), "req-9");
        assert_eq!(RequestId::from(9), RequestId::named(9, "other").unwrap());
        let long = "x".repeat(RequestId::MAX_NAME);
        assert_eq!(RequestId::named(3, &long).unwrap().name(), long);
        for bad in ["", "with space", "tab\t", "é", &"x".repeat(65)] {
            assert!(
                matches!(
                    RequestId::named(1, bad),
                    Err(TypesError::InvalidRequestId(_))
                ),
                "{bad:?}"
            );
        }
        let (tx, _rx) = event_channel();
        let named = NewRequest {
            name: Some("client-7".into()),
            ..spec()
        };
        let r = BatchRequest::new(named, tx, Instant::now()).unwrap();
        assert_eq!(r.request_id.to_string(), "client-7");
        assert_eq!(r.request_id.seq(), 7);
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
