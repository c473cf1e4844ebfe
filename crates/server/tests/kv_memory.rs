//! The KV budget bounds the process's memory with the real default model:
//! one long prompt beside twenty short ones, under `--kv-memory 256MiB`.
//!
//! Before the block pool, this workload grew the process by about 5.9 GB
//! (every row padded to the longest sequence). Now the growth must stay
//! within the KV budget, the working set of a step and MLX's buffer cache.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod default_model;

use batching_scheduler::SchedulerConfig;
use batching_types::{FinishReason, NewRequest, OutputEvent};
use default_model::model_or_skip;
use futures::StreamExt;
use server::{
    cli::{DeviceArg, ModelArgs},
    commands::{load, KvSize, MemoryPlan, DEFAULT_CACHE_LIMIT},
    service::GenerationService,
};

const MIB: u64 = 1 << 20;
/// The KV budget under test.
const KV_BUDGET: u64 = 256 * MIB;
/// What one step needs beside the weights and the KV pool, measured on
/// this workload: MLX's peak active memory minus weights minus the budget
/// was 108 MiB (activations of a 512-token step, a long chunk's attention
/// scores and gathered keys, logits). The bound leaves some room above it.
const WORKING_SET: u64 = 160 * MIB;

fn status_mib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = text.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

async fn run(engine: &dyn GenerationService, prompt: Vec<u32>, max_tokens: usize) -> FinishReason {
    let mut events = engine
        .submit(NewRequest {
            prompt_tokens: prompt,
            max_tokens,
            ..NewRequest::default()
        })
        .unwrap();
    while let Some(event) = events.next().await {
        if let OutputEvent::Finished { reason, .. } = event {
            return reason;
        }
    }
    panic!("the stream ended without a finish event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_budget_bounds_memory_whatever_the_mix_of_lengths() {
    let Some(model_dir) = model_or_skip() else {
        return;
    };
    let args = ModelArgs {
        model: Some(model_dir),
        device: DeviceArg::Cpu,
    };
    let memory = MemoryPlan {
        kv: KvSize::Bytes(KV_BUDGET),
        limit: None,
        cache_limit: Some(DEFAULT_CACHE_LIMIT),
    };
    let loaded =
        tokio::task::block_in_place(|| load(&args, SchedulerConfig::default(), memory)).unwrap();
    let engine = &loaded.engine;
    // The first request pays for lazy initialisation; measure after it.
    assert_eq!(run(engine, vec![1, 2, 3], 2).await, FinishReason::Length);
    // Writing 5 resets the peak resident size (VmHWM) to the current one.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let rss_before = status_mib("VmRSS:");

    let long: Vec<u32> = (0..2260).map(|i| 100 + (i * 7919) % 40_000).collect();
    let mut work = vec![run(engine, long, 8)];
    for i in 0..20u32 {
        let short: Vec<u32> = (0..30).map(|k| 200 + i * 31 + k).collect();
        work.push(run(engine, short, 24));
    }
    let watch = async {
        let mut most = 0;
        loop {
            let kv = engine.handle().status().memory.kv_bytes;
            most = most.max(kv);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if engine.handle().status().running == 0 && engine.handle().status().waiting == 0 {
                return most;
            }
        }
    };
    let (reasons, most_kv) = tokio::join!(futures::future::join_all(work), watch);
    assert!(
        reasons.iter().all(|r| *r == FinishReason::Length),
        "{reasons:?}"
    );

    let growth = status_mib("VmHWM:").saturating_sub(rss_before);
    let memory = engine.handle().status().memory;
    let bound = (KV_BUDGET + WORKING_SET + DEFAULT_CACHE_LIMIT) / MIB;
    println!(
        "RSS {rss_before} MiB -> peak {} MiB (growth {growth} MiB, bound {bound} MiB); \
         KV pool at most {} MiB of a {} MiB budget; MLX peak {} MiB, cache {} MiB",
        rss_before + growth,
        most_kv / MIB,
        KV_BUDGET / MIB,
        memory.peak_bytes / MIB,
        memory.cache_bytes / MIB
    );
    assert!(most_kv <= KV_BUDGET, "the KV pool outgrew its budget");
    assert!(
        memory.cache_bytes <= DEFAULT_CACHE_LIMIT,
        "MLX's cache outgrew its limit"
    );
    assert!(
        growth <= bound,
        "the process grew by {growth} MiB, over the KV budget + working set + cache of {bound} MiB"
    );
}
