//! Attention over the block pool: what a step reads (built once per step,
//! shared by every layer) and the ways of attending.
//!
//! All but the host path read each sequence's keys and values by gathering
//! its whole blocks along the pool's first axis (the fast, contiguous case
//! of MLX's gather).
//!
//! - **Fast** (GPU): the gathered blocks are laid out heads-first and fed to
//!   MLX's `scaled_dot_product_attention`, a fused kernel there.
//! - **Host** (CPU, f32): decode rows attend on the host, reading each
//!   row's keys and values straight from the pool through its block table
//!   (no gather, no padding mask; see [`host_ops`]).
//! - **Fused** (CPU, where that op falls back to primitives and runs one
//!   BLAS call per sequence and head): a prefill chunk stacks the query
//!   heads that share a KV head into one matmul per KV head over the
//!   gathered blocks; its f32 softmax runs on the host over each query's
//!   visible keys only ([`host_ops`]), since MLX's CPU `exp` is scalar, and
//!   other dtypes use the compiled softmax of [`Fused`] with a causal mask.
//!   In dtypes other than f32 a decode step attends for every sequence
//!   with two matmuls per sequence over the gathered blocks as they lie
//!   (`[span, kv_heads * head_dim]`, no transpose): each query head's
//!   vector is placed in its KV head's slot of a zero `kv_heads * head_dim`
//!   row (block-diagonal queries), so one product gives every head's
//!   scores, and the KV head's own slot is picked out of the weighted sum
//!   afterwards.

use mlx_rs::{
    error::Exception,
    fast::{self, ScaledDotProductAttentionMask},
    ops::{self, indexing::IndexOp},
    Array, Dtype,
};

use super::{
    fused::Fused,
    host_ops::{self, CausalRows, DecodeRow, PoolAttention},
    Chunk, StepBatch,
};
use crate::profile::{Profiler, Stage};

type MlxResult<T> = mlx_rs::error::Result<T>;

/// The shape constants attention needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub(crate) heads: i32,
    pub(crate) kv_heads: i32,
    pub(crate) head_dim: i32,
    pub(crate) scale: f32,
}

impl Heads {
    fn rep(self) -> i32 {
        self.heads / self.kv_heads
    }

    fn width(self) -> i32 {
        self.kv_heads * self.head_dim
    }
}

/// How a prefill chunk's softmax on the fused path hides the keys past
/// each query's position.
enum ChunkSoftmax {
    /// f32 scores: normalised on the host over each row's visible keys
    /// (see [`host_ops`]).
    Host(CausalRows),
    /// Other dtypes: the compiled softmax with an additive causal mask
    /// `[chunk, span]`.
    Masked(Array),
}

/// Which pool blocks one attention call reads.
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

    fn span(&self) -> i32 {
        self.blocks * self.block_size
    }

    /// The rows' keys or values as they lie in the pool: `[rows, tokens,
    /// kv_heads * head_dim]`, whole blocks taken at once.
    fn packed(&self, pool: &Array, width: i32) -> MlxResult<Array> {
        let blocks = pool.reshape(&[-1, self.block_size * width])?;
        let g = blocks
            .take_axis(&self.ids, 0)?
            .reshape(&[self.rows, self.span(), width])?;
        Ok(match self.keep {
            Some(keep) if keep < self.span() => g.index((.., 0..keep)),
            _ => g,
        })
    }

    /// The same, heads first: `[rows, kv_heads, tokens, head_dim]`.
    fn heads_first(&self, pool: &Array, h: Heads) -> MlxResult<Array> {
        let g = self.packed(pool, h.width())?;
        let tokens = g.dim(1);
        g.reshape(&[self.rows, tokens, h.kv_heads, h.head_dim])?
            .transpose_axes(&[0, 2, 1, 3])
    }
}

