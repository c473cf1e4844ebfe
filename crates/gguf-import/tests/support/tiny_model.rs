//! A tiny Llama model written as GGUF, with the values llama.cpp would
//! compute for every weight in Hugging Face order.

use std::collections::BTreeMap;

use half::f16;

use super::gguf_writer::{GgufWriter, Tensor, Val};
use super::*;

pub const HIDDEN: usize = 64;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = 16;
pub const INTER: usize = 96;

pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const Q4_0: u32 = 2;
pub const Q4_1: u32 = 3;
pub const Q8_0: u32 = 8;

/// What to build.
#[derive(Debug, Clone)]
pub struct Spec {
    pub linear: u32,
    pub embed: u32,
    pub tied: bool,
    pub layers: usize,
    /// Scale of the quantized blocks (a huge one makes Q4_0/Q8_0 inexact).
    pub scale: f32,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            linear: Q4_1,
            embed: Q8_0,
            tied: true,
            layers: 2,
            scale: 0.05,
        }
    }
}

/// The built file and its expected contents.
pub struct Built {
    pub writer: GgufWriter,
    /// Hugging Face weight name -> values in Hugging Face row order.
    pub expected: BTreeMap<String, Vec<f32>>,
    pub vocab: Vec<String>,
}

/// GPT-2's byte-to-unicode table.
pub fn byte_char(b: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

pub fn vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    let mut types = vec![3, 3, 3];
    for b in 0..=255u8 {
        tokens.push(byte_char(b).to_string());
        types.push(1);
    }
    let merges = ["Ġ t", "h e", "Ġt he"].map(String::from).to_vec();
    for m in &merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    (tokens, types, merges)
}

fn block_bytes(ty: u32) -> usize {
    match ty {
        Q4_0 => 18,
        Q4_1 => 20,
        Q8_0 => 34,
        F16 => 2,
        _ => 4,
    }
}

fn values_per_block(ty: u32) -> usize {
    if matches!(ty, Q4_0 | Q4_1 | Q8_0) {
        32
    } else {
        1
    }
}

/// Random data for one row in the given type, and its reference values.
fn row(rng: &mut Rng, ty: u32, cols: usize, scale: f32) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    let mut vals = Vec::new();
    for _ in 0..cols / values_per_block(ty) {
        let d = scale * (0.5 + rng.unit().abs());
        match ty {
            Q4_0 => {
                let b = q4_0_block(rng, d);
                vals.extend(ref_q4_0(&b));
                bytes.extend(b);
            }
            Q4_1 => {
                let m = -8.0 * d * rng.unit().abs();
                let b = q4_1_block(rng, d, m);
                vals.extend(ref_q4_1(&b));
                bytes.extend(b);
            }
            Q8_0 => {
                let b = q8_0_block(rng, d);
                vals.extend(ref_q8_0(&b));
                bytes.extend(b);
            }
            F16 => {
                let h = f16::from_f32(rng.unit());
                vals.push(h.to_f32());
                bytes.extend(h.to_le_bytes());
            }
            _ => {
                let f = rng.unit() * 3.0;
                vals.push(f);
                bytes.extend(f.to_le_bytes());
            }
        }
    }
    (bytes, vals)
}

/// Builds a tensor whose Hugging Face rows are random; `permute_heads`
/// applies llama.cpp's q/k row permutation to the stored rows.
fn tensor(
    rng: &mut Rng,
    name: &str,
    ty: u32,
    rows: usize,
    cols: usize,
    scale: f32,
    permute_heads: Option<usize>,
) -> (Tensor, Vec<f32>) {
    let hf_rows: Vec<_> = (0..rows).map(|_| row(rng, ty, cols, scale)).collect();
    let order: Vec<usize> = match permute_heads {
        Some(h) => llama_cpp_permutation(rows, h),
        None => (0..rows).collect(),
    };
    let data = order.iter().flat_map(|&r| hf_rows[r].0.clone()).collect();
    let expected = hf_rows.iter().flat_map(|r| r.1.clone()).collect();
    let dims = if rows == 1 {
        vec![cols as u64]
    } else {
        vec![cols as u64, rows as u64]
    };
    (
        Tensor {
            name: name.to_owned(),
            dims,
            ggml_type: ty,
            data,
        },
        expected,
    )
}

