//! The simulated backend itself.

use std::collections::HashMap;

use batching_types::{
    Backend, BackendCapacity, BackendMemory, KvBlocks, RequestId, SamplingParams, SequenceOutcome,
    SequenceResult, SharedConstraint, StepOutput, StepPlan, TokenLogprobs, WorkKind,
};

use crate::{tokens::ContextHash, SimConfig, SimControl, SimError, TimeMode};

/// One sequence as the simulated model holds it.
#[derive(Debug)]
struct Sequence {
    /// The context given at `add_sequence`.
    context: Vec<u32>,
    /// How many context tokens have been fed by prefill chunks.
    prefilled: usize,
    /// Hash of every token fed so far.
    hash: ContextHash,
    /// The last sampled token, fed by the next decode.
    last: Option<u32>,
    /// KV slots held: tokens fed so far.
    kv: usize,
    /// The block table its tokens were written through.
    table: Vec<u32>,
    /// Alternatives to report with each token, when asked for.
    logprobs: Option<usize>,
    /// The grammar its tokens must follow, if any.
    constraint: Option<SharedConstraint>,
}

impl Sequence {
    /// The simulated model's choice after the tokens fed so far: the
    /// context hash's token, or, under a constraint, the first token at or
    /// after it (wrapping) that the grammar allows. Advances the grammar.
    fn sample(&self, vocab: u32, stop: Option<crate::StopRule>) -> Result<u32, String> {
        let token = self.hash.next_token(vocab, stop);
        let Some(constraint) = &self.constraint else {
            return Ok(token);
        };
        // The simulated logits cover the drawn tokens and the stop token,
        // so a grammar can end with it.
        let width = stop.map_or(vocab, |rule| vocab.max(rule.token.saturating_add(1)));
        let mut grammar = constraint.lock();
        let mut mask = vec![0u32; width.div_ceil(32) as usize];
        grammar.fill_mask(&mut mask).map_err(|e| e.to_string())?;
        let token = (0..width)
            .map(|k| (token + k) % width)
            .find(|&t| batching_types::mask_allows(&mask, t))
            .ok_or_else(|| "the grammar allows no token".to_owned())?;
        grammar.consume(token).map_err(|e| e.to_string())?;
        Ok(token)
    }

    /// What the simulated model reports for `token`: it was the most likely
    /// token, at probability 1/2, followed by the next ids at 1/4, 1/8...
    fn logprobs_of(&self, token: u32, vocab: u32) -> Option<TokenLogprobs> {
        let n = self.logprobs?;
        let top = (0..n as u32)
            .map(|k| {
                (
                    (token + k) % vocab.max(1),
                    -((k + 1) as f32) * std::f32::consts::LN_2,
                )
            })
            .collect();
        Some(TokenLogprobs {
            logprob: -std::f32::consts::LN_2,
            top,
        })
    }
}

/// The simulated KV memory: a pool of blocks, each holding the tokens that
/// were written into it, and which live sequence owns each block. It is the
/// same model as the MLX backend's pool, so a plan whose tables would let
/// two sequences write into one block, move a sequence's tokens, or run
/// past the pool is refused here too.
#[derive(Debug)]
struct BlockPool {
    layout: KvBlocks,
    contents: Vec<Vec<u32>>,
    owner: Vec<Option<RequestId>>,
}

/// What one plan's tables are checked against.
struct TableCheck<'a> {
    pool: &'a BlockPool,
    /// The sequences holding each block once the plan runs.
    holders: &'a HashMap<u32, Vec<RequestId>>,
}

impl BlockPool {
    fn new(layout: KvBlocks) -> Self {
        Self {
            layout,
            contents: vec![Vec::new(); layout.num_blocks],
            owner: vec![None; layout.num_blocks],
        }
    }

    fn in_use(&self) -> usize {
        self.owner.iter().filter(|o| o.is_some()).count()
    }
}

/// A [`Backend`] with a cost model and deterministic tokens.
#[derive(Debug)]
pub struct SimBackend {
    config: SimConfig,
    sequences: HashMap<RequestId, Sequence>,
    control: SimControl,
    pool: Option<BlockPool>,
}

impl SimBackend {
    /// A backend with `config`, after validating it.
    pub fn new(config: SimConfig) -> Result<Self, SimError> {
        config.validate()?;
        Ok(Self {
            config,
            sequences: HashMap::new(),
            control: SimControl::default(),
            pool: None,
        })
    }

    /// The handle for fault injection and statistics; clone it before the
    /// backend moves to another thread.
    pub fn control(&self) -> SimControl {
        self.control.clone()
    }

