//! Batching invariance on random tiny models: a sequence decoded alone and
//! decoded beside others of different lengths (joining and leaving, with
//! chunked prefills mixed into decode steps) produces the same tokens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod model_support;

use backend_mlx::ModelDType;
use batching_types::{
    Backend, RequestId, SamplingParams, SequenceOutcome, StepItem, StepPlan, WorkKind,
};
use model_support::{
    generate_batched, greedy, load, write_tiny_model, TempDir, TinySpec, BLOCK_SIZE,
};

fn prompts() -> Vec<Vec<u32>> {
    // Eight prompts of different lengths (3 to 40 tokens).
    (0..8u32)
        .map(|i| {
            let len = 3 + (i * 37 % 38) as usize;
            (0..len as u32)
                .map(|j| (i * 31 + j * 7 + 1) % 256)
                .collect()
        })
        .collect()
}

fn alone(dir: &std::path::Path, prompt: &[u32], steps: usize, s: &SamplingParams) -> Vec<u32> {
    let mut backend = load(dir, None);
    generate_batched(&mut backend, &[prompt.to_vec()], steps, 1 << 20, 0, s).remove(0)
}

#[test]
fn greedy_tokens_do_not_depend_on_the_batch() {
    let dir = TempDir::new("batching");
    write_tiny_model(&dir.0, &TinySpec::default());
    let prompts = prompts();
    let steps = 12;
    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| alone(&dir.0, p, steps, &greedy()))
        .collect();
    // Greedy output must not be one repeated token, or the test proves
    // little.
    assert!(
        solo.iter().any(|t| t.iter().any(|&x| x != t[0])),
        "{solo:?}"
    );

    let mut backend = load(&dir.0, None);
    // Chunks of 5 tokens and staggered starts: sequences join while others
    // decode, prefill chunks share steps with decodes, and short sequences
    // leave while long ones run.
    let together = generate_batched(&mut backend, &prompts, steps, 5, 2, &greedy());
    assert_eq!(together, solo);
    assert_eq!(backend.num_sequences(), 0);
    // The pool keeps its blocks (they hold the prefix cache), but never
    // more than the blocks used plus one growth step.
    assert!(backend.kv_allocated_bytes() > 0);
    assert!(backend.kv_allocated_bytes() <= (64 + 128) * backend.kv_block_bytes());
}

#[test]
fn a_cached_prefix_gives_the_tokens_of_computing_it() {
    let dir = TempDir::new("prefix");
    write_tiny_model(&dir.0, &TinySpec::default());
    let shared: Vec<u32> = (0..2 * BLOCK_SIZE as u32)
        .map(|j| (j * 13 + 5) % 256)
        .collect();
    let first: Vec<u32> = shared.iter().copied().chain([7, 8, 9]).collect();
    let second: Vec<u32> = shared.iter().copied().chain([40, 41]).collect();
    let steps = 6;
    let solo = alone(&dir.0, &second, steps, &greedy());

    let mut backend = load(&dir.0, None);
    let decode = |id| StepItem {
        id: RequestId::from(id),
        kind: WorkKind::Decode,
    };
    // The first sequence writes the shared blocks 0 and 1, then leaves.
    backend
        .add_sequence(RequestId::from(1), &first, &greedy())
        .unwrap();
    let plan = StepPlan {
        items: vec![StepItem {
            id: RequestId::from(1),
            kind: WorkKind::Prefill { len: first.len() },
        }],
        block_tables: vec![vec![0, 1, 2]],
    };
    backend.step(&plan).unwrap();
    backend.release(RequestId::from(1));
    // The second reads them and computes only its own two tokens, in a
    // block of its own.
    backend
        .add_sequence(RequestId::from(2), &second, &greedy())
        .unwrap();
    backend
        .use_cached_prefix(RequestId::from(2), shared.len())
        .unwrap();
    let table = vec![0, 1, 5];
    let mut tokens = vec![];
    let mut plan = StepPlan {
        items: vec![StepItem {
            id: RequestId::from(2),
            kind: WorkKind::Prefill { len: 2 },
        }],
        block_tables: vec![table.clone()],
    };
    for _ in 0..steps {
        let out = backend.step(&plan).unwrap();
        match &out.results[0].outcome {
            SequenceOutcome::Token(t) => tokens.push(*t),
            other => panic!("{other:?}"),
        }
        plan = StepPlan {
            items: vec![decode(2)],
            block_tables: vec![table.clone()],
        };
    }
    assert_eq!(tokens, solo);
    // A prefix that is not whole blocks, or the whole context, is refused.
    backend
        .add_sequence(RequestId::from(3), &second, &greedy())
        .unwrap();
    assert!(backend.use_cached_prefix(RequestId::from(3), 5).is_err());
    assert!(backend
        .use_cached_prefix(RequestId::from(3), second.len() + 14)
        .is_err());
}

