//! Imports a Llama-family GGUF file (as llama.cpp writes it) into a Hugging
//! Face / mlx-community style model folder: `model.safetensors`,
//! `config.json`, `tokenizer.json`, `tokenizer_config.json` and
//! `generation_config.json`.
//!
//! The main design decision is to keep the weights *exactly* as the GGUF
//! stores them, with no float round trip. ggml's Q4_0, Q4_1 and Q8_0 blocks
//! are affine quantizations with 32 values per group, which is what MLX's
//! quantized format is, so their bits are repacked, not re-quantized: the
//! imported model computes the same weights llama.cpp does. Exactness is
//! checked per block (see [`quant`]); a tensor that MLX cannot represent
//! exactly is dequantized instead, never approximated.
//!
//! The crate is pure Rust and does not depend on MLX, so that the setup
//! tool can import the default model before MLX is installed. The GGUF
//! parser treats its input as hostile: every count is bounded by the file
//! size before anything is allocated, and every failure is an
//! [`ImportError`] naming the file (and the tensor, where there is one).
//!
//! The whole GGUF is read into memory and the converted tensors are held
//! until the single `model.safetensors` is written, so an import needs about
//! twice the model's size in memory (about 200 MiB for the default model);
//! that keeps the code free of `unsafe` memory mapping, and is fine for the
//! small models this project imports. Sharded output is not written.

mod config;
mod error;
pub mod gguf;
mod meta;
mod names;
mod output;
pub mod permute;
pub mod quant;
pub mod tensor;
mod tokenizer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

pub use config::LlamaParams;
pub use error::ImportError;
use gguf::{GgufFile, TensorInfo};
use meta::Meta;
use names::Role;
use quant::Converted;
use tensor::RawTensor;

/// The importer's version, recorded by callers that cache imported models
/// so that a newer importer re-imports them.
pub const IMPORTER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The name of the weights file in the output folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// What to import and where.
#[derive(Debug, Clone)]
pub struct ImportConfig {
    /// The GGUF file to read.
    pub gguf: PathBuf,
    /// The folder to write; created if missing, files in it overwritten.
    pub out_dir: PathBuf,
    /// Keep quantized tensors quantized where MLX represents them exactly
    /// (the default). When false every tensor is written dense.
    pub keep_quantized: bool,
}

impl Default for ImportConfig {
    fn default() -> Self {
        Self {
            gguf: PathBuf::new(),
            out_dir: PathBuf::new(),
            keep_quantized: true,
        }
    }
}

/// What an import produced.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The folder written.
    pub out_dir: PathBuf,
    /// Every file written, in the order written.
    pub files: Vec<PathBuf>,
    /// The model's hyperparameters.
    pub params: LlamaParams,
    /// Whether the output projection shares the embedding's weights.
    pub tie_word_embeddings: bool,
    /// Modules written in MLX's quantized format.
    pub quantized_modules: usize,
    /// Tensors written as dense floats.
    pub dense_tensors: usize,
    /// GGUF tensors that were quantized but had to be written dense because
    /// MLX cannot represent them exactly (or `keep_quantized` was false).
    pub dequantized: Vec<String>,
    /// The `quantization` entry written to `config.json`, if any.
    pub quantization: Option<Value>,
    /// Size of the weights file in bytes.
    pub weights_bytes: u64,
}

