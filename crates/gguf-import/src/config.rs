//! Llama hyperparameters from GGUF metadata, and `config.json`.

use serde_json::{json, Map, Value};

use crate::meta::Meta;
use crate::ImportError;

/// The hyperparameters of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaParams {
    /// Model width (`hidden_size`).
    pub hidden_size: usize,
    /// MLP width (`intermediate_size`).
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads.
    pub num_key_value_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Number of tokens in the vocabulary.
    pub vocab_size: usize,
    /// Trained context length.
    pub max_position_embeddings: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// `rope_scaling` in Hugging Face form, if the model scales RoPE.
    pub rope_scaling: Option<Value>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<usize>,
    /// End-of-sequence token id.
    pub eos_token_id: Option<usize>,
}

impl LlamaParams {
    /// Reads the `llama.*` keys; `vocab_fallback` is the tokenizer's token
    /// count, used when `llama.vocab_size` is absent.
    pub fn from_meta(meta: &Meta<'_>, vocab_fallback: Option<usize>) -> Result<Self, ImportError> {
        let hidden_size = meta.positive("llama.embedding_length")?;
        let heads = meta.positive("llama.attention.head_count")?;
        let kv_heads = meta
            .opt_usize("llama.attention.head_count_kv")?
            .unwrap_or(heads);
        let bad = |key: &str, reason: String| ImportError::BadMetadata {
            path: meta.path.to_path_buf(),
            key: key.to_owned(),
            reason,
        };
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(bad(
                "llama.attention.head_count_kv",
                format!("{kv_heads} does not divide the {heads} attention heads"),
            ));
        }
        let head_dim = match meta.opt_usize("llama.attention.key_length")? {
            Some(d) => d,
            None if hidden_size.is_multiple_of(heads) => hidden_size / heads,
            None => {
                return Err(bad(
                    "llama.attention.head_count",
                    format!("{heads} heads do not divide the width {hidden_size}"),
                ))
            }
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(
                "llama.attention.key_length",
                format!("head size {head_dim} must be even and positive"),
            ));
        }
        if let Some(rot) = meta.opt_usize("llama.rope.dimension_count")? {
            if rot != head_dim {
                return Err(bad(
                    "llama.rope.dimension_count",
                    format!("partial rotary embeddings ({rot} of {head_dim}) are not supported"),
                ));
            }
        }
        let vocab_size = match meta.opt_usize("llama.vocab_size")? {
            Some(v) => v,
            None => vocab_fallback.ok_or_else(|| ImportError::MissingMetadata {
                path: meta.path.to_path_buf(),
                key: "llama.vocab_size".to_owned(),
            })?,
        };
        Ok(Self {
            hidden_size,
            intermediate_size: meta.positive("llama.feed_forward_length")?,
            num_hidden_layers: meta.positive("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings: meta.opt_usize("llama.context_length")?.unwrap_or(2048),
            rope_theta: meta.opt_f64("llama.rope.freq_base")?.unwrap_or(10_000.0),
            rms_norm_eps: meta
                .opt_f64("llama.attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-5),
            rope_scaling: rope_scaling(meta)?,
            bos_token_id: meta.opt_usize("tokenizer.ggml.bos_token_id")?,
            eos_token_id: meta.opt_usize("tokenizer.ggml.eos_token_id")?,
        })
    }

    /// `config.json` for `LlamaForCausalLM`. `quantization` is mlx-lm's
    /// quantization entry, if any tensor stayed quantized.
    pub fn config_json(&self, tie_word_embeddings: bool, quantization: Option<Value>) -> Value {
        let mut c = Map::new();
        c.insert("architectures".into(), json!(["LlamaForCausalLM"]));
        c.insert("model_type".into(), json!("llama"));
        c.insert("hidden_act".into(), json!("silu"));
        c.insert("attention_bias".into(), json!(false));
        c.insert("mlp_bias".into(), json!(false));
        c.insert("hidden_size".into(), json!(self.hidden_size));
        c.insert("intermediate_size".into(), json!(self.intermediate_size));
        c.insert("num_hidden_layers".into(), json!(self.num_hidden_layers));
        c.insert(
            "num_attention_heads".into(),
            json!(self.num_attention_heads),
        );
        c.insert(
            "num_key_value_heads".into(),
            json!(self.num_key_value_heads),
        );
        c.insert("head_dim".into(), json!(self.head_dim));
        c.insert("vocab_size".into(), json!(self.vocab_size));
        c.insert(
            "max_position_embeddings".into(),
            json!(self.max_position_embeddings),
        );
        c.insert("rope_theta".into(), json!(self.rope_theta));
        c.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        c.insert("tie_word_embeddings".into(), json!(tie_word_embeddings));
        c.insert(
            "rope_scaling".into(),
            self.rope_scaling.clone().unwrap_or(Value::Null),
        );
        if let Some(id) = self.bos_token_id {
            c.insert("bos_token_id".into(), json!(id));
        }
        if let Some(id) = self.eos_token_id {
            c.insert("eos_token_id".into(), json!(id));
        }
        if let Some(q) = quantization {
            // mlx-lm reads `quantization`; Hugging Face tooling looks for
            // `quantization_config`. mlx-lm's own converter writes both.
            c.insert("quantization_config".into(), q.clone());
            c.insert("quantization".into(), q);
        }
        Value::Object(c)
    }
}

/// `rope_scaling` from `llama.rope.scaling.*`, in Hugging Face form.
fn rope_scaling(meta: &Meta<'_>) -> Result<Option<Value>, ImportError> {
    let kind = meta.opt_str("llama.rope.scaling.type")?;
    let factor = meta.opt_f64("llama.rope.scaling.factor")?;
    match (kind, factor) {
        (None | Some("none"), _) => Ok(None),
        (Some(kind @ ("linear" | "yarn")), Some(factor)) => {
            let mut s = Map::new();
            s.insert("type".into(), json!(kind));
            s.insert("rope_type".into(), json!(kind));
            s.insert("factor".into(), json!(factor));
            if let Some(orig) = meta.opt_usize("llama.rope.scaling.original_context_length")? {
                s.insert("original_max_position_embeddings".into(), json!(orig));
            }
            Ok(Some(Value::Object(s)))
        }
        (Some(kind), _) => Err(ImportError::BadMetadata {
            path: meta.path.to_path_buf(),
            key: "llama.rope.scaling.type".to_owned(),
            reason: format!("RoPE scaling `{kind}` without a usable factor is not supported"),
        }),
    }
}
