//! Helpers shared by the model tests: random tiny models written from Rust,
//! the Python reference (when installed), and a greedy driver.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
};

use backend_mlx::{Device, LoadOptions, MlxBackend, ModelDType};
use batching_types::{
    Backend, KvBlocks, RequestId, SamplingParams, SequenceOutcome, StepItem, StepPlan, WorkKind,
};
use mlx_rs::{random, Array};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh temporary folder under the target dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "backend-mlx-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The shape of a random tiny model.
pub struct TinySpec {
    pub model_type: &'static str,
    pub hidden: i32,
    pub layers: i32,
    pub heads: i32,
    pub kv_heads: i32,
    pub intermediate: i32,
    pub vocab: i32,
    pub tied: bool,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            model_type: "llama",
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 128,
            vocab: 256,
            tied: false,
            seed: 1,
        }
    }
}

/// Writes a random f32 Llama/Qwen2 model (config.json + model.safetensors)
/// into `dir`. Weights are large enough that greedy tokens vary.
pub fn write_tiny_model(dir: &Path, spec: &TinySpec) {
    let mut counter = 0u64;
    let mut normal = |shape: &[i32], std: f32, mean: f32| -> Array {
        counter += 1;
        let k = random::key(spec.seed.wrapping_mul(1_000_003).wrapping_add(counter)).unwrap();
        let a = random::normal::<f32>(shape, None, None, &k).unwrap();
        a.multiply(Array::from_f32(std))
            .unwrap()
            .add(Array::from_f32(mean))
            .unwrap()
    };
    let hd = spec.hidden / spec.heads;
    let qkv_bias = spec.model_type == "qwen2";
    let mut tensors: HashMap<String, Array> = HashMap::new();
    tensors.insert(
        "model.embed_tokens.weight".into(),
        normal(&[spec.vocab, spec.hidden], 0.5, 0.0),
    );
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        let mut put = |name: String, shape: &[i32], std: f32, mean: f32| {
            let a = normal(shape, std, mean);
            tensors.insert(name, a);
        };
        put(
            format!("{p}.input_layernorm.weight"),
            &[spec.hidden],
            0.1,
            1.0,
        );
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[spec.hidden],
            0.1,
            1.0,
        );
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[spec.heads * hd, spec.hidden],
            0.12,
            0.0,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[spec.kv_heads * hd, spec.hidden],
            0.12,
            0.0,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            &[spec.kv_heads * hd, spec.hidden],
            0.12,
            0.0,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[spec.hidden, spec.heads * hd],
            0.12,
            0.0,
        );
        if qkv_bias {
            put(
                format!("{p}.self_attn.q_proj.bias"),
                &[spec.heads * hd],
                0.1,
                0.0,
            );
            put(
                format!("{p}.self_attn.k_proj.bias"),
                &[spec.kv_heads * hd],
                0.1,
                0.0,
            );
            put(
                format!("{p}.self_attn.v_proj.bias"),
                &[spec.kv_heads * hd],
                0.1,
                0.0,
            );
        }
        put(
            format!("{p}.mlp.gate_proj.weight"),
            &[spec.intermediate, spec.hidden],
            0.12,
            0.0,
        );
        put(
            format!("{p}.mlp.up_proj.weight"),
            &[spec.intermediate, spec.hidden],
            0.12,
            0.0,
        );
        put(
            format!("{p}.mlp.down_proj.weight"),
            &[spec.hidden, spec.intermediate],
            0.12,
            0.0,
        );
    }
    tensors.insert("model.norm.weight".into(), normal(&[spec.hidden], 0.1, 1.0));
    if !spec.tied {
        tensors.insert(
            "lm_head.weight".into(),
            normal(&[spec.vocab, spec.hidden], 0.3, 0.0),
        );
    }
    Array::save_safetensors(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        None,
        dir.join("model.safetensors"),
    )
    .unwrap();
    let config = serde_json::json!({
        "model_type": spec.model_type,
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "intermediate_size": spec.intermediate,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": spec.vocab,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "tie_word_embeddings": spec.tied,
        "eos_token_id": 0,
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
}

/// Tokens per KV block in these tests.
pub const BLOCK_SIZE: usize = 16;
/// KV tokens the tests' backends hold.
pub const KV_TOKENS: usize = 32_768;

/// Loads a model folder on the CPU, with its KV pool configured.
pub fn load(dir: &Path, dtype: Option<ModelDType>) -> MlxBackend {
    let mut backend = MlxBackend::load(&LoadOptions {
        device: Device::Cpu,
        dtype,
        kv_tokens: Some(KV_TOKENS),
        ..LoadOptions::new(dir)
    })
    .unwrap();
    backend
        .configure_kv(KvBlocks {
            block_size: BLOCK_SIZE,
            num_blocks: KV_TOKENS / BLOCK_SIZE,
        })
        .unwrap();
    backend
}

/// Block tables for driving a backend directly, as the scheduler would:
/// each sequence gets free blocks as it grows and gives them back when
/// forgotten. Tables never shrink, so a refused item only over-reserves.
#[derive(Default)]
pub struct Tables {
    held: HashMap<RequestId, (Vec<u32>, usize)>,
    free: Vec<u32>,
    next: u32,
}

impl Tables {
    /// A plan of `items` with a table for each that covers the step.
    pub fn plan(&mut self, items: Vec<StepItem>) -> StepPlan {
        let mut block_tables = Vec::with_capacity(items.len());
        for item in &items {
            let (table, len) = self.held.entry(item.id).or_default();
            *len += item.kind.tokens();
            while table.len() * BLOCK_SIZE < *len {
                let block = self.free.pop().unwrap_or_else(|| {
                    self.next += 1;
                    self.next - 1
                });
                table.push(block);
            }
            block_tables.push(table.clone());
        }
        StepPlan {
            items,
            block_tables,
        }
    }

    /// Gives a released sequence's blocks back.
    pub fn forget(&mut self, id: RequestId) {
        if let Some((table, _)) = self.held.remove(&id) {
            self.free.extend(table);
        }
    }
}

/// Greedy sampling.
pub fn greedy() -> SamplingParams {
    SamplingParams::default()
}

/// Runs `prompts` to `steps` new tokens each, all in one batch: one step
/// prefills every prompt in chunks of at most `chunk` tokens (mixed with
/// the decodes of sequences that are already running), then decodes.
/// Sequence `i` starts after `i * stagger` steps, so lengths differ and
/// sequences join a running batch.
pub fn generate_batched(
    backend: &mut MlxBackend,
    prompts: &[Vec<u32>],
    steps: usize,
    chunk: usize,
    stagger: usize,
    sampling: &SamplingParams,
) -> Vec<Vec<u32>> {
    struct S {
        id: RequestId,
        prefilled: usize,
        out: Vec<u32>,
        added: bool,
    }
    let mut seqs: Vec<S> = (0..prompts.len())
        .map(|i| S {
            id: RequestId::from(1000 + i as u64),
            prefilled: 0,
            out: Vec::new(),
            added: false,
        })
        .collect();
    let mut step = 0;
    let mut tables = Tables::default();
    while seqs.iter().any(|s| s.out.len() < steps) {
        let mut items = Vec::new();
        for (i, s) in seqs.iter_mut().enumerate() {
            if step < i * stagger || s.out.len() >= steps {
                continue;
            }
            if !s.added {
                backend.add_sequence(s.id, &prompts[i], sampling).unwrap();
                s.added = true;
            }
            let kind = if s.prefilled < prompts[i].len() {
                let len = chunk.min(prompts[i].len() - s.prefilled);
                WorkKind::Prefill { len }
            } else {
                WorkKind::Decode
            };
            items.push(StepItem { id: s.id, kind });
        }
        if !items.is_empty() {
            let plan = tables.plan(items);
            let out = backend.step(&plan).unwrap();
            assert_eq!(out.results.len(), plan.items.len());
            for (item, r) in plan.items.iter().zip(out.results) {
                let s = seqs.iter_mut().find(|s| s.id == item.id).unwrap();
                if let WorkKind::Prefill { len } = item.kind {
                    s.prefilled += len;
                }
                match r.outcome {
                    SequenceOutcome::Token(t) => s.out.push(t),
                    SequenceOutcome::Pending => {}
                    SequenceOutcome::Failed(m) => panic!("{} failed: {m}", item.id),
                }
                if s.out.len() >= steps {
                    backend.release(s.id);
                    tables.forget(s.id);
                }
            }
        }
        step += 1;
    }
    seqs.into_iter().map(|s| s.out).collect()
}

/// The Python interpreter with mlx-lm on its path, or `None` (with a
/// message) when the reference is not installed.
pub fn python_reference() -> Option<Command> {
    let site = workspace_root().join(".mlx/python");
    if !site.join("mlx_lm").is_dir() {
        eprintln!(
            "SKIPPED: the Python reference is not installed; run \
             `cargo xtask setup --references` (`cargo xtask ci` does)"
        );
        assert!(
            std::env::var_os("MLX_BATCH_REQUIRE_REFERENCES").is_none(),
            "MLX_BATCH_REQUIRE_REFERENCES is set, so this may not be skipped"
        );
        return None;
    }
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", site);
    cmd.arg(workspace_root().join("crates/backend-mlx/tests/oracle/reference.py"));
    Some(cmd)
}

/// Runs the reference script with `args`; panics with its stderr on failure.
pub fn run_reference(mut cmd: Command, args: &[&str]) {
    let out = cmd.args(args).output().unwrap();
    assert!(
        out.status.success(),
        "reference.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