/// Imports `config.gguf` into `config.out_dir`.
pub fn import_gguf(config: &ImportConfig) -> Result<ImportReport, ImportError> {
    let file = GgufFile::open(&config.gguf)?;
    let path = file.path().to_path_buf();
    let meta = Meta {
        path: &path,
        map: &file.metadata,
    };
    let arch = meta.str("general.architecture")?;
    if arch != "llama" {
        return Err(ImportError::UnknownArchitecture {
            path: path.clone(),
            architecture: arch.to_owned(),
        });
    }
    let n_tokens = meta.opt_strings("tokenizer.ggml.tokens")?.map(|t| t.len());
    let params = LlamaParams::from_meta(&meta, n_tokens)?;
    let tok = tokenizer::build(&meta, params.max_position_embeddings)?;
    if tok.vocab_size > params.vocab_size {
        return Err(ImportError::Tokenizer {
            path: path.clone(),
            reason: format!(
                "{} tokens for a vocabulary of {}",
                tok.vocab_size, params.vocab_size
            ),
        });
    }

    let by_role = map_tensors(&file, &params)?;
    let tied = !by_role.contains_key(&(Role::LmHead, 0));

    let mut weights = BTreeMap::new();
    let mut modules = BTreeMap::new();
    let mut report_dense = 0;
    let mut dequantized = Vec::new();
    for ((role, layer), info) in &by_role {
        let module = role.hf_module(*layer);
        let converted = convert_tensor(&file, info, *role, &params, config.keep_quantized)?;
        match converted {
            Converted::Quantized {
                weight,
                scales,
                biases,
                bits,
                group_size,
            } => {
                weights.insert(format!("{module}.weight"), weight);
                weights.insert(format!("{module}.scales"), scales);
                weights.insert(format!("{module}.biases"), biases);
                modules.insert(module, (bits, group_size));
            }
            Converted::Dense {
                tensor,
                dequantized_from,
            } => {
                if dequantized_from.is_some() {
                    dequantized.push(info.name.clone());
                }
                weights.insert(format!("{module}.weight"), tensor);
                report_dense += 1;
            }
        }
    }
    let quantization = quantization_entry(&modules);

    let out = &config.out_dir;
    std::fs::create_dir_all(out).map_err(|e| ImportError::io(out, e))?;
    let mut files = Vec::new();
    let weights_path = out.join(WEIGHTS_FILE);
    output::write_safetensors(&weights_path, &weights)?;
    drop(weights);
    let weights_bytes = std::fs::metadata(&weights_path)
        .map_err(|e| ImportError::io(&weights_path, e))?
        .len();
    files.push(weights_path);

    let mut generation = Map::new();
    for (key, id) in [
        ("bos_token_id", params.bos_token_id),
        ("eos_token_id", params.eos_token_id),
        (
            "pad_token_id",
            meta.opt_usize("tokenizer.ggml.padding_token_id")?,
        ),
    ] {
        if let Some(id) = id {
            generation.insert(key.into(), json!(id));
        }
    }
    for (name, value) in [
        (
            "config.json",
            params.config_json(tied, quantization.clone()),
        ),
        ("tokenizer.json", tok.tokenizer),
        ("tokenizer_config.json", tok.config),
        ("generation_config.json", Value::Object(generation)),
    ] {
        let p = out.join(name);
        output::write_json(&p, &value)?;
        files.push(p);
    }
    // The safetensors writer creates its file owner-only; give the weights
    // the same permissions as the other files, which follow the umask.
    let config_path = out.join("config.json");
    let perms = std::fs::metadata(&config_path)
        .map_err(|e| ImportError::io(&config_path, e))?
        .permissions();
    let weights_path = out.join(WEIGHTS_FILE);
    std::fs::set_permissions(&weights_path, perms)
        .map_err(|e| ImportError::io(&weights_path, e))?;

    Ok(ImportReport {
        out_dir: out.clone(),
        files,
        params,
        tie_word_embeddings: tied,
        quantized_modules: modules.len(),
        dense_tensors: report_dense,
        dequantized,
        quantization,
        weights_bytes,
    })
}

/// Assigns every tensor in the file a role and checks that none is missing
/// or unexpected.
fn map_tensors<'f>(
    file: &'f GgufFile,
    params: &LlamaParams,
) -> Result<BTreeMap<(Role, usize), &'f TensorInfo>, ImportError> {
    let path = file.path();
    let mut by_role = BTreeMap::new();
    for info in &file.tensors {
        match names::parse(&info.name) {
            Some((role, layer)) if layer < params.num_hidden_layers => {
                by_role.insert((role, layer), info);
            }
            _ => {
                return Err(ImportError::UnknownTensor {
                    path: path.to_path_buf(),
                    tensor: info.name.clone(),
                })
            }
        }
    }
    let required = [(Role::Embed, 0), (Role::FinalNorm, 0)]
        .into_iter()
        .chain((0..params.num_hidden_layers).flat_map(|l| Role::PER_LAYER.map(|r| (r, l))));
    for (role, layer) in required {
        if !by_role.contains_key(&(role, layer)) {
            return Err(ImportError::MissingTensor {
                path: path.to_path_buf(),
                tensor: role.gguf_name(layer),
            });
        }
    }
    Ok(by_role)
}

