//! The Llama-family forward pass over a mixed batch of decodes and prefill
//! chunks.
//!
//! Every token of a step (one per decoding sequence, `len` per prefill
//! chunk) is stacked into one `[T, hidden]` activation, so each projection
//! and MLP runs as one matmul per layer whatever the batch. Only attention
//! is grouped: all decodes attend together over the padded cache with a
//! mask, and each prefill chunk attends over its own row with a causal mask.

use mlx_rs::{
    fast::{self, ScaledDotProductAttentionMask},
    ops::{self, indexing::IndexOp},
    Array, Dtype,
};

use super::{
    config::{ModelConfig, RopeScaling},
    linear::{split_last, Embedding, Linear},
    weights::{ModelDType, WeightStore},
};
use crate::{
    error::BackendError,
    kv_cache::{KvCache, KvLayout},
};

type MlxResult<T> = mlx_rs::error::Result<T>;

/// One transformer block's weights.
struct Block {
    input_norm: Array,
    post_attention_norm: Array,
    /// q, k and v stacked into one projection.
    qkv: Linear,
    o: Linear,
    /// gate and up stacked into one projection.
    gate_up: Linear,
    down: Linear,
}

/// A loaded Llama / Mistral / Qwen2 model.
pub struct LlamaModel {
    config: ModelConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Array,
    /// `None` when the output projection is the (tied) embedding.
    lm_head: Option<Linear>,
    rope_freqs: Option<Array>,
    rope_scale: f32,
    dtype: Dtype,
}

/// A prefill chunk inside a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// The sequence's cache row.
    pub row: usize,
    /// Index of the chunk's first token in [`StepBatch::tokens`].
    pub start: usize,
    /// Tokens in the chunk.
    pub len: usize,
    /// Absolute position of its first token.
    pub position: usize,
}

/// The tokens of one step, decodes first, then prefill chunks in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepBatch {
    /// Every token fed this step.
    pub tokens: Vec<u32>,
    /// The cache row of each decode token (`tokens[..decode_rows.len()]`);
    /// its position is the row's current length.
    pub decode_rows: Vec<usize>,
    /// The prefill chunks, covering the rest of `tokens`.
    pub chunks: Vec<Chunk>,
    /// Indices into `tokens` whose next-token logits are wanted.
    pub sample_at: Vec<usize>,
}

