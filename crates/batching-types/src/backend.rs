//! The contract between the scheduler and a model backend.
//!
//! The scheduler decides *what* runs in each step; the backend decides *how*.
//! The scheduler owns admission, KV block accounting and finish decisions
//! (stop tokens, `max_tokens`); the backend owns the model, the KV cache and
//! sampling. Everything is synchronous: the scheduler calls the backend from
//! one engine thread, which matters for MLX, whose arrays must stay on the
//! thread that made them.

use crate::{Failure, RequestId, SamplingParams, TokenLogprobs};

/// What the backend can hold, reported once at start-up and whenever the
/// scheduler asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendCapacity {
    /// KV cache slots (tokens) summed over all sequences. The scheduler never
    /// plans more than this; within it, the backend must not fail for lack of
    /// memory.
    pub kv_tokens: usize,
    /// The longest sequence (prompt plus generated tokens) the model supports.
    pub max_context: usize,
}

/// The block layout of the KV cache, chosen by the scheduler and given to
/// the backend once, before any sequence is added.
///
/// The scheduler owns the block ids: it assigns every sequence a *block
/// table* (block `i` of the table holds the sequence's tokens
/// `i * block_size .. (i + 1) * block_size`) and hands the tables over with
/// each plan. The backend stores keys and values in a pool of `num_blocks`
/// blocks indexed by those ids, so the scheduler's accounting is the memory
/// the backend uses: there is no second allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBlocks {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool; ids run from 0 to `num_blocks - 1`.
    pub num_blocks: usize,
}

/// What the backend's memory holds, as it reports it after each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendMemory {
    /// Bytes the backend's allocator has in use now (weights, KV pool and
    /// whatever a step keeps alive).
    pub active_bytes: u64,
    /// The most bytes it has had in use at once.
    pub peak_bytes: u64,
    /// Bytes freed but kept by the allocator for reuse.
    pub cache_bytes: u64,
    /// Bytes the KV block pool holds now.
    pub kv_bytes: u64,
}

/// The work one sequence does in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkKind {
    /// Feed the next `len` tokens of the sequence's context (given to
    /// [`Backend::add_sequence`]). The chunk that completes the context also
    /// samples the sequence's next token.
    Prefill {
        /// How many context tokens this chunk covers; at least 1.
        len: usize,
    },
    /// Feed the last sampled token and sample one more.
    Decode,
}

impl WorkKind {
    /// Tokens this work feeds through the model (and writes to the cache).
    pub fn tokens(self) -> usize {
        match self {
            Self::Prefill { len } => len,
            Self::Decode => 1,
        }
    }
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepItem {
    /// The sequence.
    pub id: RequestId,
    /// What it does in this step.
    pub kind: WorkKind,
}

/// Everything that runs in one forward pass: decodes and prefill chunks
/// together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// The sequences in the batch, each at most once.
    pub items: Vec<StepItem>,
    /// `block_tables[k]` is the block table of `items[k]`'s sequence: enough
    /// blocks for every token it holds once this step has run. Blocks are
    /// never shared between sequences that write to them.
    pub block_tables: Vec<Vec<u32>>,
}

impl StepPlan {
    /// Tokens fed through the model by this step.
    pub fn num_tokens(&self) -> usize {
        self.items.iter().map(|item| item.kind.tokens()).sum()
    }
}

/// The result of one sequence's work in a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SequenceOutcome {
    /// A prefill chunk was consumed and more context remains.
    Pending,
    /// A token was sampled.
    Token(u32),
    /// This sequence failed; the others are unaffected. The scheduler ends
    /// the request with an error and releases it.
    Failed(String),
}

/// One sequence's outcome in a step.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceResult {
    /// The sequence.
    pub id: RequestId,
    /// What happened to it.
    pub outcome: SequenceOutcome,
    /// The sampled token's log probabilities, when its sampling asked for
    /// them.
    pub logprobs: Option<TokenLogprobs>,
}

