//! `config.json`: the model's shape, RoPE and quantization settings.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::error::BackendError;

/// The architectures that share this forward pass (RMSNorm, RoPE, SwiGLU,
/// grouped-query attention), by `model_type`.
const SUPPORTED: [&str; 3] = ["llama", "mistral", "qwen2"];

/// How positions are scaled before the rotary embedding.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE. Dynamic NTK scaling is plain RoPE within the trained
    /// context, which is also the longest context this backend accepts.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f32,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// How much longer the new context is.
        factor: f32,
        /// Wavelengths above `original / low` are scaled by `factor`.
        low_freq_factor: f32,
        /// Wavelengths below `original / high` are kept.
        high_freq_factor: f32,
        /// The context the model was first trained with.
        original_max_position_embeddings: f32,
    },
}

/// One quantization setting: MLX's affine quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct QuantSpec {
    /// Values per scale/bias pair.
    pub group_size: i32,
    /// Bits per value.
    pub bits: i32,
}

/// Where a model folder's files are; what the config names.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `model_type` from `config.json`.
    pub architecture: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than queries).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Whether RoPE rotates interleaved pairs (GPT-J style).
    pub rope_traditional: bool,
    /// Position scaling.
    pub rope_scaling: RopeScaling,
    /// Longest supported sequence.
    pub max_position_embeddings: usize,
    /// Whether q/k/v projections have biases (Qwen2) ...
    pub attention_bias: bool,
    /// ... and whether the MLP has them.
    pub mlp_bias: bool,
    /// `None` means "tied unless the weights contain `lm_head.weight`".
    pub tie_word_embeddings: Option<bool>,
    /// The default quantization of linear layers, if the folder is
    /// MLX-quantized.
    pub quantization: Option<QuantSpec>,
    /// Per-module overrides (`"model.embed_tokens": {...}`), mlx-lm style;
    /// `None` for a module means it is not quantized.
    pub quantization_overrides: BTreeMap<String, Option<QuantSpec>>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    #[serde(default)]
    rope_traditional: bool,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: bool,
    tie_word_embeddings: Option<bool>,
    quantization: Option<serde_json::Value>,
    quantization_config: Option<serde_json::Value>,
}