#[test]
fn seeded_sampling_is_reproducible_inside_a_batch() {
    let dir = TempDir::new("seeded");
    write_tiny_model(
        &dir.0,
        &TinySpec {
            model_type: "qwen2",
            tied: true,
            seed: 5,
            ..TinySpec::default()
        },
    );
    let sampling = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        top_k: Some(40),
        seed: Some(1234),
        ..Default::default()
    };
    let prompts = prompts();
    let solo = alone(&dir.0, &prompts[3], 10, &sampling);
    let mut backend = load(&dir.0, Some(ModelDType::F32));
    let together = generate_batched(&mut backend, &prompts, 10, 7, 1, &sampling);
    assert_eq!(together[3], solo);
    // Other seeds give other tokens: the seed, not the prompt alone, drives
    // the draw.
    let other = alone(
        &dir.0,
        &prompts[3],
        10,
        &SamplingParams {
            seed: Some(99),
            ..sampling.clone()
        },
    );
    assert_ne!(other, solo);
}

#[test]
fn a_preempted_sequence_recomputes_the_same_tokens() {
    let dir = TempDir::new("preempt");
    write_tiny_model(&dir.0, &TinySpec::default());
    let sampling = SamplingParams {
        temperature: 0.8,
        seed: Some(7),
        ..Default::default()
    };
    let prompt: Vec<u32> = (1..20).collect();
    let full = alone(&dir.0, &prompt, 10, &sampling);
    // Generate 4, "preempt", then re-add prompt + those 4 and continue.
    let first = alone(&dir.0, &prompt, 4, &sampling);
    assert_eq!(first, full[..4]);
    let mut context = prompt.clone();
    context.extend_from_slice(&first);
    let rest = alone(&dir.0, &context, 6, &sampling);
    assert_eq!(rest, full[4..]);
}

/// A one-token prompt first, on a fresh model, then a long one: MLX's
/// shapeless compiled functions must not keep a trace specialised to a span
/// of one (that wrote past its outputs and crashed the server).
#[test]
fn a_one_token_prompt_first_leaves_later_steps_exact() {
    let dir = TempDir::new("one-token-first");
    write_tiny_model(&dir.0, &TinySpec::default());
    let long: Vec<u32> = (0..40u32).map(|j| (j * 13 + 5) % 256).collect();
    let expected = alone(&dir.0, &long, 6, &greedy());
    let mut backend = load(&dir.0, None);
    let first = generate_batched(&mut backend, &[vec![7]], 3, 1 << 20, 0, &greedy());
    assert_eq!(first[0].len(), 3);
    let after = generate_batched(
        &mut backend,
        std::slice::from_ref(&long),
        6,
        1 << 20,
        0,
        &greedy(),
    );
    assert_eq!(after[0], expected);
}

/// Generates `steps` tokens for one sequence whose context ends with
/// `generated` tokens of its own earlier output (a recomputation).
fn resume(
    dir: &std::path::Path,
    context: &[u32],
    generated: usize,
    steps: usize,
    sampling: &SamplingParams,
) -> Vec<u32> {
    let mut backend = load(dir, None);
    let id = RequestId::from(1);
    backend.add_sequence(id, context, sampling).unwrap();
    backend.mark_generated(id, generated).unwrap();
    let mut tables = model_support::Tables::default();
    let mut out = Vec::new();
    let mut kind = WorkKind::Prefill { len: context.len() };
    while out.len() < steps {
        let plan = tables.plan(vec![StepItem { id, kind }]);
        let result = backend.step(&plan).unwrap().results.remove(0);
        match result.outcome {
            SequenceOutcome::Token(t) => out.push(t),
            other => panic!("{other:?}"),
        }
        kind = WorkKind::Decode;
    }
    out
}

#[test]
fn penalties_and_logit_bias_give_the_same_tokens_after_a_preemption() {
    let dir = TempDir::new("penalties");
    write_tiny_model(&dir.0, &TinySpec::default());
    let banned = 5u32;
    let sampling = SamplingParams {
        temperature: 0.9,
        seed: Some(11),
        presence_penalty: 0.5,
        frequency_penalty: 1.5,
        repetition_penalty: 1.3,
        logit_bias: vec![(banned, -100.0)],
        ..Default::default()
    };
    let prompt: Vec<u32> = (1..20).collect();
    let full = alone(&dir.0, &prompt, 12, &sampling);
    assert!(!full.contains(&banned), "{full:?}");
    let mut context = prompt.clone();
    context.extend_from_slice(&full[..5]);
    assert_eq!(resume(&dir.0, &context, 5, 7, &sampling), full[5..]);
    // Without telling the backend which tokens were generated, the
    // penalties would count differently, so the check above can fail.
    let plain_penalties = SamplingParams {
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        repetition_penalty: 1.0,
        ..sampling.clone()
    };
    assert_ne!(
        alone(&dir.0, &prompt, 12, &plain_penalties),
        full,
        "the penalties change the output"
    );
}