    /// The configuration in use.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    fn violation(&self, message: String) -> SimError {
        self.control
            .with(|s| s.stats.violations.push(message.clone()));
        SimError::ContractViolation(message)
    }

    /// Checks the whole plan before anything advances, so a refused plan
    /// changes no state (as a failed step must not).
    fn check_plan(&self, plan: &StepPlan) -> Result<(), SimError> {
        let Some(pool) = &self.pool else {
            return Err(self.violation("a plan before configure_kv".into()));
        };
        if plan.block_tables.len() != plan.items.len() {
            return Err(self.violation(format!(
                "{} block tables for {} plan items",
                plan.block_tables.len(),
                plan.items.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        // Who holds each block after this plan: every live sequence's last
        // table, or its table in this plan. Readers of a shared prefix hold
        // its blocks as much as their writer did.
        let mut tables: HashMap<RequestId, &[u32]> = self
            .sequences
            .iter()
            .map(|(&id, seq)| (id, seq.table.as_slice()))
            .collect();
        for (item, table) in plan.items.iter().zip(&plan.block_tables) {
            if tables.contains_key(&item.id) {
                tables.insert(item.id, table.as_slice());
            }
        }
        let mut holders: HashMap<u32, Vec<RequestId>> = HashMap::new();
        for (&id, table) in &tables {
            for &block in *table {
                holders.entry(block).or_default().push(id);
            }
        }
        let mut writes: HashMap<u32, RequestId> = HashMap::new();
        for (item, table) in plan.items.iter().zip(&plan.block_tables) {
            if let Some(seq) = self.sequences.get(&item.id) {
                let grow = item.kind.tokens();
                let check = TableCheck {
                    pool,
                    holders: &holders,
                };
                self.check_table(&check, item.id, seq, table, grow, &mut writes)?;
            }
        }
        for item in &plan.items {
            if !seen.insert(item.id) {
                return Err(self.violation(format!("{} named twice in one plan", item.id)));
            }
            let Some(seq) = self.sequences.get(&item.id) else {
                return Err(self.violation(format!("{} planned before it was added", item.id)));
            };
            match item.kind {
                WorkKind::Prefill { len } => {
                    if len == 0 || seq.prefilled + len > seq.context.len() {
                        return Err(self.violation(format!(
                            "{}: prefill of {len} at {} runs past its context of {}",
                            item.id,
                            seq.prefilled,
                            seq.context.len()
                        )));
                    }
                }
                WorkKind::Decode => {
                    if seq.last.is_none() {
                        return Err(self.violation(format!(
                            "{} decoded before its prefill completed",
                            item.id
                        )));
                    }
                }
            }
        }
        // Memory is counted in blocks, as the real backend's pool is: every
        // table stays inside the pool (checked above), and a block shared
        // by a prefix-cache hit is held once, however many tables read it.
        Ok(())
    }

    /// One item's table: it covers the sequence's tokens after the step,
    /// keeps the blocks its earlier tokens were written to, stays inside the
    /// pool, and writes only into blocks no other sequence owns or writes.
    fn check_table(
        &self,
        check: &TableCheck<'_>,
        id: RequestId,
        seq: &Sequence,
        table: &[u32],
        grow: usize,
        writes: &mut HashMap<u32, RequestId>,
    ) -> Result<(), SimError> {
        let pool = check.pool;
        let bs = pool.layout.block_size;
        let after = seq.kv + grow;
        if table.len() < after.div_ceil(bs) {
            return Err(self.violation(format!(
                "{id}: a table of {} blocks for {after} tokens of {bs}",
                table.len()
            )));
        }
        if let Some(bad) = table
            .iter()
            .find(|&&b| b as usize >= pool.layout.num_blocks)
        {
            return Err(self.violation(format!(
                "{id}: block {bad} is outside the pool of {}",
                pool.layout.num_blocks
            )));
        }
        let written = seq.kv.div_ceil(bs);
        if seq.table.is_empty() && seq.kv > 0 {
            // A prefix-cache hit: the first blocks must hold exactly the
            // tokens the sequence starts with, as someone else wrote them.
            for (i, chunk) in seq.context[..seq.kv].chunks(bs).enumerate() {
                if pool.contents[table[i] as usize] != chunk {
                    return Err(self.violation(format!(
                        "{id}: cached block {} does not hold its tokens {chunk:?}",
                        table[i]
                    )));
                }
            }
        } else if table.get(..written) != seq.table.get(..written) {
            return Err(self.violation(format!(
                "{id}: its table moved blocks already written ({:?} -> {table:?})",
                seq.table
            )));
        }
        for position in seq.kv..after {
            let block = table[position / bs];
            let shared = check
                .holders
                .get(&block)
                .is_some_and(|h| h.iter().any(|&o| o != id));
            let other = writes.insert(block, id).filter(|&w| w != id);
            if shared || other.is_some() {
                return Err(self.violation(format!(
                    "{id} writes into block {block}, which another sequence holds"
                )));
            }
        }
        Ok(())
    }

    fn kv_in_use(&self) -> usize {
        self.sequences.values().map(|s| s.kv).sum()
    }

    fn spend(&mut self, prefill: usize, decode: usize) {
        let cost = self.config.step_cost_for(prefill, decode);
        match &self.config.time {
            TimeMode::Virtual => {}
            TimeMode::Sleep => std::thread::sleep(cost),
            TimeMode::Advance(clock) => clock.advance(cost),
        }
        self.control.with(|s| s.stats.virtual_time += cost);
    }

    fn record(&self, plan: &StepPlan, prefill: usize, decode: usize, failed: bool) {
        let kv = self.kv_in_use();
        let blocks = self.pool.as_ref().map_or(0, BlockPool::in_use);
        let live = self.sequences.len();
        self.control.with(|s| {
            let st = &mut s.stats;
            st.steps += 1;
            st.failed_steps += u64::from(failed);
            st.prefill_tokens += prefill as u64;
            st.decode_tokens += decode as u64;
            st.max_batch_size = st.max_batch_size.max(plan.items.len());
            st.max_batch_tokens = st.max_batch_tokens.max(prefill + decode);
            st.kv_in_use = kv;
            st.max_kv_in_use = st.max_kv_in_use.max(kv);
            st.blocks_in_use = blocks;
            st.max_blocks_in_use = st.max_blocks_in_use.max(blocks);
            st.live_sequences = live;
        });
    }
}

impl Backend for SimBackend {
    type Error = SimError;

    fn capacity(&self) -> BackendCapacity {
        BackendCapacity {
            kv_tokens: self.config.kv_tokens,
            max_context: self.config.max_context,
        }
    }

    fn configure_kv(&mut self, blocks: KvBlocks) -> Result<(), SimError> {
        if self.pool.is_some() {
            return Err(self.violation("configure_kv called twice".into()));
        }
        if blocks.block_size == 0 || blocks.num_blocks * blocks.block_size > self.config.kv_tokens {
            return Err(self.violation(format!(
                "{} blocks of {} tokens do not fit in {} KV tokens",
                blocks.num_blocks, blocks.block_size, self.config.kv_tokens
            )));
        }
        self.pool = Some(BlockPool::new(blocks));
        Ok(())
    }

    fn add_sequence(
        &mut self,
        id: RequestId,
        context: &[u32],
        sampling: &SamplingParams,
    ) -> Result<(), SimError> {
        if self.control.with(|s| s.fail_adds.remove(&id)) {
            return Err(SimError::InjectedAddFailure(id));
        }
        if self.sequences.contains_key(&id) {
            return Err(self.violation(format!("{id} added twice")));
        }
        if context.is_empty() || context.len() > self.config.max_context {
            return Err(self.violation(format!(
                "{id}: context of {} tokens is empty or longer than {}",
                context.len(),
                self.config.max_context
            )));
        }
        self.sequences.insert(
            id,
            Sequence {
                context: context.to_vec(),
                prefilled: 0,
                hash: ContextHash::new(sampling.seed),
                last: None,
                kv: 0,
                table: Vec::new(),
                logprobs: sampling.logprobs,
                constraint: sampling.constraint.clone(),
            },
        );
        let live = self.sequences.len();
        self.control.with(|s| {
            s.stats.added += 1;
            s.stats.live_sequences = live;
        });
        Ok(())
    }

    fn use_cached_prefix(&mut self, id: RequestId, tokens: usize) -> Result<(), SimError> {
        let bs = self.pool.as_ref().map_or(0, |p| p.layout.block_size);
        let ok = self.sequences.get(&id).is_some_and(|seq| {
            seq.kv == 0 && tokens < seq.context.len() && bs > 0 && tokens.is_multiple_of(bs)
        });
        if !ok {
            return Err(self.violation(format!(
                "{id}: a cached prefix of {tokens} tokens for a sequence that cannot take it"
            )));
        }
        if let Some(seq) = self.sequences.get_mut(&id) {
            let prefix = seq.context[..tokens].to_vec();
            prefix.iter().for_each(|&t| seq.hash.push(t));
            seq.prefilled = tokens;
            seq.kv = tokens;
        }
        self.control
            .with(|s| s.stats.cached_tokens += tokens as u64);
        Ok(())
    }

    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, SimError> {
        if plan.items.is_empty() {
            return Ok(StepOutput::default());
        }
        self.check_plan(plan)?;
        let (prefill, decode) = plan
            .items
            .iter()
            .fold((0, 0), |(p, d), item| match item.kind {
                WorkKind::Prefill { len } => (p + len, d),
                WorkKind::Decode => (p, d + 1),
            });
        let fail_step = self.control.with(|s| {
            let fail = s.fail_steps > 0;
            s.fail_steps = s.fail_steps.saturating_sub(1);
            fail
        });
        if fail_step {
            self.spend(prefill, decode);
            self.record(plan, prefill, decode, true);
            return Err(SimError::InjectedStepFailure);
        }
        let tokens = plan.num_tokens();
        if let Some(limit) = self
            .control
            .with(|s| s.step_token_limit)
            .filter(|&l| tokens > l)
        {
            // Refused before it ran: no tokens were fed.
            self.record(plan, 0, 0, true);
            return Err(SimError::OutOfMemory { tokens, limit });
        }
        let (vocab, stop) = (self.config.vocab, self.config.stop);
        let mut results = Vec::with_capacity(plan.items.len());
        for (item, table) in plan.items.iter().zip(&plan.block_tables) {
            let failed = self.control.with(|s| s.fail_sequences.remove(&item.id));
            let Some(seq) = self.sequences.get_mut(&item.id) else {
                // check_plan has verified every id; this arm is unreachable
                // but must not panic.
                continue;
            };
            if failed {
                results.push(SequenceResult {
                    id: item.id,
                    outcome: SequenceOutcome::Failed("injected sequence failure".into()),
                    logprobs: None,
                });
                continue;
            }
            seq.table.clone_from(table);
            let written: Vec<u32> = match item.kind {
                WorkKind::Prefill { len } => {
                    seq.context[seq.prefilled..seq.prefilled + len].to_vec()
                }
                WorkKind::Decode => seq.last.into_iter().collect(),
            };
            if let Some(pool) = &mut self.pool {
                let bs = pool.layout.block_size;
                for (k, &t) in written.iter().enumerate() {
                    let position = seq.kv + k;
                    let block = table[position / bs] as usize;
                    if position % bs == 0 {
                        pool.contents[block].clear();
                    }
                    pool.contents[block].push(t);
                    pool.owner[block] = Some(item.id);
                }
            }
            let outcome = match item.kind {
                WorkKind::Prefill { len } => {
                    let chunk = &seq.context[seq.prefilled..seq.prefilled + len];
                    chunk.iter().for_each(|&t| seq.hash.push(t));
                    seq.prefilled += len;
                    seq.kv += len;
                    if seq.prefilled == seq.context.len() {
                        match seq.sample(vocab, stop) {
                            Ok(token) => {
                                seq.last = Some(token);
                                SequenceOutcome::Token(token)
                            }
                            Err(e) => SequenceOutcome::Failed(e),
                        }
                    } else {
                        SequenceOutcome::Pending
                    }
                }
                WorkKind::Decode => {
                    if let Some(last) = seq.last {
                        seq.hash.push(last);
                    }
                    seq.kv += 1;
                    match seq.sample(vocab, stop) {
                        Ok(token) => {
                            seq.last = Some(token);
                            SequenceOutcome::Token(token)
                        }
                        Err(e) => SequenceOutcome::Failed(e),
                    }
                }
            };
            let logprobs = match outcome {
                SequenceOutcome::Token(token) => seq.logprobs_of(token, vocab),
                _ => None,
            };
            results.push(SequenceResult {
                id: item.id,
                outcome,
                logprobs,
            });
        }
        self.spend(prefill, decode);
        self.record(plan, prefill, decode, false);
        Ok(StepOutput { results })
    }

    /// The sim's memory is its block pool, one byte per token slot: blocks
    /// owned by live sequences, and the most ever owned as the peak.
    fn memory(&self) -> BackendMemory {
        let bs = self.pool.as_ref().map_or(0, |p| p.layout.block_size) as u64;
        let (now, peak) = self
            .control
            .with(|s| (s.stats.blocks_in_use, s.stats.max_blocks_in_use));
        BackendMemory {
            active_bytes: now as u64 * bs,
            peak_bytes: peak as u64 * bs,
            cache_bytes: 0,
            kv_bytes: now as u64 * bs,
        }
    }

    fn release(&mut self, id: RequestId) {
        if let Some(seq) = self.sequences.remove(&id) {
            // The blocks keep what was written; they are only no longer owned.
            if let Some(pool) = &mut self.pool {
                for &block in &seq.table {
                    if let Some(owner) = pool.owner.get_mut(block as usize) {
                        if *owner == Some(id) {
                            *owner = None;
                        }
                    }
                }
            }
            let kv = self.kv_in_use();
            let live = self.sequences.len();
            let blocks = self.pool.as_ref().map_or(0, BlockPool::in_use);
            self.control.with(|s| {
                s.stats.released += 1;
                s.stats.blocks_in_use = blocks;
                s.stats.kv_in_use = kv;
                s.stats.live_sequences = live;
            });
        }
    }
}