impl LlamaModel {
    /// Builds the model from `config` and the folder's weights.
    pub(crate) fn load(
        config: ModelConfig,
        store: &WeightStore,
        dtype: ModelDType,
    ) -> Result<Self, BackendError> {
        let c = &config;
        let hidden = c.hidden_size as i32;
        let q_out = (c.num_heads * c.head_dim) as i32;
        let kv_out = (c.num_kv_heads * c.head_dim) as i32;
        let inter = c.intermediate_size as i32;
        let embed = store.embedding(c, "model.embed_tokens")?;
        let mlx = |e: mlx_rs::error::Exception| BackendError::Mlx(e);
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let attn = |name: &str, out: i32, bias: bool| {
                store.linear(c, &format!("{p}.self_attn.{name}"), hidden, out, bias)
            };
            let mlp = |name: &str, inp: i32, out: i32| {
                store.linear(c, &format!("{p}.mlp.{name}"), inp, out, c.mlp_bias)
            };
            let q = attn("q_proj", q_out, c.attention_bias)?;
            let k = attn("k_proj", kv_out, c.attention_bias)?;
            let v = attn("v_proj", kv_out, c.attention_bias)?;
            let gate = mlp("gate_proj", hidden, inter)?;
            let up = mlp("up_proj", hidden, inter)?;
            // Fusing needs one quantization for all parts; the error names
            // the first part's tensor.
            let fuse = |parts: &[Linear], first: &str, what: &str| {
                Linear::fuse(parts)
                    .map_err(mlx)?
                    .ok_or_else(|| BackendError::Weights {
                        file: Default::default(),
                        tensor: format!("{p}.{first}"),
                        message: format!("{what} must share one quantization"),
                    })
            };
            let qkv = fuse(&[q, k, v], "self_attn.q_proj", "q, k and v")?;
            let gate_up = fuse(&[gate, up], "mlp.gate_proj", "gate and up")?;
            blocks.push(Block {
                input_norm: store.float(&format!("{p}.input_layernorm.weight"), &[hidden])?,
                post_attention_norm: store
                    .float(&format!("{p}.post_attention_layernorm.weight"), &[hidden])?,
                qkv,
                o: store.linear(c, &format!("{p}.self_attn.o_proj"), q_out, hidden, false)?,
                gate_up,
                down: mlp("down_proj", inter, hidden)?,
            });
        }
        let norm = store.float("model.norm.weight", &[hidden])?;
        let tied = c
            .tie_word_embeddings
            .unwrap_or(!store.contains("lm_head.weight"));
        let lm_head = if tied {
            None
        } else {
            Some(store.linear(c, "lm_head", hidden, c.vocab_size as i32, false)?)
        };
        let (rope_freqs, rope_scale) = rope_setup(c);
        // Activations follow MLX's type promotion through embedding, norm
        // and projection; with weights as stored this is what mlx-lm gets
        // (for an f16-scaled 4-bit model with f32 norms: f32).
        let promote = Dtype::from_promoting_types;
        let first = blocks.first();
        let mut act = embed.table.output_dtype();
        if let Some(b) = first {
            act = promote(promote(act, b.input_norm.dtype()), b.qkv.output_dtype());
        }
        let model = Self {
            dtype: act,
            config,
            embed,
            blocks,
            norm,
            lm_head,
            rope_freqs,
            rope_scale,
        };
        let _ = dtype;
        model.eval_weights().map_err(mlx)?;
        Ok(model)
    }

    /// Materialises every weight once, so that dequantization and fusion
    /// happen at load time and the source arrays are freed.
    fn eval_weights(&self) -> MlxResult<()> {
        let mut all: Vec<&Array> = vec![&self.norm];
        push_linear(&self.embed.table, &mut all);
        if let Some(head) = &self.lm_head {
            push_linear(head, &mut all);
        }
        for b in &self.blocks {
            all.extend([&b.input_norm, &b.post_attention_norm]);
            for l in [&b.qkv, &b.o, &b.gate_up, &b.down] {
                push_linear(l, &mut all);
            }
        }
        mlx_rs::transforms::eval(all)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The dtype of activations and of the KV cache.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The KV cache shape this model needs.
    pub fn kv_layout(&self) -> KvLayout {
        KvLayout {
            layers: self.config.num_layers,
            kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Builds the graph of one step, writes the step's keys and values into
    /// `cache` and returns the logits (`[sample_at.len(), vocab]`, f32) of
    /// the requested tokens, unevaluated. The caller evaluates once per step
    /// and updates the row lengths.
    pub fn forward(&self, batch: &StepBatch, cache: &mut KvCache) -> MlxResult<Option<Array>> {
        let c = &self.config;
        let t = batch.tokens.len();
        if t == 0 {
            return Ok(None);
        }
        let (heads, kv_heads, hd) = (c.num_heads as i32, c.num_kv_heads as i32, c.head_dim as i32);
        let rep = heads / kv_heads;
        let n_dec = batch.decode_rows.len();

        // Positions and rows of every token, in `tokens` order.
        let mut rows = Vec::with_capacity(t);
        let mut positions = Vec::with_capacity(t);
        for &row in &batch.decode_rows {
            rows.push(row);
            positions.push(cache.len(row));
        }
        for chunk in &batch.chunks {
            for i in 0..chunk.len {
                rows.push(chunk.row);
                positions.push(chunk.position + i);
            }
        }
        let needed_cols = positions.iter().map(|p| p + 1).max().unwrap_or(1);
        cache.reserve(needed_cols)?;
        let cols = cache.cols();
        let live = cache.live_rows();

        // Where each token's key/value heads go in the flat cache.
        let mut slots = Vec::with_capacity(t * kv_heads as usize);
        for (&row, &pos) in rows.iter().zip(&positions) {
            let base = cache.slot(row, pos);
            for h in 0..kv_heads {
                slots.push(base + h * cols as i32);
            }
        }
        let slots = Array::from_slice(&slots, &[slots.len() as i32]);
        let pos_i32: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        let offsets = Array::from_slice(&pos_i32, &[t as i32]);

        // Decode attention spans the live rows; rows that do not decode
        // this step borrow query 0 and their output is dropped.
        let decode = if n_dec > 0 {
            Some(DecodePlan::new(
                batch,
                &positions[..n_dec],
                live,
                self.dtype,
            )?)
        } else {
            None
        };

        let ids = Array::from_slice(&batch.tokens, &[t as i32]);
        let mut h = self.embed.lookup(&ids)?;
        let scale = (c.head_dim as f32).powf(-0.5);
        for (layer, block) in self.blocks.iter().enumerate() {
            let x = fast::rms_norm(&h, Some(&block.input_norm), c.rms_norm_eps)?;
            let qkv = block.qkv.forward(&x)?;
            let parts = split_last(&qkv, &[heads * hd, kv_heads * hd, kv_heads * hd]);
            let q = self.rope(&parts[0].reshape(&[t as i32, heads, 1, hd])?, &offsets)?;
            let k = self.rope(&parts[1].reshape(&[t as i32, kv_heads, 1, hd])?, &offsets)?;
            let v = parts[2].reshape(&[t as i32 * kv_heads, 1, hd])?;
            let k = k.reshape(&[t as i32 * kv_heads, 1, hd])?;

            let Some((old_k, old_v)) = cache.layer(layer).cloned() else {
                return Err(mlx_rs::error::Exception::custom("KV cache not allocated"));
            };
            let keys = ops::indexing::scatter_single(&old_k, &slots, &k, 0)?;
            let values = ops::indexing::scatter_single(&old_v, &slots, &v, 0)?;
            drop((old_k, old_v));
            let shape4 = [cache.rows() as i32, kv_heads, cols as i32, hd];
            let keys4 = keys.reshape(&shape4)?;
            let values4 = values.reshape(&shape4)?;
            cache.set_layer(layer, keys, values);

            let mut outs: Vec<Array> = Vec::with_capacity(1 + batch.chunks.len());
            if let Some(plan) = &decode {
                let q_dec = q
                    .index(0..n_dec as i32)
                    .reshape(&[n_dec as i32, kv_heads, rep, hd])?;
                let q_rows = match &plan.query_rows {
                    Some(idx) => q_dec.take_axis(idx, 0)?,
                    None => q_dec,
                };
                let kk = keys4.index((0..live as i32, .., 0..plan.cols));
                let vv = values4.index((0..live as i32, .., 0..plan.cols));
                // The `rep` query heads that share a KV head ride in the
                // query-length axis: one small matmul per KV head instead
                // of one per query head.
                let o = fast::scaled_dot_product_attention(
                    &q_rows,
                    &kk,
                    &vv,
                    scale,
                    ScaledDotProductAttentionMask::Array(&plan.mask),
                    None,
                )?;
                let o = match &plan.output_rows {
                    Some(idx) => o.take_axis(idx, 0)?,
                    None => o,
                };
                outs.push(o.reshape(&[n_dec as i32, heads * hd])?);
            }
            for chunk in &batch.chunks {
                let (s, n) = (chunk.start as i32, chunk.len as i32);
                let qc = q
                    .index(s..s + n)
                    .reshape(&[n, heads, hd])?
                    .transpose_axes(&[1, 0, 2])?
                    .reshape(&[1, heads, n, hd])?;
                let end = (chunk.position + chunk.len) as i32;
                let r = chunk.row as i32;
                let kk = keys4.index((r..r + 1, .., 0..end));
                let vv = values4.index((r..r + 1, .., 0..end));
                let o = fast::scaled_dot_product_attention(
                    &qc,
                    &kk,
                    &vv,
                    scale,
                    ScaledDotProductAttentionMask::Causal,
                    None,
                )?;
                outs.push(
                    o.reshape(&[heads, n, hd])?
                        .transpose_axes(&[1, 0, 2])?
                        .reshape(&[n, heads * hd])?,
                );
            }
            let attn = if outs.len() == 1 {
                outs.pop().unwrap_or_else(|| Array::from_int(0))
            } else {
                ops::concatenate(&outs, 0)?
            };
            h = h.add(block.o.forward(&attn)?)?;

            let x = fast::rms_norm(&h, Some(&block.post_attention_norm), c.rms_norm_eps)?;
            let gu = block.gate_up.forward(&x)?;
            let inter = c.intermediate_size as i32;
            let gu = split_last(&gu, &[inter, inter]);
            let act = mlx_rs::nn::silu(&gu[0])?.multiply(&gu[1])?;
            h = h.add(block.down.forward(&act)?)?;
        }
        if batch.sample_at.is_empty() {
            return Ok(None);
        }
        let at: Vec<i32> = batch.sample_at.iter().map(|&i| i as i32).collect();
        let last = h.take_axis(Array::from_slice(&at, &[at.len() as i32]), 0)?;
        let x = fast::rms_norm(&last, Some(&self.norm), c.rms_norm_eps)?;
        let logits = match &self.lm_head {
            Some(head) => head.forward(&x)?,
            None => self.embed.as_linear(&x)?,
        };
        let logits = if logits.dtype() == Dtype::Float32 {
            logits
        } else {
            logits.as_dtype(Dtype::Float32)?
        };
        Ok(Some(logits))
    }

    fn rope(&self, x: &Array, offsets: &Array) -> MlxResult<Array> {
        let c = &self.config;
        let base = if self.rope_freqs.is_some() {
            None
        } else {
            Some(c.rope_theta)
        };
        fast::rope_dynamic(
            x,
            c.head_dim as i32,
            c.rope_traditional,
            base,
            self.rope_scale,
            offsets,
            self.rope_freqs.as_ref(),
        )
    }
}

/// Adds a layer's arrays to `all`.
fn push_linear<'a>(l: &'a Linear, all: &mut Vec<&'a Array>) {
    match l {
        Linear::Dense { weight, bias } => {
            all.push(weight);
            all.extend(bias.iter());
        }
        Linear::Quantized {
            weight,
            scales,
            biases,
            bias,
            ..
        } => {
            all.extend([weight, scales, biases]);
            all.extend(bias.iter());
        }
    }
}

/// What decode attention needs besides the queries: the mask and the row
/// mappings, built once per step and shared by every layer.
struct DecodePlan {
    /// Additive mask `[live, 1, 1, cols]`.
    mask: Array,
    /// Columns attended (the longest decoding sequence).
    cols: i32,
    /// For each live row, which decode query it uses; `None` when decode
    /// `i` is row `i` for every row.
    query_rows: Option<Array>,
    /// For each decode, its row in the attention output; `None` likewise.
    output_rows: Option<Array>,
}

impl DecodePlan {
    fn new(batch: &StepBatch, positions: &[usize], live: usize, dtype: Dtype) -> MlxResult<Self> {
        let cols = positions.iter().map(|p| p + 1).max().unwrap_or(1);
        let mut mask = vec![f32::NEG_INFINITY; live * cols];
        let mut query_of_row = vec![0i32; live];
        for row in 0..live {
            // Rows that do not decode see column 0 only, which keeps their
            // (discarded) softmax finite.
            mask[row * cols] = 0.0;
        }
        for (i, (&row, &pos)) in batch.decode_rows.iter().zip(positions).enumerate() {
            mask[row * cols..row * cols + pos + 1].fill(0.0);
            query_of_row[row] = i as i32;
        }
        let identity = live == batch.decode_rows.len()
            && batch.decode_rows.iter().enumerate().all(|(i, &r)| i == r);
        let mask = Array::from_slice(&mask, &[live as i32, 1, 1, cols as i32]);
        let mask = if dtype == Dtype::Float32 {
            mask
        } else {
            mask.as_dtype(dtype)?
        };
        let (query_rows, output_rows) = if identity {
            (None, None)
        } else {
            let out: Vec<i32> = batch.decode_rows.iter().map(|&r| r as i32).collect();
            (
                Some(Array::from_slice(&query_of_row, &[live as i32])),
                Some(Array::from_slice(&out, &[out.len() as i32])),
            )
        };
        Ok(Self {
            mask,
            cols: cols as i32,
            query_rows,
            output_rows,
        })
    }
}

/// RoPE frequencies for scaled variants (`None` for plain RoPE, which uses
/// the base) and the position scale.
fn rope_setup(c: &ModelConfig) -> (Option<Array>, f32) {
    match c.rope_scaling {
        RopeScaling::None => (None, 1.0),
        RopeScaling::Linear { factor } => (None, 1.0 / factor),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            // The same formula as mlx-lm's Llama3RoPE, in f32.
            let dims = c.head_dim;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let freqs: Vec<f32> = (0..dims)
                .step_by(2)
                .map(|i| {
                    let f = c.rope_theta.powf(i as f32 / dims as f32);
                    let wavelen = 2.0 * std::f32::consts::PI * f;
                    let scaled = if wavelen > low_wavelen { f * factor } else { f };
                    if wavelen > high_wavelen && wavelen < low_wavelen {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        scaled / ((1.0 - smooth) / factor + smooth)
                    } else {
                        scaled
                    }
                })
                .collect();
            let n = freqs.len() as i32;
            (Some(Array::from_slice(&freqs, &[n])), 1.0)
        }
    }
}
