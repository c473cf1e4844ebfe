//! The Llama-family forward pass over a mixed batch of decodes and prefill
//! chunks.
//!
//! Every token of a step (one per decoding sequence, `len` per prefill
//! chunk) is stacked into one `[T, hidden]` activation, so each projection
//! and MLP runs as one matmul per layer whatever the batch. Only attention
//! is grouped: the step's keys and values are scattered into the block
//! pool, then all decodes attend together over their gathered blocks with
//! a mask, and each prefill chunk attends over its own blocks with a causal
//! mask. The gather is transient: it lives for one layer of one step.

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
    kv_pool::{KvLayout, KvPool},
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// The sequence's block table, covering the chunk's last token.
    pub table: &'a [u32],
    /// Index of the chunk's first token in [`StepBatch::tokens`].
    pub start: usize,
    /// Tokens in the chunk.
    pub len: usize,
    /// Absolute position of its first token.
    pub position: usize,
}

/// One decoding sequence inside a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decode<'a> {
    /// The sequence's block table, covering the fed token.
    pub table: &'a [u32],
    /// Absolute position of the fed token (the tokens already cached).
    pub position: usize,
}

/// The tokens of one step, decodes first, then prefill chunks in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepBatch<'a> {
    /// Every token fed this step.
    pub tokens: Vec<u32>,
    /// The decoding sequences, one per token of `tokens[..decodes.len()]`.
    pub decodes: Vec<Decode<'a>>,
    /// The prefill chunks, covering the rest of `tokens`.
    pub chunks: Vec<Chunk<'a>>,
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
    /// `pool` and returns the logits (`[sample_at.len(), vocab]`, f32) of
    /// the requested tokens, unevaluated. The caller evaluates once per step.
    pub fn forward(&self, batch: &StepBatch<'_>, pool: &mut KvPool) -> MlxResult<Option<Array>> {
        let c = &self.config;
        let t = batch.tokens.len();
        if t == 0 {
            return Ok(None);
        }
        let Some(blocks) = pool.blocks() else {
            return Err(mlx_rs::error::Exception::custom(
                "the KV pool was not configured",
            ));
        };
        let bs = blocks.block_size;
        let (heads, kv_heads, hd) = (c.num_heads as i32, c.num_kv_heads as i32, c.head_dim as i32);
        let rep = heads / kv_heads;
        let n_dec = batch.decodes.len();

        // Position and pool row of every token, in `tokens` order.
        let mut positions = Vec::with_capacity(t);
        let mut slots = Vec::with_capacity(t);
        let mut top_block = 0usize;
        let mut place = |table: &[u32], pos: usize| -> MlxResult<()> {
            let Some(&block) = table.get(pos / bs) else {
                return Err(mlx_rs::error::Exception::custom(format!(
                    "a block table of {} blocks does not reach position {pos}",
                    table.len()
                )));
            };
            top_block = top_block.max(block as usize + 1);
            positions.push(pos as i32);
            slots.push((block as usize * bs + pos % bs) as i32);
            Ok(())
        };
        for d in &batch.decodes {
            place(d.table, d.position)?;
        }
        for chunk in &batch.chunks {
            for i in 0..chunk.len {
                place(chunk.table, chunk.position + i)?;
            }
        }
        pool.ensure(top_block)?;
        let slots = Array::from_slice(&slots, &[t as i32]);
        let offsets = Array::from_slice(&positions, &[t as i32]);
        let gather = GatherPlan::new(batch, bs, self.dtype)?;

        let ids = Array::from_slice(&batch.tokens, &[t as i32]);
        let mut h = self.embed.lookup(&ids)?;
        let scale = (c.head_dim as f32).powf(-0.5);
        for (layer, block) in self.blocks.iter().enumerate() {
            let x = fast::rms_norm(&h, Some(&block.input_norm), c.rms_norm_eps)?;
            let qkv = block.qkv.forward(&x)?;
            let parts = split_last(&qkv, &[heads * hd, kv_heads * hd, kv_heads * hd]);
            let q = self.rope(&parts[0].reshape(&[t as i32, heads, 1, hd])?, &offsets)?;
            let k = self.rope(&parts[1].reshape(&[t as i32, kv_heads, 1, hd])?, &offsets)?;
            let k = k.reshape(&[t as i32, 1, kv_heads * hd])?;
            let v = parts[2].reshape(&[t as i32, 1, kv_heads * hd])?;

            let Some((old_k, old_v)) = pool.layer(layer).cloned() else {
                return Err(mlx_rs::error::Exception::custom("KV pool not allocated"));
            };
            let keys = ops::indexing::scatter_single(&old_k, &slots, &k, 0)?;
            let values = ops::indexing::scatter_single(&old_v, &slots, &v, 0)?;
            drop((old_k, old_v));
            pool.set_layer(layer, keys.clone(), values.clone());

            let mut outs: Vec<Array> = Vec::with_capacity(1 + batch.chunks.len());
            if let Some(plan) = &gather.decode {
                // The `rep` query heads that share a KV head ride in the
                // query-length axis: one small matmul per KV head instead
                // of one per query head.
                let q_dec = q
                    .index(0..n_dec as i32)
                    .reshape(&[n_dec as i32, kv_heads, rep, hd])?;
                let kk = plan.gather(&keys, kv_heads, hd)?;
                let vv = plan.gather(&values, kv_heads, hd)?;
                let o = fast::scaled_dot_product_attention(
                    &q_dec,
                    &kk,
                    &vv,
                    scale,
                    ScaledDotProductAttentionMask::Array(&plan.mask),
                    None,
                )?;
                outs.push(o.reshape(&[n_dec as i32, heads * hd])?);
            }
            for (chunk, plan) in batch.chunks.iter().zip(&gather.chunks) {
                let (s, n) = (chunk.start as i32, chunk.len as i32);
                let qc = q
                    .index(s..s + n)
                    .reshape(&[n, heads, hd])?
                    .transpose_axes(&[1, 0, 2])?
                    .reshape(&[1, heads, n, hd])?;
                let kk = plan.gather(&keys, kv_heads, hd)?;
                let vv = plan.gather(&values, kv_heads, hd)?;
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

/// Which pool blocks one attention call reads, built once per step and
/// shared by every layer.
struct BlockGather {
    /// Block ids, `[rows * blocks]`; a row's blocks past its length are
    /// block 0 (masked for decodes, cut for chunks).
    ids: Array,
    /// Rows (sequences) in the gather.
    rows: i32,
    /// Blocks gathered per row.
    blocks: i32,
    /// Tokens per block.
    block_size: i32,
    /// Tokens attended per row, when less than `blocks * block_size`
    /// (chunks only; decodes mask instead).
    keep: Option<i32>,
}

impl BlockGather {
    fn new(rows: &[(&[u32], usize)], bs: usize, keep: Option<usize>) -> Self {
        let blocks = rows
            .iter()
            .map(|&(_, len)| len.div_ceil(bs))
            .max()
            .unwrap_or(1);
        let mut ids = Vec::with_capacity(rows.len() * blocks);
        for &(table, len) in rows {
            let used = len.div_ceil(bs);
            ids.extend(table.iter().take(used).map(|&b| b as i32));
            ids.resize(ids.len() + blocks - used.min(table.len()), 0);
        }
        Self {
            ids: Array::from_slice(&ids, &[ids.len() as i32]),
            rows: rows.len() as i32,
            blocks: blocks as i32,
            block_size: bs as i32,
            keep: keep.map(|k| k as i32),
        }
    }

    /// The keys or values of these blocks, `[rows, kv_heads, tokens,
    /// head_dim]`: whole blocks of the pool's rows, taken at once.
    fn gather(&self, pool: &Array, kv_heads: i32, hd: i32) -> MlxResult<Array> {
        let blocks = pool.reshape(&[-1, self.block_size * kv_heads * hd])?;
        let span = self.blocks * self.block_size;
        let g = blocks
            .take_axis(&self.ids, 0)?
            .reshape(&[self.rows, span, kv_heads, hd])?;
        let g = match self.keep {
            Some(keep) if keep < span => g.index((.., 0..keep)),
            _ => g,
        };
        g.transpose_axes(&[0, 2, 1, 3])
    }
}

/// Decode attention: the blocks and an additive mask `[rows, 1, 1, span]`
/// that hides what lies past each sequence's own length.
struct DecodeGather {
    gather: BlockGather,
    mask: Array,
}

impl std::ops::Deref for DecodeGather {
    type Target = BlockGather;
    fn deref(&self) -> &BlockGather {
        &self.gather
    }
}

/// What attention reads in one step.
struct GatherPlan {
    decode: Option<DecodeGather>,
    chunks: Vec<BlockGather>,
}

impl GatherPlan {
    fn new(batch: &StepBatch<'_>, bs: usize, dtype: Dtype) -> MlxResult<Self> {
        let decode = if batch.decodes.is_empty() {
            None
        } else {
            let rows: Vec<(&[u32], usize)> = batch
                .decodes
                .iter()
                .map(|d| (d.table, d.position + 1))
                .collect();
            let gather = BlockGather::new(&rows, bs, None);
            let span = (gather.blocks * gather.block_size) as usize;
            let mut mask = vec![f32::NEG_INFINITY; rows.len() * span];
            for (r, &(_, len)) in rows.iter().enumerate() {
                mask[r * span..r * span + len].fill(0.0);
            }
            let mask = Array::from_slice(&mask, &[rows.len() as i32, 1, 1, span as i32]);
            let mask = if dtype == Dtype::Float32 {
                mask
            } else {
                mask.as_dtype(dtype)?
            };
            Some(DecodeGather { gather, mask })
        };
        let chunks = batch
            .chunks
            .iter()
            .map(|chunk| {
                let end = chunk.position + chunk.len;
                BlockGather::new(&[(chunk.table, end)], bs, Some(end))
            })
            .collect();
        Ok(Self { decode, chunks })
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