/// Decode attention's reads.
enum DecodePlan {
    /// f32 on the CPU: each row's pool slots, read straight from the pool
    /// on the host (see [`host_ops`]).
    Host(Vec<DecodeRow>),
    /// Otherwise: gathered blocks.
    Gathered(GatheredDecode),
}

/// Decode attention over gathered blocks: the blocks, an additive mask that
/// hides what lies past each sequence's own length, and for the fused path
/// the selector of each query head's KV head.
struct GatheredDecode {
    gather: BlockGather,
    /// `[rows, 1, span]` (fused) or `[rows, 1, 1, span]` (fast).
    mask: Array,
    /// `[1, kv_heads, 1, kv_heads, 1]`: where a query group meets its own
    /// KV head's slot, the softmax scale (to place the queries) and 1 (to
    /// pick the output); fused path only.
    selector: Option<(Array, Array)>,
}

/// What attention reads in one step, built once and shared by every layer.
pub(crate) struct AttentionPlan {
    decode: Option<DecodePlan>,
    /// Per prefill chunk: its blocks and, on the fused path, how its
    /// softmax hides the future.
    chunks: Vec<(BlockGather, Option<ChunkSoftmax>)>,
    heads: Heads,
}

impl AttentionPlan {
    /// Plans the reads of `batch` over blocks of `bs` tokens; `fused` picks
    /// the CPU path's masks and selector.
    pub(crate) fn new(
        batch: &StepBatch<'_>,
        bs: usize,
        dtype: Dtype,
        heads: Heads,
        fused: bool,
    ) -> MlxResult<Self> {
        let cast = |a: Array| -> MlxResult<Array> {
            if dtype == Dtype::Float32 {
                Ok(a)
            } else {
                a.as_dtype(dtype)
            }
        };
        let decode = if batch.decodes.is_empty() {
            None
        } else if fused && dtype == Dtype::Float32 {
            let rows = batch
                .decodes
                .iter()
                .map(|d| DecodeRow::new(d.table, d.position + 1, bs))
                .collect::<MlxResult<_>>()?;
            Some(DecodePlan::Host(rows))
        } else {
            let rows: Vec<(&[u32], usize)> = batch
                .decodes
                .iter()
                .map(|d| (d.table, d.position + 1))
                .collect();
            let gather = BlockGather::new(&rows, bs, None);
            let span = gather.span() as usize;
            let mut mask = vec![f32::NEG_INFINITY; rows.len() * span];
            for (r, &(_, len)) in rows.iter().enumerate() {
                mask[r * span..r * span + len].fill(0.0);
            }
            let n = rows.len() as i32;
            let shape: &[i32] = if fused {
                &[n, 1, span as i32]
            } else {
                &[n, 1, 1, span as i32]
            };
            let mask = cast(Array::from_slice(&mask, shape))?;
            let selector = if fused {
                let eye = |value: f32| {
                    let kv = heads.kv_heads as usize;
                    let mut sel = vec![0f32; kv * kv];
                    for g in 0..kv {
                        sel[g * kv + g] = value;
                    }
                    let kv = kv as i32;
                    cast(Array::from_slice(&sel, &[1, kv, 1, kv, 1]))
                };
                Some((eye(heads.scale)?, eye(1.0)?))
            } else {
                None
            };
            Some(DecodePlan::Gathered(GatheredDecode {
                gather,
                mask,
                selector,
            }))
        };
        let mut chunks = Vec::with_capacity(batch.chunks.len());
        for chunk in &batch.chunks {
            let end = chunk.position + chunk.len;
            // The fused path attends over whole blocks (the mask hides what
            // lies past the chunk): a span of at least one block, never of
            // one token, is what keeps its shapeless softmax sound (see
            // [`Fused`]).
            let (gather, mask) = if fused {
                let gather = BlockGather::new(&[(chunk.table, end)], bs, None);
                let span = gather.span() as usize;
                let softmax = if dtype == Dtype::Float32 {
                    ChunkSoftmax::Host(CausalRows {
                        queries: chunk.len,
                        position: chunk.position,
                    })
                } else {
                    ChunkSoftmax::Masked(cast(causal_mask(chunk, span))?)
                };
                (gather, Some(softmax))
            } else {
                (BlockGather::new(&[(chunk.table, end)], bs, Some(end)), None)
            };
            chunks.push((gather, mask));
        }
        Ok(Self {
            decode,
            chunks,
            heads,
        })
    }

