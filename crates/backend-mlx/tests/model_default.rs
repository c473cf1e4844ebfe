//! The default model (`cargo xtask setup` imports it into
//! `.models/SmolLM2-135M-Instruct`): tokenizer and chat template, sensible
//! greedy text, and numerics against mlx-lm on the same weights. Skips with
//! a message when the model (or, for the oracle part, mlx-lm) is absent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod model_support;

use std::path::PathBuf;

use backend_mlx::{ModelDType, ModelInfo};
use batching_types::{Backend, RequestId, SequenceOutcome, StepItem, WorkKind};
use model_support::{
    generate_batched, greedy, load, python_reference, run_reference, workspace_root, Tables,
    TempDir,
};
use prompt::{ChatMessage, Tokenizer};

fn model_dir() -> Option<PathBuf> {
    let dir = workspace_root().join(".models/SmolLM2-135M-Instruct");
    if dir.join("config.json").is_file() {
        Some(dir)
    } else {
        eprintln!("SKIPPED: the default model is absent; run `cargo xtask setup`");
        assert!(
            std::env::var_os("MLX_BATCH_REQUIRE_REFERENCES").is_none(),
            "MLX_BATCH_REQUIRE_REFERENCES is set, so this may not be skipped"
        );
        None
    }
}

const PROMPTS: [&str; 3] = [
    "Once upon a time, there was a little",
    "The capital of France is",
    "def fibonacci(n):",
];

#[test]
fn info_and_tokenizer_describe_the_default_model() {
    let Some(dir) = model_dir() else { return };
    let info = ModelInfo::read(&dir).unwrap();
    assert_eq!(info.name, "SmolLM2-135M-Instruct");
    assert_eq!(info.architecture, "llama");
    assert_eq!((info.max_context, info.vocab_size), (8192, 49152));
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    assert!(
        tok.eos_token_ids().contains(&2),
        "{:?}",
        tok.eos_token_ids()
    );
    assert_eq!(tok.vocab_size(), 49152);
    let ids = tok.encode("Hello world 123").unwrap();
    // Digits are split one by one by this tokenizer's pre-tokenizer.
    assert_eq!(tok.decode(&ids).unwrap(), "Hello world 123");
    assert!(ids.len() >= 5, "{ids:?}");
    let prompt = tok
        .apply_chat_template(&[ChatMessage::new("user", "Hi there")], &[], true)
        .unwrap();
    assert!(
        prompt.contains("<|im_start|>user\nHi there<|im_end|>"),
        "{prompt}"
    );
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
    let chat_ids = tok.encode(&prompt).unwrap();
    assert_eq!(chat_ids[0], 1, "<|im_start|> is one special token");
}

#[test]
fn greedy_text_is_sensible_and_streams_cleanly() {
    let Some(dir) = model_dir() else { return };
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    let mut backend = load(&dir, None);
    let prompt = tok.encode(PROMPTS[0]).unwrap();
    let out = generate_batched(&mut backend, &[prompt], 12, 512, 0, &greedy()).remove(0);
    let mut stream = tok.decode_stream();
    let mut streamed = String::new();
    for &t in &out {
        if let Some(piece) = stream.push(t).unwrap() {
            streamed.push_str(&piece);
        }
    }
    if let Some(rest) = stream.flush().unwrap() {
        streamed.push_str(&rest);
    }
    assert_eq!(streamed, tok.decode(&out).unwrap());
    let text = streamed.to_lowercase();
    assert!(
        text.contains("girl") || text.contains("boy") || text.contains("named"),
        "unexpected continuation: {streamed:?}"
    );
}

