//! Imports the real default model when it is present (after
//! `cargo xtask setup`, or at `$MLX_BATCH_MODEL_GGUF`) and checks it against
//! the published facts about SmolLM2-135M-Instruct. Without the file the
//! tests print why they skip and pass.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

mod support;

use gguf_import::gguf::GgufFile;
use gguf_import::{import_gguf, ImportConfig};
use safetensors::SafeTensors;
use serde_json::Value;

/// Texts covering spaces, digits, punctuation, scripts, emoji and the
/// special tokens.
const TEXTS: [&str; 22] = [
    "Hello, world!",
    "  leading spaces and trailing ",
    "tabs\tand\nnewlines\n\n\nend",
    "numbers 1234567890 and 3.14159",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "naïve café résumé",
    "日本語のテキストです。",
    "emoji 😀👍🏽 and ✓",
    "Ünïcödé Ελληνικά Привет мир",
    "fn main() { println!(\"hi {}\", 42); }",
    "don't you're we'll I'd they've",
    "   ",
    "a",
    "mixed123abc456def",
    "<|endoftext|>",
    "http://example.com/path?x=1&y=2#frag",
    "The year 2024 had 366 days.",
    "    def f(x):\n        return x ** 2\n",
    "¿Qué tal? ¡Muy bien!",
    "Once upon a time, there was a little",
    "$100.00 + 15% = $115.00",
    "x\r\ny",
];

fn gguf_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MLX_BATCH_MODEL_GGUF") {
        return Some(PathBuf::from(p));
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.models/download/SmolLM2-135M-Instruct.Q4_1.gguf");
    local.is_file().then_some(local)
}

/// Imports the real model once per test binary into a folder under
/// cargo's per-test temporary directory, shared by the tests.
fn imported() -> Option<(PathBuf, PathBuf)> {
    static IMPORTED: OnceLock<Option<(PathBuf, PathBuf)>> = OnceLock::new();
    IMPORTED.get_or_init(import_once).clone()
}

fn import_once() -> Option<(PathBuf, PathBuf)> {
    let Some(gguf) = gguf_path() else {
        eprintln!("skipped: no real model (run `cargo xtask setup` or set MLX_BATCH_MODEL_GGUF)");
        assert!(
            std::env::var_os("MLX_BATCH_REQUIRE_REFERENCES").is_none(),
            "MLX_BATCH_REQUIRE_REFERENCES is set, so this may not be skipped"
        );
        return None;
    };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gguf-import-real-model");
    let started = std::time::Instant::now();
    let report = import_gguf(&ImportConfig {
        gguf: gguf.clone(),
        out_dir: dir.clone(),
        ..ImportConfig::default()
    })
    .unwrap();
    eprintln!(
        "imported {} in {:.2} s: {} bytes of weights, {} quantized modules, {} dense tensors",
        gguf.display(),
        started.elapsed().as_secs_f64(),
        report.weights_bytes,
        report.quantized_modules,
        report.dense_tensors
    );
    assert!(report.dequantized.is_empty(), "{:?}", report.dequantized);
    Some((gguf, dir))
}