    /// Attention of the step's decodes (the first `rows` rows of `q`,
    /// `[rows, heads, head_dim]`) over `keys` and `values` (one layer of the
    /// pool, already holding this step's tokens). Returns `[rows, heads *
    /// head_dim]`, or `None` when the step has no decodes.
    pub(crate) fn decode(
        &self,
        q: &Array,
        keys: &Array,
        values: &Array,
        fused: Option<&Fused>,
        prof: &mut Profiler,
    ) -> MlxResult<Option<Array>> {
        let Some(plan) = &self.decode else {
            return Ok(None);
        };
        let h = self.heads;
        let plan = match plan {
            DecodePlan::Host(rows) => {
                return self.decode_on_host(q, keys, values, rows, prof).map(Some)
            }
            DecodePlan::Gathered(plan) => plan,
        };
        let rows = plan.gather.rows;
        let q = q.index(0..rows);
        let out = match (fused, &plan.selector) {
            (Some(fused), Some((place, pick))) => {
                let kv = h.kv_heads;
                // [rows, kv, rep, 1, hd] * [1, kv, 1, kv, 1]: each query
                // head's vector (scaled) in its KV head's slot, zeros
                // elsewhere.
                let q_bd = q
                    .reshape(&[rows, kv, h.rep(), 1, h.head_dim])?
                    .multiply(place)?
                    .reshape(&[rows, h.heads, h.width()])?;
                let kk = plan.gather.packed(keys, h.width())?;
                let vv = plan.gather.packed(values, h.width())?;
                prof.mark(Stage::KvGather, &[&kk, &vv, &q_bd])?;
                let scores = ops::matmul(&q_bd, kk.transpose_axes(&[0, 2, 1])?)?;
                let p = fused.softmax(&scores, &plan.mask)?;
                // [rows, heads, width]: every KV head's weighted sum; keep
                // the query's own.
                let o = ops::matmul(&p, &vv)?.reshape(&[rows, kv, h.rep(), kv, h.head_dim])?;
                o.multiply(pick)?.sum_axis(3, false)?
            }
            _ => {
                let q = q.reshape(&[rows, h.kv_heads, h.rep(), h.head_dim])?;
                let kk = plan.gather.heads_first(keys, h)?;
                let vv = plan.gather.heads_first(values, h)?;
                prof.mark(Stage::KvGather, &[&kk, &vv])?;
                fast::scaled_dot_product_attention(
                    &q,
                    &kk,
                    &vv,
                    h.scale,
                    ScaledDotProductAttentionMask::Array(&plan.mask),
                    None,
                )?
            }
        };
        Ok(Some(out.reshape(&[rows, h.heads * h.head_dim])?))
    }

    /// Decode attention on the host, from the pool (see [`host_ops`]).
    fn decode_on_host(
        &self,
        q: &Array,
        keys: &Array,
        values: &Array,
        rows: &[DecodeRow],
        prof: &mut Profiler,
    ) -> MlxResult<Array> {
        let h = self.heads;
        let n = rows.len() as i32;
        // A contiguous copy of the rows' queries (a few KB).
        let q = q
            .index(0..n)
            .reshape(&[n, h.heads * h.head_dim])?
            .contiguous()?;
        prof.mark(Stage::KvGather, &[&q, keys, values])?;
        let out = host_ops::decode_attention(
            host_view(&q)?,
            host_view(keys)?,
            host_view(values)?,
            rows,
            PoolAttention {
                heads: h.heads as usize,
                kv_heads: h.kv_heads as usize,
                head_dim: h.head_dim as usize,
                scale: h.scale,
            },
        )?;
        prof.host(Stage::Attention);
        Ok(Array::from_slice(&out, &[n, h.heads * h.head_dim]))
    }

