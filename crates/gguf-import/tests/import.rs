//! Imports synthetic GGUF files and checks the output against llama.cpp's
//! formulas, written independently in `support`.
//!
//! JSON snapshots sort object keys: a workspace build turns on serde_json's
//! `preserve_order` (the `prompt` crate and llguidance ask for it), so the
//! key order of a parsed `Value` depends on which crates are built together.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;

use gguf_import::{import_gguf, ImportConfig, ImportReport};
use half::f16;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use support::tiny_model::{self, Spec, F16, F32, Q4_0, Q4_1, Q8_0};

fn import(spec: &Spec, keep_quantized: bool, dir: &Path) -> ImportReport {
    let built = tiny_model::build(spec);
    let gguf = dir.join("tiny.gguf");
    std::fs::write(&gguf, built.writer.to_bytes()).unwrap();
    import_gguf(&ImportConfig {
        gguf,
        out_dir: dir.join("out"),
        keep_quantized,
    })
    .unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The values of HF weight `name` as MLX would compute them.
fn values(st: &SafeTensors<'_>, name: &str) -> (Vec<f32>, Dtype) {
    let module = name.strip_suffix(".weight").unwrap();
    let w = st.tensor(name).unwrap();
    match st.tensor(&format!("{module}.scales")) {
        Ok(scales) => {
            let biases = st.tensor(&format!("{module}.biases")).unwrap();
            assert_eq!(w.dtype(), Dtype::U32);
            assert_eq!(scales.dtype(), Dtype::F16);
            assert_eq!(biases.shape(), scales.shape());
            let rows = w.shape()[0];
            let groups = scales.shape()[1];
            let cols = groups * 32;
            let bits = w.shape()[1] * 32 / cols;
            let v = support::mlx_dequantize(
                w.data(),
                scales.data(),
                biases.data(),
                rows,
                cols,
                bits,
                32,
            );
            (v, Dtype::U32)
        }
        Err(_) => {
            let v = match w.dtype() {
                Dtype::F32 => w
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::F16 => w
                    .data()
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                other => panic!("unexpected dtype {other:?} for {name}"),
            };
            (v, w.dtype())
        }
    }
}

fn check_all(spec: &Spec, keep_quantized: bool) -> ImportReport {
    let dir = tempfile::tempdir().unwrap();
    let report = import(spec, keep_quantized, dir.path());
    let bytes = std::fs::read(dir.path().join("out/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let built = tiny_model::build(spec);
    for (name, expected) in &built.expected {
        let (got, _) = values(&st, name);
        assert_eq!(&got, expected, "{name} with spec {spec:?}");
    }
    // Nothing but the expected weights (and their scales/biases) is written.
    for name in st.names() {
        let base = name
            .strip_suffix(".scales")
            .or_else(|| name.strip_suffix(".biases"))
            .map(|m| format!("{m}.weight"))
            .unwrap_or_else(|| name.to_string());
        assert!(
            built.expected.contains_key(&base),
            "unexpected tensor {name}"
        );
    }
    report
}

#[test]
fn every_supported_type_imports_to_llama_cpp_values() {
    for (linear, embed) in [
        (F32, F16),
        (F16, F32),
        (Q8_0, Q4_0),
        (Q4_0, Q8_0),
        (Q4_1, Q4_1),
    ] {
        for tied in [true, false] {
            let spec = Spec {
                linear,
                embed,
                tied,
                ..Spec::default()
            };
            let report = check_all(&spec, true);
            assert_eq!(report.tie_word_embeddings, tied);
            assert!(
                report.dequantized.is_empty(),
                "{spec:?}: {:?}",
                report.dequantized
            );
        }
    }
}

#[test]
fn quantized_tensors_stay_quantized_and_dense_ones_keep_their_dtype() {
    let dir = tempfile::tempdir().unwrap();
    import(&Spec::default(), true, dir.path());
    let bytes = std::fs::read(dir.path().join("out/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let q = st.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    // 64 rows of 64 four-bit values: 8 words per row, 2 groups of 32.
    assert_eq!(q.shape(), [64, 8]);
    let s = st.tensor("model.layers.0.self_attn.q_proj.scales").unwrap();
    assert_eq!(s.shape(), [64, 2]);
    let e = st.tensor("model.embed_tokens.weight").unwrap();
    // Eight-bit values: 4 per word.
    assert_eq!(e.shape(), [262, 16]);
    let n = st.tensor("model.norm.weight").unwrap();
    assert_eq!((n.dtype(), n.shape()), (Dtype::F32, &[64][..]));
    // The weights get the same permissions as the JSON files.
    let mode = |f: &str| {
        std::fs::metadata(dir.path().join("out").join(f))
            .unwrap()
            .permissions()
    };
    assert_eq!(mode("model.safetensors"), mode("config.json"));
}

#[test]
fn keep_quantized_false_writes_everything_dense_with_the_same_values() {
    let report = check_all(&Spec::default(), false);
    assert_eq!(report.quantized_modules, 0);
    assert!(report.quantization.is_none());
    assert_eq!(report.dequantized.len(), 2 * 7 + 1);
}

#[test]
fn inexact_scales_fall_back_to_dense_with_exact_values() {
    // Scales above 8188 make Q4_0's bias (-8 d) overflow f16, and above 512
    // make Q8_0's (-128 d) overflow: those tensors must be written dense.
    for (linear, embed) in [(Q4_0, Q8_0), (Q8_0, Q4_0)] {
        let spec = Spec {
            linear,
            embed,
            scale: 12000.0,
            ..Spec::default()
        };
        let report = check_all(&spec, true);
        assert_eq!(report.quantized_modules, 0, "{spec:?}");
        assert_eq!(report.dequantized.len(), 2 * 7 + 1);
    }
    // Q4_1 stores its bias directly, so it is always exact.
    let spec = Spec {
        linear: Q4_1,
        embed: Q4_1,
        scale: 12000.0,
        ..Spec::default()
    };
    assert!(check_all(&spec, true).dequantized.is_empty());
}

#[test]
fn config_json_follows_hugging_face_and_mlx_lm() {
    let dir = tempfile::tempdir().unwrap();
    let report = import(&Spec::default(), true, dir.path());
    let config = read_json(&dir.path().join("out/config.json"));
    insta::with_settings!({sort_maps => true}, {
        insta::assert_json_snapshot!("config_q4_1_q8_0_tied", config);
    });
    assert_eq!(report.quantization.as_ref(), Some(&config["quantization"]));
    let names: Vec<_> = report
        .files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json"
        ]
    );
}

#[test]
fn untied_mixed_model_has_lm_head_and_per_module_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec {
        linear: Q4_0,
        embed: Q8_0,
        tied: false,
        layers: 1,
        ..Spec::default()
    };
    import(&spec, true, dir.path());
    let config = read_json(&dir.path().join("out/config.json"));
    assert_eq!(config["tie_word_embeddings"], false);
    insta::with_settings!({sort_maps => true}, {
        insta::assert_json_snapshot!("quantization_untied", config["quantization"]);
    });
}

#[test]
fn tokenizer_files_load_and_tokenize() {
    let dir = tempfile::tempdir().unwrap();
    import(&Spec::default(), true, dir.path());
    let out = dir.path().join("out");
    insta::with_settings!({sort_maps => true}, {
        insta::assert_json_snapshot!(
            "tokenizer_config",
            read_json(&out.join("tokenizer_config.json"))
        );
    });
    insta::with_settings!({sort_maps => true}, {
        insta::assert_json_snapshot!(
            "generation_config",
            read_json(&out.join("generation_config.json"))
        );
    });
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let (tokens, _, _) = tiny_model::vocab();
    let id = |t: &str| tokens.iter().position(|x| x == t).unwrap() as u32;
    let enc = tok.encode("<|im_start|>the 42<|im_end|>", false).unwrap();
    // "the" has no leading space so only "he" merges; " 42" splits into a
    // lone space and one token per digit.
    assert_eq!(
        enc.get_ids(),
        [1, id("t"), id("he"), id("Ġ"), id("4"), id("2"), 2]
    );
    let enc = tok.encode(" the", false).unwrap();
    assert_eq!(enc.get_ids(), [id("Ġthe")]);
    for text in ["hello world", "naïve café ✓ 😀", "a\n\tb  c 1234"] {
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    }
    // Special tokens are skipped when asked to.
    assert_eq!(tok.decode(&[1, id("Ġthe"), 2], true).unwrap(), " the");
}