impl ModelConfig {
    /// Reads and checks `dir/config.json`.
    pub fn read(dir: &Path) -> Result<Self, BackendError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| BackendError::Io {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, &path)
    }

    /// Parses the text of a `config.json`; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, BackendError> {
        let err = |message: String| BackendError::Config {
            path: path.to_path_buf(),
            message,
        };
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
        let architecture = raw
            .model_type
            .ok_or_else(|| err("missing field `model_type`".into()))?;
        if !SUPPORTED.contains(&architecture.as_str()) {
            return Err(err(format!(
                "unsupported architecture {architecture:?}: this backend runs {}",
                SUPPORTED.join(", ")
            )));
        }
        let need = |v: Option<usize>, name: &str| -> Result<usize, BackendError> {
            match v {
                Some(0) => Err(err(format!("`{name}` must be positive"))),
                Some(v) => Ok(v),
                None => Err(err(format!("missing field `{name}`"))),
            }
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = need(
            raw.num_key_value_heads.or(Some(num_heads)),
            "num_key_value_heads",
        )?;
        if num_heads % num_kv_heads != 0 {
            return Err(err(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let head_dim = need(raw.head_dim.or(Some(hidden_size / num_heads)), "head_dim")?;
        let rope_theta = raw.rope_theta.unwrap_or(if architecture == "qwen2" {
            1_000_000.0
        } else {
            10_000.0
        });
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(2048);
        let rope_scaling = parse_rope_scaling(raw.rope_scaling.as_ref()).map_err(err)?;
        let (quantization, quantization_overrides) = parse_quantization(
            raw.quantization
                .as_ref()
                .or(raw.quantization_config.as_ref()),
        )
        .map_err(err)?;
        Ok(Self {
            // Qwen2 always has q/k/v biases; Llama and Mistral have them
            // only when `attention_bias` says so.
            attention_bias: raw.attention_bias.unwrap_or(architecture == "qwen2"),
            architecture,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_traditional: raw.rope_traditional,
            rope_scaling,
            max_position_embeddings,
            mlp_bias: raw.mlp_bias,
            tie_word_embeddings: raw.tie_word_embeddings,
            quantization,
            quantization_overrides,
        })
    }

    /// The quantization of the module whose weight is `module.weight`
    /// (`module` without the `.weight` suffix).
    pub fn quantization_for(&self, module: &str) -> Option<QuantSpec> {
        match self.quantization_overrides.get(module) {
            Some(spec) => *spec,
            None => self.quantization,
        }
    }
}

fn parse_rope_scaling(value: Option<&serde_json::Value>) -> Result<RopeScaling, String> {
    let Some(obj) = value.and_then(|v| v.as_object()) else {
        return Ok(RopeScaling::None);
    };
    let kind = obj
        .get("type")
        .or_else(|| obj.get("rope_type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |name: &str, default: Option<f32>| -> Result<f32, String> {
        match obj.get(name).and_then(|v| v.as_f64()) {
            Some(v) => Ok(v as f32),
            None => default.ok_or_else(|| format!("rope_scaling.{name} is missing")),
        }
    };
    match kind {
        "default" | "dynamic" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor", None)?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor", None)?,
            low_freq_factor: num("low_freq_factor", Some(1.0))?,
            high_freq_factor: num("high_freq_factor", Some(4.0))?,
            original_max_position_embeddings: num(
                "original_max_position_embeddings",
                Some(8192.0),
            )?,
        }),
        other => Err(format!(
            "unsupported rope_scaling type {other:?}: expected default, linear, dynamic or llama3"
        )),
    }
}

type QuantConfig = (Option<QuantSpec>, BTreeMap<String, Option<QuantSpec>>);

/// mlx-lm writes `{"group_size": 64, "bits": 4, "model.layers.0.mlp": {...}
/// or false, ...}`: module entries override the default.
fn parse_quantization(value: Option<&serde_json::Value>) -> Result<QuantConfig, String> {
    let Some(obj) = value.and_then(|v| v.as_object()) else {
        return Ok((None, BTreeMap::new()));
    };
    let spec_of = |v: &serde_json::Value, name: &str| -> Result<QuantSpec, String> {
        let spec: QuantSpec = serde_json::from_value(v.clone())
            .map_err(|e| format!("quantization entry {name:?}: {e}"))?;
        check_spec(spec).map_err(|e| format!("quantization entry {name:?}: {e}"))
    };
    let default = if obj.contains_key("bits") || obj.contains_key("group_size") {
        Some(spec_of(
            value.unwrap_or(&serde_json::Value::Null),
            "default",
        )?)
    } else {
        None
    };
    let mut overrides = BTreeMap::new();
    for (key, v) in obj {
        match v {
            serde_json::Value::Object(_) => {
                overrides.insert(key.clone(), Some(spec_of(v, key)?));
            }
            serde_json::Value::Bool(false) => {
                overrides.insert(key.clone(), None);
            }
            _ => {}
        }
    }
    Ok((default, overrides))
}

fn check_spec(spec: QuantSpec) -> Result<QuantSpec, String> {
    if ![2, 3, 4, 5, 6, 8].contains(&spec.bits) {
        return Err(format!("{} bits is not supported by MLX", spec.bits));
    }
    if ![32, 64, 128].contains(&spec.group_size) {
        return Err(format!(
            "group size {} is not supported by MLX (32, 64 or 128)",
            spec.group_size
        ));
    }
    Ok(spec)
}

/// What the server needs to know about a model before loading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The folder's name, used as the model id.
    pub name: String,
    /// `model_type` from `config.json`.
    pub architecture: String,
    /// Longest supported sequence, prompt plus output.
    pub max_context: usize,
    /// Rows of the embedding.
    pub vocab_size: usize,
}

