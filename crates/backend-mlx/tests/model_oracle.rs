//! Numerics against Python mlx-lm on the same MLX wheel: random tiny Llama
//! (llama3 RoPE scaling, separate output head) and Qwen2 (q/k/v biases,
//! tied embeddings, 4-bit linears with an 8-bit embedding) models, written
//! by the reference script, loaded by both sides. Logits of a prefill and
//! of several decode steps must match, alone and inside a batch.
//!
//! Skips with a message when the reference is not installed
//! (`cargo xtask setup --references`, which `cargo xtask ci` runs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod model_support;

use std::path::Path;

use backend_mlx::ModelDType;
use batching_types::{Backend, RequestId, StepItem, WorkKind};
use model_support::{greedy, load, python_reference, run_reference, Tables, TempDir};
use serde_json::Value;

/// One prompt's reference: the greedy token and logits of each step.
struct Reference {
    prompt: Vec<u32>,
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![1, 2, 3, 4, 5, 6, 7],
        vec![200, 17],
        (0..45).map(|i| (i * 11 + 3) % 256).collect(),
    ]
}

fn reference(dir: &Path, steps: usize) -> Option<Vec<Reference>> {
    let prompts_path = dir.join("prompts.json");
    let out_path = dir.join("reference.json");
    std::fs::write(&prompts_path, serde_json::to_string(&prompts()).unwrap()).unwrap();
    let cmd = python_reference()?;
    run_reference(
        cmd,
        &[
            "logits",
            dir.to_str().unwrap(),
            prompts_path.to_str().unwrap(),
            out_path.to_str().unwrap(),
            "--steps",
            &steps.to_string(),
            "--full-logits",
        ],
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(out_path).unwrap()).unwrap();
    Some(
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| Reference {
                prompt: serde_json::from_value(r["prompt"].clone()).unwrap(),
                tokens: r["steps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["token"].as_u64().unwrap() as u32)
                    .collect(),
                logits: r["steps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| serde_json::from_value(s["logits"].clone()).unwrap())
                    .collect(),
            })
            .collect(),
    )
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs every reference prompt through the backend in one batch (chunked
/// prefill, then decodes that feed the reference's greedy tokens) and
/// checks each step's logits within `tol`.
fn check(dir: &Path, refs: &[Reference], dtype: ModelDType, tol: f32) {
    let mut backend = load(dir, Some(dtype));
    let ids: Vec<RequestId> = (0..refs.len() as u64).map(RequestId::from).collect();
    for (id, r) in ids.iter().zip(refs) {
        backend.add_sequence(*id, &r.prompt, &greedy()).unwrap();
    }
    let mut prefilled = vec![0usize; refs.len()];
    let mut produced = vec![0usize; refs.len()];
    let mut worst = 0f32;
    let mut tables = Tables::default();
    while produced.iter().zip(refs).any(|(&n, r)| n < r.tokens.len()) {
        let mut items = Vec::new();
        for (i, r) in refs.iter().enumerate() {
            if produced[i] >= r.tokens.len() {
                continue;
            }
            let kind = if prefilled[i] < r.prompt.len() {
                WorkKind::Prefill {
                    len: 16.min(r.prompt.len() - prefilled[i]),
                }
            } else {
                WorkKind::Decode
            };
            items.push(StepItem { id: ids[i], kind });
        }
        let plan = tables.plan(items);
        let out = backend.step(&plan).unwrap();
        for (item, result) in plan.items.iter().zip(out.results) {
            let i = item.id.seq() as usize;
            if let WorkKind::Prefill { len } = item.kind {
                prefilled[i] += len;
            }
            if let batching_types::SequenceOutcome::Token(t) = result.outcome {
                let step = produced[i];
                let ours = backend.last_logits(item.id).unwrap();
                let diff = max_abs_diff(ours, &refs[i].logits[step]);
                worst = worst.max(diff);
                assert!(
                    diff <= tol,
                    "prompt {i} step {step}: logits differ by {diff} (> {tol})"
                );
                assert_eq!(
                    t, refs[i].tokens[step],
                    "prompt {i} step {step}: greedy token"
                );
                produced[i] += 1;
            }
        }
    }
    eprintln!("{dtype:?}: worst logit difference {worst:e}");
}

fn make_tiny(dir: &Path, arch: &str, quantize: bool) -> Option<()> {
    let cmd = python_reference()?;
    let mut args = vec![
        "make-tiny",
        dir.to_str().unwrap(),
        "--arch",
        arch,
        "--seed",
        "3",
    ];
    if quantize {
        args.push("--quantize");
    }
    run_reference(cmd, &args);
    Some(())
}

#[test]
fn tiny_llama_with_llama3_rope_matches_mlx_lm() {
    let dir = TempDir::new("oracle-llama");
    if make_tiny(&dir.0, "llama", false).is_none() {
        return;
    }
    let Some(refs) = reference(&dir.0, 6) else {
        return;
    };
    check(&dir.0, &refs, ModelDType::F32, 1e-4);
}

#[test]
fn tiny_quantized_qwen2_matches_mlx_lm() {
    let dir = TempDir::new("oracle-qwen2");
    if make_tiny(&dir.0, "qwen2", true).is_none() {
        return;
    }
    let Some(refs) = reference(&dir.0, 6) else {
        return;
    };
    // Kept quantized: the same kernels as mlx-lm.
    check(&dir.0, &refs, ModelDType::Native, 1e-4);
    // Dequantized to f32 at load (the CPU default): a matmul with the
    // dequantized weights matches the quantized one closely.
    check(&dir.0, &refs, ModelDType::F32, 1e-4);
}