pub fn build(spec: &Spec) -> Built {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (tokens, types, merges) = vocab();
    let vocab_size = tokens.len();
    let mut w = GgufWriter::default();
    w.kv("general.architecture", Val::Str("llama".into()))
        .kv("general.name", Val::Str("tiny".into()))
        .kv("llama.context_length", Val::U32(256))
        .kv("llama.embedding_length", Val::U32(HIDDEN as u32))
        .kv("llama.feed_forward_length", Val::U32(INTER as u32))
        .kv("llama.block_count", Val::U32(spec.layers as u32))
        .kv("llama.attention.head_count", Val::U32(HEADS as u32))
        .kv("llama.attention.head_count_kv", Val::U32(KV_HEADS as u32))
        .kv("llama.rope.freq_base", Val::F32(100000.0))
        .kv("llama.rope.dimension_count", Val::U32(HEAD_DIM as u32))
        .kv("llama.attention.layer_norm_rms_epsilon", Val::F32(1e-5))
        .kv("llama.vocab_size", Val::U32(vocab_size as u32))
        .kv("tokenizer.ggml.model", Val::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Val::Str("smollm".into()))
        .kv("tokenizer.ggml.tokens", Val::StrArray(tokens.clone()))
        .kv("tokenizer.ggml.token_type", Val::I32Array(types))
        .kv("tokenizer.ggml.merges", Val::StrArray(merges))
        .kv("tokenizer.ggml.bos_token_id", Val::U32(1))
        .kv("tokenizer.ggml.eos_token_id", Val::U32(2))
        .kv("tokenizer.ggml.padding_token_id", Val::U32(2))
        .kv("tokenizer.ggml.add_bos_token", Val::Bool(false))
        .kv(
            "tokenizer.chat_template",
            Val::Str("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}".into()),
        );
    let mut expected = BTreeMap::new();
    let mut add = |w: &mut GgufWriter, (t, e): (Tensor, Vec<f32>), hf: String| {
        w.tensors.push(t);
        expected.insert(hf, e);
    };
    let s = spec.scale;
    add(
        &mut w,
        tensor(
            &mut rng,
            "token_embd.weight",
            spec.embed,
            vocab_size,
            HIDDEN,
            s,
            None,
        ),
        "model.embed_tokens.weight".into(),
    );
    let q = HEADS * HEAD_DIM;
    let kv = KV_HEADS * HEAD_DIM;
    for l in 0..spec.layers {
        let g = |p: &str| format!("blk.{l}.{p}.weight");
        let h = |p: &str| format!("model.layers.{l}.{p}.weight");
        let lin = spec.linear;
        add(
            &mut w,
            tensor(&mut rng, &g("attn_norm"), F32, 1, HIDDEN, s, None),
            h("input_layernorm"),
        );
        add(
            &mut w,
            tensor(&mut rng, &g("attn_q"), lin, q, HIDDEN, s, Some(HEADS)),
            h("self_attn.q_proj"),
        );
        add(
            &mut w,
            tensor(&mut rng, &g("attn_k"), lin, kv, HIDDEN, s, Some(KV_HEADS)),
            h("self_attn.k_proj"),
        );
        add(
            &mut w,
            tensor(&mut rng, &g("attn_v"), lin, kv, HIDDEN, s, None),
            h("self_attn.v_proj"),
        );
        add(
            &mut w,
            tensor(&mut rng, &g("attn_output"), lin, HIDDEN, q, s, None),
            h("self_attn.o_proj"),
        );
        add(
            &mut w,
            tensor(&mut rng, &g("ffn_norm"), F32, 1, HIDDEN, s, None),
            h("post_attention_layernorm"),
        );
        add(
            &mut w,
            tensor(&mut rng, &g("ffn_gate"), lin, INTER, HIDDEN, s, None),
            h("mlp.gate_proj"),
        );
        add(
            &mut w,
            tensor(&mut rng, &g("ffn_up"), lin, INTER, HIDDEN, s, None),
            h("mlp.up_proj"),
        );
        add(
            &mut w,
            tensor(&mut rng, &g("ffn_down"), lin, HIDDEN, INTER, s, None),
            h("mlp.down_proj"),
        );
    }
    add(
        &mut w,
        tensor(&mut rng, "output_norm.weight", F32, 1, HIDDEN, s, None),
        "model.norm.weight".into(),
    );
    if !spec.tied {
        add(
            &mut w,
            tensor(
                &mut rng,
                "output.weight",
                spec.linear,
                vocab_size,
                HIDDEN,
                s,
                None,
            ),
            "lm_head.weight".into(),
        );
    }
    Built {
        writer: w,
        expected,
        vocab: tokens,
    }
}
