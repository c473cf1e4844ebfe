//! Malformed and hostile GGUF files: every one must give an error that
//! names the file (and the tensor where there is one), never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;

use gguf_import::gguf::GgufFile;
use gguf_import::{import_gguf, ImportConfig, ImportError};
use proptest::prelude::*;
use support::gguf_writer::{GgufWriter, Val};
use support::tiny_model::{self, Spec};

fn tiny() -> GgufWriter {
    tiny_model::build(&Spec {
        layers: 1,
        ..Spec::default()
    })
    .writer
}

fn import_bytes(bytes: &[u8], dir: &Path) -> Result<(), ImportError> {
    let gguf = dir.join("model.gguf");
    std::fs::write(&gguf, bytes).unwrap();
    import_gguf(&ImportConfig {
        gguf,
        out_dir: dir.join("out"),
        ..ImportConfig::default()
    })
    .map(|_| ())
}

/// Imports `bytes` and returns the error message, which must name the file.
fn error_of(bytes: &[u8]) -> (ImportError, String) {
    let dir = tempfile::tempdir().unwrap();
    let err = import_bytes(bytes, dir.path()).expect_err("import should fail");
    let msg = err.to_string();
    assert!(
        msg.contains("model.gguf"),
        "message does not name the file: {msg}"
    );
    (err, msg)
}

#[test]
fn the_unmodified_file_imports() {
    let dir = tempfile::tempdir().unwrap();
    import_bytes(&tiny().to_bytes(), dir.path()).unwrap();
}

#[test]
fn bad_magic() {
    let mut bytes = tiny().to_bytes();
    bytes[0] = b'X';
    let (err, msg) = error_of(&bytes);
    assert!(
        matches!(err, ImportError::Malformed { offset: 0, .. }),
        "{msg}"
    );
    assert!(msg.contains("magic"), "{msg}");
}

#[test]
fn unsupported_version() {
    let mut bytes = tiny().to_bytes();
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    let (err, _) = error_of(&bytes);
    assert!(matches!(
        err,
        ImportError::UnsupportedVersion { version: 1, .. }
    ));
}