/// The outcomes of a step, one for each item of its plan, in plan order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// One result per planned item.
    pub results: Vec<SequenceResult>,
}

/// A model that runs batched steps over many sequences.
///
/// The scheduler guarantees: the KV layout is configured before anything
/// else; a sequence is added before it appears in a plan; each plan names a
/// sequence at most once, with a block table that covers all its tokens
/// after the step; prefill chunks never run past the context that was
/// added; the blocks of all tables together never exceed the pool; a
/// released sequence is never named again unless it is added anew.
///
/// A registered sequence that a plan does not name keeps its cache as it
/// is: this is how the scheduler *pauses* a request for a more urgent one.
/// When a later plan names it again, it continues exactly where it stopped
/// (the next prefill chunk, or a decode of its last sampled token), with no
/// recomputation. Paused sequences count against `kv_tokens` like running
/// ones.
pub trait Backend {
    /// A failure of the whole backend or of a whole step. Its kind decides
    /// what the scheduler does: a step that failed with
    /// [`crate::FailureKind::OutOfMemory`] changed nothing and is retried
    /// with less work.
    type Error: Failure;

    /// What the backend can hold.
    fn capacity(&self) -> BackendCapacity;

    /// Sets the block layout that the tables of every later plan use; called
    /// once by the scheduler before any sequence is added. `num_blocks *
    /// block_size` never exceeds [`BackendCapacity::kv_tokens`].
    fn configure_kv(&mut self, blocks: KvBlocks) -> Result<(), Self::Error>;

    /// Registers a sequence whose cache must be built from `context` (the
    /// prompt, followed after a preemption by the tokens generated so far).
    /// Nothing runs until a plan names it. Sampling must depend only on
    /// `sampling` and each token's position, so that a preempted sequence
    /// recomputed later draws the same tokens.
    fn add_sequence(
        &mut self,
        id: RequestId,
        context: &[u32],
        sampling: &SamplingParams,
    ) -> Result<(), Self::Error>;

    /// Tells the backend that the last `tokens` context tokens of a sequence
    /// it was just given are the sequence's own earlier output (it is being
    /// recomputed after a preemption), so that penalties on generated
    /// tokens count them as before. Called right after `add_sequence`,
    /// before any plan names the sequence. Backends without such penalties
    /// may ignore it.
    fn mark_generated(&mut self, id: RequestId, tokens: usize) -> Result<(), Self::Error> {
        let _ = (id, tokens);
        Ok(())
    }

    /// Tells the backend that the first `tokens` context tokens of a
    /// sequence it was just given are already in the first blocks of its
    /// table (a prefix-cache hit: other sequences wrote them): its prefill
    /// starts after them. Called right after `add_sequence`, before any plan
    /// names the sequence, with a whole number of blocks that leaves at
    /// least one context token to compute.
    fn use_cached_prefix(&mut self, id: RequestId, tokens: usize) -> Result<(), Self::Error>;

    /// Runs one forward pass over `plan` and returns one result per item, in
    /// order. An `Err` means the whole step failed and no sequence advanced.
    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, Self::Error>;

    /// Forgets a sequence and frees its cache. Releasing an unknown id is a
    /// no-op, so cleanup paths never fail.
    fn release(&mut self, id: RequestId);

    /// What the backend's memory holds now; the scheduler publishes it
    /// after every step (for `/metrics` and health).
    fn memory(&self) -> BackendMemory;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_counts_prefill_and_decode_tokens() {
        let plan = StepPlan {
            block_tables: vec![vec![0], vec![1]],
            items: vec![
                StepItem {
                    id: RequestId::from(1),
                    kind: WorkKind::Decode,
                },
                StepItem {
                    id: RequestId::from(2),
                    kind: WorkKind::Prefill { len: 16 },
                },
            ],
        };
        assert_eq!(plan.num_tokens(), 17);
        assert_eq!(StepPlan::default().num_tokens(), 0);
    }
}