#[test]
fn real_model_config_matches_the_published_facts() {
    let Some((_, dir)) = imported() else { return };
    let c: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(c["hidden_size"], 576);
    assert_eq!(c["intermediate_size"], 1536);
    assert_eq!(c["num_hidden_layers"], 30);
    assert_eq!(c["num_attention_heads"], 9);
    assert_eq!(c["num_key_value_heads"], 3);
    assert_eq!(c["head_dim"], 64);
    assert_eq!(c["vocab_size"], 49152);
    assert_eq!(c["max_position_embeddings"], 8192);
    assert_eq!(c["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["bos_token_id"], 1);
    assert_eq!(c["eos_token_id"], 2);
    // Linear layers are Q4_1 (4-bit), the embedding Q8_0 (8-bit).
    assert_eq!(
        c["quantization"],
        serde_json::json!({"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}})
    );
}

/// Dequantizes real tensors from the GGUF with llama.cpp's formulas (in
/// `support`), undoes the q/k permutation, and compares with MLX's formula
/// applied to the imported weights: every value must be identical.
#[test]
fn real_model_weights_match_llama_cpp_exactly() {
    let Some((gguf, dir)) = imported() else {
        return;
    };
    let file = GgufFile::open(&gguf).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let cases = [
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj",
            Some(9),
            4,
        ),
        (
            "blk.29.attn_k.weight",
            "model.layers.29.self_attn.k_proj",
            Some(3),
            4,
        ),
        (
            "blk.7.ffn_down.weight",
            "model.layers.7.mlp.down_proj",
            None,
            4,
        ),
        ("token_embd.weight", "model.embed_tokens", None, 8),
    ];
    for (gguf_name, module, heads, bits) in cases {
        let info = file.tensor(gguf_name).unwrap();
        let (cols, rows) = (info.dims[0] as usize, info.dims[1] as usize);
        let data = file.tensor_data(info).unwrap();
        let block = if bits == 4 { 20 } else { 34 };
        let stored: Vec<f32> = data
            .chunks_exact(block)
            .flat_map(|b| {
                if bits == 4 {
                    support::ref_q4_1(b)
                } else {
                    support::ref_q8_0(b)
                }
            })
            .collect();
        let mut expected = vec![0.0f32; rows * cols];
        let order: Vec<usize> = match heads {
            Some(h) => support::llama_cpp_permutation(rows, h),
            None => (0..rows).collect(),
        };
        for (g, &hf) in order.iter().enumerate() {
            expected[hf * cols..(hf + 1) * cols].copy_from_slice(&stored[g * cols..(g + 1) * cols]);
        }
        let t = |s: &str| st.tensor(&format!("{module}.{s}")).unwrap();
        let got = support::mlx_dequantize(
            t("weight").data(),
            t("scales").data(),
            t("biases").data(),
            rows,
            cols,
            bits,
            32,
        );
        assert!(got == expected, "{gguf_name} differs");
    }
}

#[test]
fn real_model_tokenizer_tokenizes_like_smollm2() {
    let Some((_, dir)) = imported() else { return };
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), 49152);
    let ids = |t: &str| tok.encode(t, false).unwrap().get_ids().to_vec();
    assert_eq!(ids("<|im_start|>"), [1]);
    assert_eq!(ids("<|im_end|>"), [2]);
    assert_eq!(ids("<|endoftext|>"), [0]);
    // Every digit is its own token.
    let digits = ids("1234567890");
    assert_eq!(digits.len(), 10);
    for (d, id) in "1234567890".chars().zip(&digits) {
        assert_eq!(tok.id_to_token(*id).unwrap(), d.to_string());
    }
    // No BOS is added.
    assert_eq!(ids("Hello").len(), 1);
    for text in TEXTS {
        let enc = ids(text);
        assert_eq!(tok.decode(&enc, false).unwrap(), text, "{text:?}");
    }
}

/// Compares our encodings with Hugging Face `transformers` reading the same
/// GGUF (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`). Needs
/// `python3` with `transformers`, `tokenizers` and `gguf` importable (for
/// example through `PYTHONPATH`); skips with a message otherwise.
#[test]
fn real_model_tokenizer_matches_transformers() {
    let Some((gguf, dir)) = imported() else {
        return;
    };
    let script = r#"
import json, os, sys
try:
    import torch  # noqa: F401  (transformers' GGUF reader imports it)
    import gguf  # noqa: F401
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoTokenizer
except Exception as e:
    print("MISSING", e)
    sys.exit(0)
# Only the tokenizer is read, which needs no particular torch version.
gguf_utils.is_torch_available = lambda: True
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
texts = json.loads(sys.stdin.read())
print(json.dumps([tok.encode(t, add_special_tokens=False) for t in texts]))
"#;
    let mut child = match Command::new("python3")
        .args(["-c", script])
        .arg(&gguf)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipped: cannot run python3: {e}");
            return;
        }
    };
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(serde_json::to_string(&TEXTS).unwrap().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Some(why) = stdout.lines().find_map(|l| l.strip_prefix("MISSING")) {
        eprintln!("skipped: python packages missing:{why}");
        return;
    }
    assert!(out.status.success(), "python failed: {stdout}");
    let reference: Vec<Vec<u32>> = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let mut mismatches = Vec::new();
    for (text, want) in TEXTS.iter().zip(&reference) {
        let got = tok.encode(*text, false).unwrap().get_ids().to_vec();
        if &got != want {
            mismatches.push(format!("{text:?}: ours {got:?}, transformers {want:?}"));
        }
    }
    eprintln!(
        "transformers reference: {} of {} texts identical",
        TEXTS.len() - mismatches.len(),
        TEXTS.len()
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
