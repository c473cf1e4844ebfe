//! Clear errors for broken model folders and bad step items: each names
//! the file and the tensor or field at fault.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod model_support;

use std::collections::HashMap;

use backend_mlx::{BackendError, Device, LoadOptions, MlxBackend};
use batching_types::{Backend, RequestId, SequenceOutcome, StepItem, StepPlan, WorkKind};
use mlx_rs::Array;
use model_support::{greedy, load, write_tiny_model, Tables, TempDir, TinySpec};

fn try_load(dir: &std::path::Path) -> Result<MlxBackend, BackendError> {
    MlxBackend::load(&LoadOptions {
        device: Device::Cpu,
        kv_tokens: Some(4096),
        ..LoadOptions::new(dir)
    })
}

/// Rewrites the model's safetensors with `edit` applied to its tensors.
fn edit_weights(dir: &std::path::Path, edit: impl FnOnce(&mut HashMap<String, Array>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = Array::load_safetensors(&path).unwrap();
    // Read everything before the file is overwritten (loading is lazy).
    mlx_rs::transforms::eval(tensors.values()).unwrap();
    edit(&mut tensors);
    Array::save_safetensors(tensors.iter().map(|(k, v)| (k.as_str(), v)), None, &path).unwrap();
}

fn tiny() -> TempDir {
    let dir = TempDir::new("errors");
    write_tiny_model(&dir.0, &TinySpec::default());
    dir
}

#[test]
fn a_missing_tensor_names_the_tensor() {
    let dir = tiny();
    edit_weights(&dir.0, |t| {
        t.remove("model.layers.1.mlp.down_proj.weight");
    });
    let err = try_load(&dir.0).unwrap_err().to_string();
    assert!(err.contains("model.layers.1.mlp.down_proj.weight"), "{err}");
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn a_shape_mismatch_names_file_tensor_and_shapes() {
    let dir = tiny();
    edit_weights(&dir.0, |t| {
        t.insert(
            "model.layers.0.self_attn.k_proj.weight".into(),
            Array::from_slice(&vec![0f32; 64 * 48], &[48, 64]),
        );
    });
    let err = try_load(&dir.0).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.weight"),
        "{err}"
    );
    assert!(
        err.contains("[48, 64]") && err.contains("[32, 64]"),
        "{err}"
    );
}

#[test]
fn a_corrupt_file_names_the_file() {
    let dir = tiny();
    let path = dir.0.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    // Cut in the data section: the header is intact, the data short.
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = try_load(&dir.0).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    // Cut in the header.
    std::fs::write(&path, &bytes[..20]).unwrap();
    let err = try_load(&dir.0).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn an_unknown_architecture_or_missing_folder_is_refused() {
    let dir = tiny();
    let cfg = std::fs::read_to_string(dir.0.join("config.json")).unwrap();
    std::fs::write(
        dir.0.join("config.json"),
        cfg.replace("\"llama\"", "\"mamba\""),
    )
    .unwrap();
    let err = try_load(&dir.0).unwrap_err().to_string();
    assert!(
        err.contains("mamba") && err.contains("config.json"),
        "{err}"
    );
    let err = try_load(&dir.0.join("nope")).unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn bad_items_fail_alone_and_the_rest_of_the_step_runs() {
    let dir = tiny();
    let mut backend = load(&dir.0, None);
    backend
        .add_sequence(RequestId::from(1), &[1, 2, 3], &greedy())
        .unwrap();
    backend
        .add_sequence(RequestId::from(2), &[4, 5], &greedy())
        .unwrap();
    assert!(backend
        .add_sequence(RequestId::from(2), &[4], &greedy())
        .is_err());
    assert!(backend
        .add_sequence(RequestId::from(3), &[], &greedy())
        .is_err());
    assert!(backend
        .add_sequence(RequestId::from(4), &[999], &greedy())
        .is_err());
    let mut tables = Tables::default();
    let plan = tables.plan(vec![
        StepItem {
            id: RequestId::from(1),
            kind: WorkKind::Prefill { len: 2 },
        },
        StepItem {
            id: RequestId::from(2),
            kind: WorkKind::Prefill { len: 5 },
        },
        StepItem {
            id: RequestId::from(9),
            kind: WorkKind::Decode,
        },
    ]);
    let out = backend.step(&plan).unwrap();
    assert_eq!(out.results[0].outcome, SequenceOutcome::Pending);
    assert!(matches!(&out.results[1].outcome, SequenceOutcome::Failed(m) if m.contains("past")));
    assert!(
        matches!(&out.results[2].outcome, SequenceOutcome::Failed(m) if m.contains("not registered"))
    );
    // Decoding before the prefill finished is refused; finishing it works.
    let decode_item = StepItem {
        id: RequestId::from(1),
        kind: WorkKind::Decode,
    };
    let decode = tables.plan(vec![decode_item]);
    assert!(matches!(
        backend.step(&decode).unwrap().results[0].outcome,
        SequenceOutcome::Failed(_)
    ));
    let finish = tables.plan(vec![StepItem {
        id: RequestId::from(1),
        kind: WorkKind::Prefill { len: 1 },
    }]);
    assert!(matches!(
        backend.step(&finish).unwrap().results[0].outcome,
        SequenceOutcome::Token(_)
    ));
    let decode = tables.plan(vec![decode_item]);
    assert!(matches!(
        backend.step(&decode).unwrap().results[0].outcome,
        SequenceOutcome::Token(_)
    ));
    // A table that does not reach the token being written fails that item.
    let short = StepPlan {
        items: vec![decode_item],
        block_tables: vec![vec![]],
    };
    assert!(
        matches!(&backend.step(&short).unwrap().results[0].outcome, SequenceOutcome::Failed(m) if m.contains("block table"))
    );
    backend.release(RequestId::from(1));
    backend.release(RequestId::from(1));
    assert_eq!(backend.num_sequences(), 1);
}
