//! Multi-turn chat: conversations that share a long system prompt and grow
//! turn by turn, the workload a prefix cache is for.
//!
//! Each conversation sends its turns one after the other, every turn with
//! the whole history (system prompt, earlier questions and the answers the
//! server gave), as chat clients do; the conversations run side by side.
//! The records keep each answer's text, so two runs (for example with and
//! without a server's prefix cache) can be checked for the same output.

use std::time::{Duration, Instant};

use crate::{build_prompt, client::send, RequestRecord, RequestSpec, Target};

/// The shape of a multi-turn workload.
#[derive(Debug, Clone)]
pub struct ConversationConfig {
    /// Conversations run at once.
    pub conversations: usize,
    /// Turns in each.
    pub turns: usize,
    /// Length of the system prompt they all share, in tokens.
    pub system_tokens: u32,
    /// Length of each question, in tokens.
    pub user_tokens: u32,
    /// `max_tokens` of each answer.
    pub max_tokens: u32,
    /// The seed for the text.
    pub seed: u64,
    /// The longest one request may take.
    pub request_timeout: Duration,
}

/// Runs every conversation and returns one record per turn, conversation by
/// conversation (record `index` is `conversation * turns + turn`).
pub async fn run_conversations(
    client: &reqwest::Client,
    target: &Target,
    cfg: &ConversationConfig,
) -> Vec<RequestRecord> {
    let system = build_prompt(cfg.system_tokens, cfg.seed);
    let start = Instant::now();
    let runs = (0..cfg.conversations).map(|c| {
        let system = system.clone();
        async move {
            let mut history = vec![("system".to_owned(), system)];
            let mut records = Vec::with_capacity(cfg.turns);
            for turn in 0..cfg.turns {
                let question = build_prompt(
                    cfg.user_tokens,
                    cfg.seed ^ ((c * cfg.turns + turn) as u64 + 1).wrapping_mul(0x9E37_79B9),
                );
                history.push(("user".to_owned(), question.clone()));
                let spec = RequestSpec {
                    index: c * cfg.turns + turn,
                    prompt: question,
                    prompt_tokens: cfg.system_tokens + cfg.user_tokens * (turn as u32 + 1),
                    max_tokens: cfg.max_tokens,
                    priority: None,
                    probe: false,
                    messages: Some(history.clone()),
                };
                let rec = send(
                    client,
                    target,
                    &spec,
                    start,
                    Instant::now() + cfg.request_timeout,
                )
                .await;
                let answer = rec.text.clone().unwrap_or_default();
                let failed = !rec.ok;
                records.push(rec);
                if failed {
                    break;
                }
                history.push(("assistant".to_owned(), answer));
            }
            records
        }
    });
    futures::future::join_all(runs)
        .await
        .into_iter()
        .flatten()
        .collect()
}