#[test]
fn default_model_matches_mlx_lm() {
    let Some(dir) = model_dir() else { return };
    let Some(cmd) = python_reference() else {
        return;
    };
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| tok.encode(p).unwrap()).collect();
    let tmp = TempDir::new("default-oracle");
    let prompts_path = tmp.0.join("prompts.json");
    let out_path = tmp.0.join("reference.json");
    std::fs::write(&prompts_path, serde_json::to_string(&prompts).unwrap()).unwrap();
    let steps = 6;
    run_reference(
        cmd,
        &[
            "logits",
            dir.to_str().unwrap(),
            prompts_path.to_str().unwrap(),
            out_path.to_str().unwrap(),
            "--steps",
            &steps.to_string(),
        ],
    );
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_path).unwrap()).unwrap();

    // Kept 4-bit (the same kernels as mlx-lm) and dequantized to f32 (mlx-lm
    // rounds the 8-bit embedding to f16 on the way, hence the looser bound).
    for (dtype, tol) in [(ModelDType::Native, 5e-4f32), (ModelDType::F32, 5e-2)] {
        let mut backend = load(&dir, Some(dtype));
        let mut worst = 0f32;
        for (i, p) in prompts.iter().enumerate() {
            backend
                .add_sequence(RequestId::from(i as u64), p, &greedy())
                .unwrap();
        }
        let mut tables = Tables::default();
        let mut items: Vec<StepItem> = (0..prompts.len())
            .map(|i| StepItem {
                id: RequestId::from(i as u64),
                kind: WorkKind::Prefill {
                    len: prompts[i].len(),
                },
            })
            .collect();
        for step in 0..=steps {
            let plan = tables.plan(items.clone());
            let out = backend.step(&plan).unwrap();
            for (i, r) in out.results.iter().enumerate() {
                let reference = &refs[i]["steps"][step];
                let SequenceOutcome::Token(t) = r.outcome else {
                    panic!("{:?}", r.outcome)
                };
                assert_eq!(
                    t,
                    reference["token"].as_u64().unwrap() as u32,
                    "{dtype:?} prompt {i} step {step}"
                );
                let ours = backend.last_logits(r.id).unwrap();
                let ids: Vec<usize> = serde_json::from_value(reference["top_ids"].clone()).unwrap();
                let logits: Vec<f32> =
                    serde_json::from_value(reference["top_logits"].clone()).unwrap();
                let diff = ids
                    .iter()
                    .zip(&logits)
                    .map(|(&id, &l)| (ours[id] - l).abs())
                    .fold(0.0, f32::max);
                assert!(
                    diff <= tol,
                    "{dtype:?} prompt {i} step {step}: top logits differ by {diff}"
                );
                worst = worst.max(diff);
            }
            items.iter_mut().for_each(|it| it.kind = WorkKind::Decode);
        }
        eprintln!("{dtype:?}: worst top-64 logit difference {worst:e}");
    }
}

/// One tokenizer for every proptest case: loading it is the slow part.
fn shared_tokenizer() -> Option<&'static Tokenizer> {
    static TOKENIZER: std::sync::OnceLock<Option<Tokenizer>> = std::sync::OnceLock::new();
    TOKENIZER
        .get_or_init(|| model_dir().map(|d| Tokenizer::from_model_dir(d).unwrap()))
        .as_ref()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Streaming never splits a character: the pieces concatenate to the
    /// full decode, and none holds a replacement character the full text
    /// lacks (a half-emitted UTF-8 sequence would).
    #[test]
    fn streamed_pieces_concatenate_to_the_full_decode(text in "[a-zé漢字🙂 \\n0-9]{0,40}") {
        let Some(tok) = shared_tokenizer() else { return Ok(()) };
        let ids = tok.encode(&text).unwrap();
        let mut stream = tok.decode_stream();
        let mut pieces = Vec::new();
        for &id in &ids {
            if let Some(p) = stream.push(id).unwrap() {
                pieces.push(p);
            }
        }
        if let Some(p) = stream.flush().unwrap() {
            pieces.push(p);
        }
        let full = tok.decode(&ids).unwrap();
        proptest::prop_assert_eq!(pieces.concat(), full.clone());
        proptest::prop_assert_eq!(full.clone(), text);
        for p in &pieces {
            proptest::prop_assert!(!p.contains('\u{FFFD}'), "{:?} in {:?}", p, full);
        }
    }
}