#[test]
fn bogus_counts_are_rejected_before_allocating() {
    for at in [8usize, 16] {
        let mut bytes = tiny().to_bytes();
        bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let (err, msg) = error_of(&bytes);
        assert!(matches!(err, ImportError::Malformed { .. }), "{msg}");
        assert!(msg.contains("cannot fit"), "{msg}");
    }
    // A huge array length inside the metadata.
    let mut w = tiny();
    w.kv("general.huge", Val::StrArray(vec!["x".into()]));
    let mut bytes = w.to_bytes();
    let key = b"general.huge";
    let pos = bytes.windows(key.len()).position(|win| win == key).unwrap();
    // Key, value type (array), element type (string), then the count.
    let count_at = pos + key.len() + 8;
    bytes[count_at..count_at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let (_, msg) = error_of(&bytes);
    assert!(
        msg.contains("general.huge") && msg.contains("cannot fit"),
        "{msg}"
    );
}

#[test]
fn every_truncation_fails_cleanly() {
    let bytes = tiny().to_bytes();
    let path = Path::new("model.gguf");
    let data_start =
        usize::try_from(GgufFile::parse(path, bytes.clone()).unwrap().data_offset).unwrap();
    // Every cut inside the header and metadata, then a sample of cuts in
    // the tensor data (each parse copies the file, so all would be slow).
    let cuts = (0..data_start).chain((data_start..bytes.len()).step_by(61));
    for len in cuts {
        let err = GgufFile::parse(path, bytes[..len].to_vec()).expect_err("truncated");
        assert!(err.to_string().contains("model.gguf"));
    }
    let (err, msg) = error_of(&bytes[..bytes.len() - 1]);
    // The last tensor's data is cut short, so the error names it.
    assert!(matches!(err, ImportError::BadTensor { .. }), "{msg}");
    assert!(
        msg.contains("output_norm.weight") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let mut w = tiny();
    w.tensors.retain(|t| t.name != "blk.0.ffn_down.weight");
    let (err, msg) = error_of(&w.to_bytes());
    assert!(matches!(err, ImportError::MissingTensor { .. }), "{msg}");
    assert!(msg.contains("blk.0.ffn_down.weight"), "{msg}");
}

#[test]
fn unexpected_tensor_is_named() {
    let mut w = tiny();
    let mut extra = w.tensors[1].clone();
    extra.name = "blk.7.attn_q.weight".into();
    w.tensors.push(extra);
    let (err, msg) = error_of(&w.to_bytes());
    assert!(matches!(err, ImportError::UnknownTensor { .. }), "{msg}");
    assert!(msg.contains("blk.7.attn_q.weight"), "{msg}");
}

#[test]
fn unknown_architecture() {
    let mut w = tiny();
    w.kv("general.architecture", Val::Str("gpt9".into()));
    let (err, msg) = error_of(&w.to_bytes());
    assert!(
        matches!(err, ImportError::UnknownArchitecture { .. }),
        "{msg}"
    );
    assert!(msg.contains("gpt9"), "{msg}");
}

#[test]
fn shape_mismatch_is_named() {
    let mut w = tiny();
    w.kv("llama.feed_forward_length", Val::U32(128));
    let (err, msg) = error_of(&w.to_bytes());
    assert!(matches!(err, ImportError::ShapeMismatch { .. }), "{msg}");
    assert!(msg.contains("blk.0.ffn_gate.weight"), "{msg}");
}

#[test]
fn unsupported_tensor_type_is_named() {
    let mut w = tiny();
    // Q5_0 (type 6) is a real ggml type this importer does not convert.
    w.tensors[1].ggml_type = 6;
    let name = w.tensors[1].name.clone();
    let (err, msg) = error_of(&w.to_bytes());
    assert!(
        matches!(err, ImportError::UnsupportedTensorType { ggml_type: 6, .. }),
        "{msg}"
    );
    assert!(msg.contains(&name), "{msg}");
}

#[test]
fn missing_metadata_is_named() {
    let mut w = tiny();
    w.kvs.retain(|(k, _)| k != "llama.embedding_length");
    let (err, msg) = error_of(&w.to_bytes());
    assert!(matches!(err, ImportError::MissingMetadata { .. }), "{msg}");
    assert!(msg.contains("llama.embedding_length"), "{msg}");
}

#[test]
fn bad_alignment_is_rejected() {
    let mut w = tiny();
    w.alignment = Some(24);
    let (err, msg) = error_of(&w.to_bytes());
    assert!(matches!(err, ImportError::BadMetadata { .. }), "{msg}");
    assert!(msg.contains("general.alignment"), "{msg}");
}

#[test]
fn a_custom_alignment_is_honoured() {
    let mut w = tiny();
    w.alignment = Some(64);
    let dir = tempfile::tempdir().unwrap();
    import_bytes(&w.to_bytes(), dir.path()).unwrap();
}

#[test]
fn unsupported_tokenizers_are_refused() {
    let mut w = tiny();
    w.kv("tokenizer.ggml.pre", Val::Str("qwen2".into()));
    let (err, msg) = error_of(&w.to_bytes());
    assert!(matches!(err, ImportError::Tokenizer { .. }), "{msg}");
    assert!(msg.contains("qwen2"), "{msg}");
    let mut w = tiny();
    w.kv("tokenizer.ggml.model", Val::Str("llama".into()));
    let (err, _) = error_of(&w.to_bytes());
    assert!(matches!(err, ImportError::Tokenizer { .. }));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random byte changes anywhere in the header and metadata, plus an
    /// optional truncation, either import or fail with a message naming the
    /// file; they never panic.
    #[test]
    fn mutations_never_panic(
        edits in prop::collection::vec((0usize..4096, any::<u8>()), 1..8),
        cut in prop::option::of(0usize..100_000),
    ) {
        let mut bytes = tiny().to_bytes();
        let header_len = bytes.len().min(4096);
        for (at, v) in edits {
            let at = at % header_len;
            bytes[at] = v;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        let dir = tempfile::tempdir().unwrap();
        if let Err(e) = import_bytes(&bytes, dir.path()) {
            prop_assert!(e.to_string().contains("model.gguf"), "{}", e);
        }
    }

    /// Counts, lengths and dimensions set to extreme values in the tensor
    /// info table are caught by the reader.
    #[test]
    fn extreme_words_in_the_header_never_panic(
        at in 0usize..4096,
        word in prop::sample::select(vec![0u64, 1, u64::MAX, u64::MAX / 2, 1 << 40, u32::MAX as u64]),
    ) {
        let mut bytes = tiny().to_bytes();
        let at = at % (bytes.len().min(4096) - 8);
        bytes[at..at + 8].copy_from_slice(&word.to_le_bytes());
        let _ = GgufFile::parse(Path::new("model.gguf"), bytes);
    }
}