    /// Attention of prefill chunk `i`, whose queries are `q`
    /// (`[len, heads, head_dim]`), over its own blocks with a causal mask.
    /// Returns `[len, heads * head_dim]`.
    pub(crate) fn chunk(
        &self,
        i: usize,
        q: &Array,
        keys: &Array,
        values: &Array,
        fused: Option<&Fused>,
        prof: &mut Profiler,
    ) -> MlxResult<Array> {
        let Some((gather, mask)) = self.chunks.get(i) else {
            return Err(mlx_rs::error::Exception::custom(format!(
                "no attention plan for chunk {i}"
            )));
        };
        let h = self.heads;
        let n = q.dim(0);
        let (kv, rep, hd) = (h.kv_heads, h.rep(), h.head_dim);
        // [kv, rep * n, hd]: the query heads that share a KV head, stacked.
        let grouped = q
            .reshape(&[n, kv, rep, hd])?
            .transpose_axes(&[1, 2, 0, 3])?;
        let kk = gather.heads_first(keys, h)?.reshape(&[kv, -1, hd])?;
        let vv = gather.heads_first(values, h)?.reshape(&[kv, -1, hd])?;
        prof.mark(Stage::KvGather, &[&kk, &vv])?;
        let o = match (fused, mask) {
            (Some(fused), Some(mask)) => {
                let qg = grouped
                    .multiply(Array::from_f32(h.scale))?
                    .reshape(&[kv, rep * n, hd])?;
                let scores = ops::matmul(&qg, kk.transpose_axes(&[0, 2, 1])?)?;
                let span = scores.dim(2);
                let p = match mask {
                    ChunkSoftmax::Host(rows) => {
                        // The scores are evaluated, then normalised on the
                        // host: both are attention's time.
                        prof.mark(Stage::Attention, &[&scores])?;
                        let p = host_ops::softmax_in_place(scores, *rows)?;
                        prof.host(Stage::Attention);
                        p
                    }
                    ChunkSoftmax::Masked(mask) => fused
                        .softmax(&scores.reshape(&[kv, rep, n, span])?, mask)?
                        .reshape(&[kv, rep * n, span])?,
                };
                ops::matmul(&p, &vv)?.reshape(&[kv, rep, n, hd])?
            }
            _ => {
                let qc = grouped.reshape(&[1, h.heads, n, hd])?;
                fast::scaled_dot_product_attention(
                    &qc,
                    kk.reshape(&[1, kv, -1, hd])?,
                    vv.reshape(&[1, kv, -1, hd])?,
                    h.scale,
                    ScaledDotProductAttentionMask::Causal,
                    None,
                )?
                .reshape(&[kv, rep, n, hd])?
            }
        };
        o.transpose_axes(&[2, 0, 1, 3])?.reshape(&[n, h.heads * hd])
    }
}

/// An evaluated f32 array's data, for attention on the host.
fn host_view(a: &Array) -> MlxResult<&[f32]> {
    a.try_as_slice::<f32>()
        .map_err(|e| Exception::custom(format!("decode attention input: {e}")))
}

/// The additive causal mask of a chunk over `span` keys (its context and
/// any rest of its last block): query `i` (at position `position + i`) sees
/// keys up to its own position.
fn causal_mask(chunk: &Chunk<'_>, span: usize) -> Array {
    let n = chunk.len;
    let mut mask = vec![f32::NEG_INFINITY; n * span];
    for i in 0..n {
        let visible = chunk.position + i + 1;
        mask[i * span..i * span + visible].fill(0.0);
    }
    Array::from_slice(&mask, &[n as i32, span as i32])
}
