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
//!
//! On a GPU the norms, RoPE and attention are MLX's `fast` kernels. On the
//! CPU, where those fall back to long chains of primitive ops, they are the
//! compiled functions of the `fused` module and the attention of the
//! `attention` module: see those modules for why.

use mlx_rs::{fast, ops, ops::indexing::IndexOp, Array, Dtype};

use super::{
    attention::{AttentionPlan, Heads},
    config::ModelConfig,
    fused::{Fused, WarmUpShape},
    host_ops,
    linear::{split_last, Embedding, Linear},
    rope::Rope,
    weights::{ModelDType, WeightStore},
};
use crate::{
    error::BackendError,
    kv_pool::{KvLayout, KvPool},
    profile::{Profiler, Stage},
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
    rope: Rope,
    /// The compiled CPU kernels; `None` runs MLX's `fast` ones (GPU).
    fused: Option<Fused>,
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
        fused: bool,
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
        let rope = Rope::new(c);
        let fused = fused.then(|| Fused::new(c.rms_norm_eps));
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
            rope,
            fused,
        };
        let _ = dtype;
        model.eval_weights().map_err(mlx)?;
        if let Some(fused) = &model.fused {
            let c = &model.config;
            fused
                .warm_up(
                    model.dtype,
                    WarmUpShape {
                        hidden: c.hidden_size as i32,
                        intermediate: c.intermediate_size as i32,
                        heads: c.num_heads as i32,
                        kv_heads: c.num_kv_heads as i32,
                        head_dim: c.head_dim as i32,
                    },
                )
                .map_err(mlx)?;
        }
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

    /// A generous estimate of the bytes one step of `batch` needs beside
    /// the weights and the KV pool: the activations of one layer for every
    /// token, the attention temporaries of one layer (gathered keys and
    /// values, scores and probabilities), and the logits. MLX frees each
    /// layer's temporaries as the graph runs, but keeps a layer's inputs
    /// until its outputs exist, hence the factor of two.
    pub fn step_working_set(&self, batch: &StepBatch<'_>, block_size: usize) -> u64 {
        let c = &self.config;
        let word = match self.dtype {
            Dtype::Float16 | Dtype::Bfloat16 => 2u64,
            _ => 4,
        };
        let t = batch.tokens.len() as u64;
        let (hidden, inter) = (c.hidden_size as u64, c.intermediate_size as u64);
        let (heads, kv_heads, hd) = (c.num_heads as u64, c.num_kv_heads as u64, c.head_dim as u64);
        let qkv = (heads + 2 * kv_heads) * hd;
        let activations = t * (3 * hidden + qkv + 4 * inter) * word;
        let width = kv_heads * hd;
        let round = |n: usize| (n.div_ceil(block_size.max(1)) * block_size.max(1)) as u64;
        let decode_span = batch
            .decodes
            .iter()
            .map(|d| round(d.position + 1))
            .max()
            .unwrap_or(0);
        let rows = batch.decodes.len() as u64;
        // Gathered keys and values, block-diagonal queries, scores,
        // probabilities and the weighted sums of every KV head.
        let decode =
            rows * (2 * decode_span * width + 3 * heads * decode_span + heads * width) * word;
        let chunks: u64 = batch
            .chunks
            .iter()
            .map(|ch| {
                let span = round(ch.position + ch.len);
                let n = ch.len as u64;
                (2 * span * width + 3 * heads * n * span) * word
            })
            .sum();
        let logits = batch.sample_at.len() as u64 * c.vocab_size as u64 * 4 * 2;
        2 * (activations + decode + chunks) + logits
    }

    /// Builds the graph of one step, writes the step's keys and values into
    /// `pool` and returns the logits (`[sample_at.len(), vocab]`, f32) of
    /// the requested tokens, unevaluated. The caller evaluates once per step.
    pub fn forward(&self, batch: &StepBatch<'_>, pool: &mut KvPool) -> MlxResult<Option<Array>> {
        self.forward_profiled(batch, pool, &mut Profiler::default())
    }

    /// [`LlamaModel::forward`], marking each stage on `prof`.
    pub(crate) fn forward_profiled(
        &self,
        batch: &StepBatch<'_>,
        pool: &mut KvPool,
        prof: &mut Profiler,
    ) -> MlxResult<Option<Array>> {
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
        let h = Heads {
            heads: c.num_heads as i32,
            kv_heads: c.num_kv_heads as i32,
            head_dim: c.head_dim as i32,
            scale: (c.head_dim as f32).powf(-0.5),
        };
        let (heads, kv_heads, hd) = (h.heads, h.kv_heads, h.head_dim);
        let fused = self.fused.as_ref();

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
        prof.host(Stage::Plan);
        pool.ensure(top_block)?;
        prof.host(Stage::KvGrow);
        let slots = Array::from_slice(&slots, &[t as i32]);
        let angles = self.rope.angles(&positions, self.dtype, fused.is_some())?;
        let attention = AttentionPlan::new(batch, bs, self.dtype, h, fused.is_some())?;

        let ids = Array::from_slice(&batch.tokens, &[t as i32]);
        prof.host(Stage::Plan);
        let mut h = self.embed.lookup(&ids)?;
        prof.mark(Stage::Embed, &[&h])?;
        for (layer, block) in self.blocks.iter().enumerate() {
            let x = self.rms_norm(&h, &block.input_norm, prof)?;
            prof.mark(Stage::Norm, &[&x])?;
            let qkv = block.qkv.forward(&x)?;
            prof.mark(Stage::Projection, &[&qkv])?;
            // Queries and keys rotate together: [t, heads + kv_heads, hd].
            let parts = split_last(&qkv, &[(heads + kv_heads) * hd, kv_heads * hd]);
            let qk = parts[0].reshape(&[t as i32, heads + kv_heads, hd])?;
            let qk = self.rope.apply(&qk, &angles, fused)?;
            let q = qk.index((.., 0..heads));
            let k =
                qk.index((.., heads..heads + kv_heads))
                    .reshape(&[t as i32, 1, kv_heads * hd])?;
            let v = parts[1].reshape(&[t as i32, 1, kv_heads * hd])?;
            prof.mark(Stage::Rope, &[&q, &k, &v])?;

            let Some((old_k, old_v)) = pool.layer(layer).cloned() else {
                return Err(mlx_rs::error::Exception::custom("KV pool not allocated"));
            };
            let keys = ops::indexing::scatter_single(&old_k, &slots, &k, 0)?;
            let values = ops::indexing::scatter_single(&old_v, &slots, &v, 0)?;
            drop((old_k, old_v));
            pool.set_layer(layer, keys.clone(), values.clone());
            prof.mark(Stage::KvWrite, &[&keys, &values])?;

            let mut outs: Vec<Array> = Vec::with_capacity(1 + batch.chunks.len());
            if let Some(o) = attention.decode(&q, &keys, &values, fused, prof)? {
                outs.push(o);
            }
            for (i, chunk) in batch.chunks.iter().enumerate() {
                let (s, n) = (chunk.start as i32, chunk.len as i32);
                outs.push(attention.chunk(i, &q.index(s..s + n), &keys, &values, fused, prof)?);
            }
            let attn = if outs.len() == 1 {
                outs.pop().unwrap_or_else(|| Array::from_int(0))
            } else {
                ops::concatenate(&outs, 0)?
            };
            prof.mark(Stage::Attention, &[&attn])?;
            let o = block.o.forward(&attn)?;
            prof.mark(Stage::Projection, &[&o])?;
            h = h.add(o)?;
            prof.mark(Stage::Elementwise, &[&h])?;

            let x = self.rms_norm(&h, &block.post_attention_norm, prof)?;
            prof.mark(Stage::Norm, &[&x])?;
            let gu = block.gate_up.forward(&x)?;
            prof.mark(Stage::Projection, &[&gu])?;
            let inter = c.intermediate_size as i32;
            let act = if fused.is_some() && gu.dtype() == Dtype::Float32 {
                // On the host, in the projection's own buffer: MLX's CPU
                // exp is scalar (see `host_ops`).
                let act = host_ops::silu_mul_in_place(gu, inter as usize)?;
                prof.host(Stage::Elementwise);
                act
            } else {
                let gu = split_last(&gu, &[inter, inter]);
                let act = match fused {
                    Some(f) => f.silu_mul(&gu[0], &gu[1])?,
                    None => mlx_rs::nn::silu(&gu[0])?.multiply(&gu[1])?,
                };
                prof.mark(Stage::Elementwise, &[&act])?;
                act
            };
            let down = block.down.forward(&act)?;
            prof.mark(Stage::Projection, &[&down])?;
            h = h.add(down)?;
            prof.mark(Stage::Elementwise, &[&h])?;
        }
        if batch.sample_at.is_empty() {
            return Ok(None);
        }
        let at: Vec<i32> = batch.sample_at.iter().map(|&i| i as i32).collect();
        let last = h.take_axis(Array::from_slice(&at, &[at.len() as i32]), 0)?;
        let x = self.rms_norm(&last, &self.norm, prof)?;
        prof.mark(Stage::Norm, &[&x])?;
        let logits = match &self.lm_head {
            Some(head) => head.forward(&x)?,
            None => self.embed.as_linear(&x)?,
        };
        prof.mark(Stage::LmHead, &[&logits])?;
        let logits = if logits.dtype() == Dtype::Float32 {
            logits
        } else {
            logits.as_dtype(Dtype::Float32)?
        };
        Ok(Some(logits))
    }

    fn rms_norm(&self, x: &Array, w: &Array, prof: &mut Profiler) -> MlxResult<Array> {
        match &self.fused {
            Some(f) => match host_ops::rms_norm(x, w, self.config.rms_norm_eps)? {
                Some(out) => {
                    // Evaluated on the host already: the norm's time.
                    prof.host(Stage::Norm);
                    Ok(out)
                }
                None => f.rms_norm(x, w),
            },
            None => fast::rms_norm(x, Some(w), self.config.rms_norm_eps),
        }
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