/// The row-major shape a tensor must have.
fn expected_shape(role: Role, p: &LlamaParams) -> Vec<u64> {
    let q = p.num_attention_heads * p.head_dim;
    let kv = p.num_key_value_heads * p.head_dim;
    let (h, i, v) = (p.hidden_size, p.intermediate_size, p.vocab_size);
    let shape = match role {
        Role::Embed | Role::LmHead => vec![v, h],
        Role::FinalNorm | Role::AttnNorm | Role::FfnNorm => vec![h],
        Role::Query => vec![q, h],
        Role::Key | Role::Value => vec![kv, h],
        Role::Output => vec![h, q],
        Role::Gate | Role::Up => vec![i, h],
        Role::Down => vec![h, i],
    };
    shape.into_iter().map(|d| d as u64).collect()
}

/// Checks, converts and (for queries and keys) un-permutes one tensor.
fn convert_tensor(
    file: &GgufFile,
    info: &TensorInfo,
    role: Role,
    params: &LlamaParams,
    keep_quantized: bool,
) -> Result<Converted, ImportError> {
    let path = file.path();
    let expected = expected_shape(role, params);
    let found = info.row_major_shape();
    if found != expected {
        return Err(ImportError::ShapeMismatch {
            path: path.to_path_buf(),
            tensor: info.name.clone(),
            expected,
            found,
        });
    }
    let bad = |reason: String| ImportError::BadTensor {
        path: path.to_path_buf(),
        tensor: info.name.clone(),
        reason,
    };
    // The shape matches hyperparameters that were each checked to fit in
    // `usize`, so the conversion cannot fail; it is still checked.
    let shape = found
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let data = file.tensor_data(info)?;
    let converted = quant::convert(
        info.ggml_type,
        data,
        &shape,
        keep_quantized && role.quantizable(),
    )
    .map_err(|f| bad(f.0))?;
    let heads = match role {
        Role::Query => params.num_attention_heads,
        Role::Key => params.num_key_value_heads,
        _ => return Ok(converted),
    };
    let unpermute = |t: &RawTensor| {
        permute::unpermute_rows(t, heads).ok_or_else(|| {
            bad(format!(
                "rows do not split into {heads} heads of an even size"
            ))
        })
    };
    Ok(match converted {
        Converted::Quantized {
            weight,
            scales,
            biases,
            bits,
            group_size,
        } => Converted::Quantized {
            weight: unpermute(&weight)?,
            scales: unpermute(&scales)?,
            biases: unpermute(&biases)?,
            bits,
            group_size,
        },
        Converted::Dense {
            tensor,
            dequantized_from,
        } => Converted::Dense {
            tensor: unpermute(&tensor)?,
            dequantized_from,
        },
    })
}

/// mlx-lm's `quantization` entry: the most common `(bits, group_size)` as
/// the default, and an entry keyed by module path for every quantized
/// module that differs from it. mlx-lm quantizes a module when its path has
/// an entry or, failing that, when `<path>.scales` is among the weights, so
/// dense modules need no entry.
fn quantization_entry(modules: &BTreeMap<String, (u32, u32)>) -> Option<Value> {
    let mut counts: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    for q in modules.values() {
        *counts.entry(*q).or_default() += 1;
    }
    // Ties go to the smaller bit width, so the choice is deterministic.
    let (bits, group) = counts
        .iter()
        .max_by_key(|(q, n)| (**n, std::cmp::Reverse(**q)))
        .map(|(q, _)| *q)?;
    let mut entry = Map::new();
    entry.insert("group_size".into(), json!(group));
    entry.insert("bits".into(), json!(bits));
    for (module, (b, g)) in modules {
        if (*b, *g) != (bits, group) {
            entry.insert(module.clone(), json!({"group_size": g, "bits": b}));
        }
    }
    Some(Value::Object(entry))
}

/// Convenience for callers that only have paths.
pub fn import_file(gguf: &Path, out_dir: &Path) -> Result<ImportReport, ImportError> {
    import_gguf(&ImportConfig {
        gguf: gguf.to_path_buf(),
        out_dir: out_dir.to_path_buf(),
        ..ImportConfig::default()
    })
}
