//! GGUF tensor names to Hugging Face Llama names.

/// What a tensor is in the Llama architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// `token_embd`: the token embedding.
    Embed,
    /// `output_norm`: the final RMS norm.
    FinalNorm,
    /// `output`: the untied output projection.
    LmHead,
    /// `attn_norm`: the RMS norm before attention.
    AttnNorm,
    /// `attn_q`: the query projection (rows permuted by llama.cpp).
    Query,
    /// `attn_k`: the key projection (rows permuted by llama.cpp).
    Key,
    /// `attn_v`: the value projection.
    Value,
    /// `attn_output`: the attention output projection.
    Output,
    /// `ffn_norm`: the RMS norm before the MLP.
    FfnNorm,
    /// `ffn_gate`: the MLP gate projection.
    Gate,
    /// `ffn_up`: the MLP up projection.
    Up,
    /// `ffn_down`: the MLP down projection.
    Down,
}

impl Role {
    /// Whether MLX models this tensor as a module that can be quantized
    /// (`Linear` or `Embedding`) rather than a plain parameter.
    pub fn quantizable(self) -> bool {
        !matches!(self, Self::FinalNorm | Self::AttnNorm | Self::FfnNorm)
    }

    /// The per-layer roles, in the order Hugging Face lists them.
    pub const PER_LAYER: [Role; 9] = [
        Role::AttnNorm,
        Role::Query,
        Role::Key,
        Role::Value,
        Role::Output,
        Role::FfnNorm,
        Role::Gate,
        Role::Up,
        Role::Down,
    ];

    /// The GGUF tensor name of this role in `layer` (ignored for the
    /// model-level roles).
    pub fn gguf_name(self, layer: usize) -> String {
        let blk = |s: &str| format!("blk.{layer}.{s}.weight");
        match self {
            Self::Embed => "token_embd.weight".to_owned(),
            Self::FinalNorm => "output_norm.weight".to_owned(),
            Self::LmHead => "output.weight".to_owned(),
            Self::AttnNorm => blk("attn_norm"),
            Self::Query => blk("attn_q"),
            Self::Key => blk("attn_k"),
            Self::Value => blk("attn_v"),
            Self::Output => blk("attn_output"),
            Self::FfnNorm => blk("ffn_norm"),
            Self::Gate => blk("ffn_gate"),
            Self::Up => blk("ffn_up"),
            Self::Down => blk("ffn_down"),
        }
    }

    /// The Hugging Face module path (without `.weight`) of this role in `layer`.
    pub fn hf_module(self, layer: usize) -> String {
        let l = |s: &str| format!("model.layers.{layer}.{s}");
        match self {
            Self::Embed => "model.embed_tokens".to_owned(),
            Self::FinalNorm => "model.norm".to_owned(),
            Self::LmHead => "lm_head".to_owned(),
            Self::AttnNorm => l("input_layernorm"),
            Self::Query => l("self_attn.q_proj"),
            Self::Key => l("self_attn.k_proj"),
            Self::Value => l("self_attn.v_proj"),
            Self::Output => l("self_attn.o_proj"),
            Self::FfnNorm => l("post_attention_layernorm"),
            Self::Gate => l("mlp.gate_proj"),
            Self::Up => l("mlp.up_proj"),
            Self::Down => l("mlp.down_proj"),
        }
    }
}

/// Parses a GGUF tensor name into its role and layer (0 for model-level
/// tensors), or `None` for a name with no Hugging Face counterpart.
pub fn parse(gguf_name: &str) -> Option<(Role, usize)> {
    let stem = gguf_name.strip_suffix(".weight")?;
    match stem {
        "token_embd" => return Some((Role::Embed, 0)),
        "output_norm" => return Some((Role::FinalNorm, 0)),
        "output" => return Some((Role::LmHead, 0)),
        _ => {}
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    // Reject forms like "+1" or "01" so that each layer has one spelling.
    if layer.is_empty()
        || !layer.bytes().all(|b| b.is_ascii_digit())
        || layer.len() > 1 && layer.starts_with('0')
    {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let role = match part {
        "attn_norm" => Role::AttnNorm,
        "attn_q" => Role::Query,
        "attn_k" => Role::Key,
        "attn_v" => Role::Value,
        "attn_output" => Role::Output,
        "ffn_norm" => Role::FfnNorm,
        "ffn_gate" => Role::Gate,
        "ffn_up" => Role::Up,
        "ffn_down" => Role::Down,
        _ => return None,
    };
    Some((role, layer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_round_trips_through_its_gguf_name() {
        for role in Role::PER_LAYER {
            assert_eq!(parse(&role.gguf_name(7)), Some((role, 7)));
        }
        for role in [Role::Embed, Role::FinalNorm, Role::LmHead] {
            assert_eq!(parse(&role.gguf_name(0)), Some((role, 0)));
        }
    }

    #[test]
    fn odd_names_are_rejected() {
        for name in [
            "blk.01.attn_q.weight",
            "blk..attn_q.weight",
            "blk.1.attn_q",
            "blk.1.attn_x.weight",
            "foo",
        ] {
            assert_eq!(parse(name), None, "{name}");
        }
    }
}
