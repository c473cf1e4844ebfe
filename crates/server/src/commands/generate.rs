//! `mlx-batch generate`: one prompt, its continuation streamed to stdout.
//!
//! It goes through the same scheduler and the same [`Generation`] reader as
//! the server, so what it prints is what a client would receive.

use std::io::Write;

use anyhow::Context;
use batching_scheduler::SchedulerConfig;
use batching_types::{NewRequest, SamplingParams};

use crate::{
    cli::GenerateArgs,
    commands::{load, KvSize},
    generation::{Generation, GenerationConfig},
    service::GenerationService,
    text_model::{ChatMessage, TextModel},
};

/// KV memory for one sequence is small; this is plenty for any context.
const GENERATE_KV_BYTES: u64 = 256 << 20;

/// Generates and prints the continuation of `args.prompt`.
pub async fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let scheduler = SchedulerConfig {
        max_batch_size: 1,
        ..SchedulerConfig::default()
    };
    let loaded = tokio::task::block_in_place(|| {
        load(
            &args.model,
            scheduler,
            KvSize::Bytes(GENERATE_KV_BYTES).into(),
        )
    })?;
    let model = &loaded.model;
    let prompt = if args.chat {
        model.chat_prompt(&[ChatMessage::new("user", args.prompt.clone())], &[])?
    } else {
        args.prompt.clone()
    };
    let tokens = model.encode(&prompt)?;
    let prompt_tokens = tokens.len();
    let request = NewRequest {
        model_id: model.id().to_owned(),
        prompt_tokens: tokens,
        max_tokens: args.max_tokens,
        name: Some("generate".to_owned()),
        sampling: SamplingParams {
            temperature: args.temperature,
            seed: args.seed,
            stop_token_ids: model.eos_token_ids(),
            ..SamplingParams::default()
        },
        ..NewRequest::default()
    };
    let events = loaded
        .engine
        .submit(request)
        .map_err(|e| anyhow::anyhow!(crate::openai::errors::ApiError::from(e).message))?;
    let mut generation = Generation::new(
        events,
        GenerationConfig {
            decoder: model.decoder(false),
            stop: Vec::new(),
            eos_token_ids: model.eos_token_ids(),
            prompt_tokens,
            request_name: "generate".to_owned(),
        },
    );
    let mut out = std::io::stdout();
    while let Some(step) = generation.next_step().await {
        out.write_all(step.text.as_bytes())?;
        out.flush()?;
        if let Some(finish) = step.finish {
            writeln!(out)?;
            finish
                .outcome
                .map_err(|e| anyhow::anyhow!(e.message))
                .context("generation failed")?;
            break;
        }
    }
    loaded.engine.handle().shutdown();
    Ok(())
}