impl ModelInfo {
    /// Reads `config.json` only: cheap enough to call before loading.
    pub fn read(dir: impl AsRef<Path>) -> Result<Self, BackendError> {
        let dir = dir.as_ref();
        let config = ModelConfig::read(dir)?;
        Ok(Self::from_config(dir, &config))
    }

    pub(crate) fn from_config(dir: &Path, config: &ModelConfig) -> Self {
        let name = dir
            .canonicalize()
            .unwrap_or_else(|_| PathBuf::from(dir))
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".to_owned());
        Self {
            name,
            architecture: config.architecture.clone(),
            max_context: config.max_position_embeddings,
            vocab_size: config.vocab_size,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig, BackendError> {
        ModelConfig::parse(text, Path::new("m/config.json"))
    }

    const SMOL: &str = r#"{"model_type":"llama","hidden_size":576,"intermediate_size":1536,
        "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
        "vocab_size":49152,"rms_norm_eps":1e-5,"rope_theta":100000.0,
        "max_position_embeddings":8192,"tie_word_embeddings":true,"eos_token_id":2,
        "quantization":{"group_size":32,"bits":4,"model.embed_tokens":{"group_size":32,"bits":8}}}"#;

    #[test]
    fn reads_an_mlx_quantized_llama() {
        let c = parse(SMOL).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.num_kv_heads, 3);
        assert!(!c.attention_bias);
        let four = QuantSpec {
            group_size: 32,
            bits: 4,
        };
        assert_eq!(c.quantization_for("model.layers.3.mlp.up_proj"), Some(four));
        assert_eq!(
            c.quantization_for("model.embed_tokens"),
            Some(QuantSpec {
                group_size: 32,
                bits: 8
            })
        );
    }

    #[test]
    fn qwen2_defaults_to_attention_biases() {
        let c = parse(
            r#"{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "vocab_size":300,"eos_token_id":[5,6]}"#,
        )
        .unwrap();
        assert!(c.attention_bias);
        assert_eq!(c.rope_theta, 1_000_000.0);
        assert_eq!(c.quantization_for("lm_head"), None);
    }

    #[test]
    fn rope_scaling_variants_parse_and_others_are_refused() {
        let with = |rs: &str| {
            parse(&SMOL.replace(
                r#""tie_word_embeddings":true"#,
                &format!(r#""tie_word_embeddings":true,"rope_scaling":{rs}"#),
            ))
        };
        assert_eq!(
            with(r#"{"type":"linear","factor":2.0}"#)
                .unwrap()
                .rope_scaling,
            RopeScaling::Linear { factor: 2.0 }
        );
        assert_eq!(
            with(r#"{"rope_type":"dynamic","factor":2.0}"#)
                .unwrap()
                .rope_scaling,
            RopeScaling::None
        );
        assert!(matches!(
            with(r#"{"rope_type":"llama3","factor":8.0}"#).unwrap().rope_scaling,
            RopeScaling::Llama3 { factor, high_freq_factor, .. } if factor == 8.0 && high_freq_factor == 4.0
        ));
        let err = with(r#"{"type":"yarn","factor":4.0}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("yarn") && err.contains("m/config.json"),
            "{err}"
        );
    }

    #[test]
    fn unknown_architectures_and_bad_shapes_are_named() {
        let err = parse(&SMOL.replace("\"llama\"", "\"gpt2\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gpt2") && err.contains("unsupported architecture"),
            "{err}"
        );
        let err = parse(&SMOL.replace("\"num_key_value_heads\":3", "\"num_key_value_heads\":4"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_key_value_heads 4"), "{err}");
        let err = parse(&SMOL.replace("\"bits\":4", "\"bits\":7"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("7 bits"), "{err}");
        let err = parse(r#"{"model_type":"llama"}"#).unwrap_err().to_string();
        assert!(err.contains("hidden_size"), "{err}");
    }
}
