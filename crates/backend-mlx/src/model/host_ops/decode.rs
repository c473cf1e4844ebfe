//! Decode attention on the host, over slices of one layer of the block
//! pool.

use std::ops::Range;

use mlx_rs::error::Exception;

use crate::team;

use super::kernels::{has_avx2, softmax_row_portable, LANES};

/// The shape of decode attention over the block pool.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolAttention {
    /// Query heads.
    pub(crate) heads: usize,
    /// KV heads; query head `h` reads KV head `h / (heads / kv_heads)`.
    pub(crate) kv_heads: usize,
    /// Values per head.
    pub(crate) head_dim: usize,
    /// The scores' scale.
    pub(crate) scale: f32,
}

/// One decoding sequence: the pool slot of each token it attends to (its
/// context and this step's token, already written to the pool), looked up
/// once per step for every layer.
#[derive(Debug, Clone)]
pub(crate) struct DecodeRow {
    /// Slot `block * block_size + offset` of each token, in order.
    slots: Vec<usize>,
    /// The largest of `slots`.
    max_slot: usize,
}

impl DecodeRow {
    /// The slots of the first `len` tokens of a sequence whose block table
    /// is `table`, in blocks of `block_size` tokens.
    pub(crate) fn new(table: &[u32], len: usize, block_size: usize) -> Result<Self, Exception> {
        if len == 0 || block_size == 0 {
            return Err(Exception::custom("a decode row attends to no token"));
        }
        if table.len() < len.div_ceil(block_size) {
            return Err(Exception::custom("a block table shorter than its sequence"));
        }
        let slots: Vec<usize> = (0..len)
            .map(|p| table[p / block_size] as usize * block_size + p % block_size)
            .collect();
        let max_slot = slots.iter().copied().max().unwrap_or(0);
        Ok(Self { slots, max_slot })
    }
}

/// Decode attention read straight from one layer of the block pool:
/// `q` is `[rows, heads, head_dim]`, `keys` and `values` are the layer's
/// pool (`[slots, kv_heads * head_dim]`, slot `block * block_size +
/// offset`). Returns `[rows, heads * head_dim]`. No gather copies the
/// blocks and no mask pads the rows to the longest: each row reads its own
/// tokens once for all the query heads that share a KV head.
pub(crate) fn decode_attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    rows: &[DecodeRow],
    shape: PoolAttention,
) -> Result<Vec<f32>, Exception> {
    let PoolAttention {
        heads,
        kv_heads,
        head_dim: hd,
        ..
    } = shape;
    let width = kv_heads * hd;
    if kv_heads == 0 || heads % kv_heads != 0 || hd == 0 {
        return Err(Exception::custom("a decode attention shape with no heads"));
    }
    if q.len() != rows.len() * heads * hd || keys.len() != values.len() {
        return Err(Exception::custom(
            "decode attention inputs of the wrong size",
        ));
    }
    let slots = keys.len() / width;
    if rows.iter().any(|row| row.max_slot >= slots) {
        return Err(Exception::custom("a block id past the KV pool"));
    }
    let mut out = vec![0f32; q.len()];
    let row_out = heads * hd;
    let avx2 = has_avx2();
    let pool = PoolLayer {
        keys,
        values,
        shape,
    };
    // Rows split into contiguous groups of about equal token counts, one
    // per thread of the team (which spins between jobs, so that handing
    // out a layer's rows costs microseconds: starting threads for them
    // each layer cost more than it saved). Each group writes its own
    // rows of `out`.
    let tokens: usize = rows.iter().map(|r| r.slots.len()).sum();
    let parts = if tokens >= SPLIT_FROM_TOKENS {
        team::parts().min(rows.len())
    } else {
        1
    };
    let groups = row_groups(rows, parts);
    let mut outs = Vec::with_capacity(groups.len());
    let mut rest = out.as_mut_slice();
    for group in &groups {
        let (mine, tail) = rest.split_at_mut(group.len() * row_out);
        outs.push(mine);
        rest = tail;
    }
    team::for_each_slice(outs, |part, out| {
        let Some(group) = groups.get(part) else {
            return;
        };
        // One scratch row of scores per group, reused by its rows.
        let mut scores = Vec::new();
        let q_rows = &q[group.start * row_out..group.end * row_out];
        for ((q_row, o), row) in q_rows
            .chunks_exact(row_out)
            .zip(out.chunks_exact_mut(row_out))
            .zip(&rows[group.clone()])
        {
            attend_row(q_row, &pool, row, o, &mut scores, avx2);
        }
    });
    Ok(out)
}

/// Below this many tokens over all rows, a layer's decode attention runs on
/// the calling thread alone (a few microseconds of work).
const SPLIT_FROM_TOKENS: usize = 512;

/// `rows` cut into at most `parts` contiguous ranges of about equal token
/// counts (never an empty one).
fn row_groups(rows: &[DecodeRow], parts: usize) -> Vec<Range<usize>> {
    let total: usize = rows.iter().map(|r| r.slots.len()).sum();
    let mut groups = Vec::with_capacity(parts);
    let mut start = 0;
    let mut seen = 0;
    for (i, row) in rows.iter().enumerate() {
        seen += row.slots.len();
        // Close a group once it holds its share of the tokens so far.
        if seen * parts >= total * (groups.len() + 1) && groups.len() + 1 < parts {
            groups.push(start..i + 1);
            start = i + 1;
        }
    }
    if start < rows.len() {
        groups.push(start..rows.len());
    }
    groups
}

/// One layer of the pool as decode attention reads it.
struct PoolLayer<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    shape: PoolAttention,
}

/// One row of [`decode_attention`] into `out`, with `scores` as scratch;
/// `avx2` from [`has_avx2`].
fn attend_row(
    q: &[f32],
    pool: &PoolLayer<'_>,
    row: &DecodeRow,
    out: &mut [f32],
    scores: &mut Vec<f32>,
    avx2: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` says the CPU has AVX2 and FMA, all this needs.
        unsafe { attend_row_avx2(q, pool, row, out, scores) };
        return;
    }
    let _ = avx2;
    attend_row_portable(q, pool, row, out, scores, dot);
}

/// [`attend_row_portable`] compiled for AVX2, with [`dot_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_row_avx2(
    q: &[f32],
    pool: &PoolLayer<'_>,
    row: &DecodeRow,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    // SAFETY: this function has the features `dot_avx2` needs.
    attend_row_portable(q, pool, row, out, scores, |a, b| unsafe { dot_avx2(a, b) });
}

/// The scores of every query head against each of the row's keys, their
/// softmax, then the weighted sum of the values. Each token's keys (and
/// then values) for all KV heads are read once, in pool order, so that
/// the reads stream through memory: a layer's pool is cold in the caches
/// after the matmuls around it. Slots were checked by the caller.
#[inline(always)]
fn attend_row_portable(
    q: &[f32],
    pool: &PoolLayer<'_>,
    row: &DecodeRow,
    out: &mut [f32],
    scores: &mut Vec<f32>,
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    let PoolLayer {
        keys,
        values,
        shape,
    } = *pool;
    let (hd, len) = (shape.head_dim, row.slots.len());
    let rep = shape.heads / shape.kv_heads;
    let width = shape.kv_heads * hd;
    scores.clear();
    scores.resize(shape.heads * len, 0.0);
    for (p, &slot) in row.slots.iter().enumerate() {
        let start = slot * width;
        let k = &keys[start..start + width];
        for (h, q_head) in q.chunks_exact(hd).enumerate() {
            let g = h / rep;
            scores[h * len + p] = dot(q_head, &k[g * hd..(g + 1) * hd]) * shape.scale;
        }
    }
    for head_scores in scores.chunks_exact_mut(len) {
        softmax_row_portable(head_scores);
    }
    out.fill(0.0);
    for (p, &slot) in row.slots.iter().enumerate() {
        let start = slot * width;
        let v = &values[start..start + width];
        for (h, o_head) in out.chunks_exact_mut(hd).enumerate() {
            let g = h / rep;
            axpy(o_head, scores[h * len + p], &v[g * hd..(g + 1) * hd]);
        }
    }
}

/// The dot product of two equal-length vectors with AVX2 and FMA: two
/// independent 8-lane sums, so that consecutive FMAs need not wait on each
/// other. Written with intrinsics because the compiler did not make fast
/// code of the portable [`dot`]: decode attention at batch 32 took 18 ms a
/// step with it, built for AVX2, and 12 ms with this.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::{
        _mm256_add_ps, _mm256_castps256_ps128, _mm256_extractf128_ps, _mm256_fmadd_ps,
        _mm256_loadu_ps, _mm256_setzero_ps, _mm_add_ps, _mm_add_ss, _mm_cvtss_f32, _mm_movehl_ps,
        _mm_shuffle_ps,
    };
    let n = a.len().min(b.len());
    let whole = n / 16 * 16;
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i < whole {
        // SAFETY: `i + 16 <= n`, so both 8-float loads at `i` and `i + 8`
        // stay inside `a` and `b`; unaligned loads need no alignment.
        unsafe {
            let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8)), s1);
        }
        i += 16;
    }
    let s = _mm256_add_ps(s0, s1);
    let q = _mm_add_ps(_mm256_extractf128_ps::<1>(s), _mm256_castps256_ps128(s));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let q = _mm_add_ss(q, _mm_shuffle_ps::<1>(q, q));
    let tail: f32 = a[whole..n]
        .iter()
        .zip(&b[whole..n])
        .map(|(x, y)| x * y)
        .sum();
    _mm_cvtss_f32(q) + tail
}

/// The dot product of two equal-length vectors, in `LANES` partial sums.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a8, a_rest) = a.as_chunks::<LANES>();
    let (b8, b_rest) = b.as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for (x, y) in a8.iter().zip(b8) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum::<f32>()
}

/// `out += w * v`, in fixed-size lanes.
#[inline(always)]
fn axpy(out: &mut [f32], w: f32, v: &[f32]) {
    let (o8, o_rest) = out.as_chunks_mut::<LANES>();
    let (v8, v_rest) = v.as_chunks::<LANES>();
    for (o, x) in o8.iter_mut().zip(v8) {
        for l in 0..LANES {
            o[l] += w * x[l];
        }
    }
    for (o, &x) in o_rest.iter_mut().zip(v_rest) {
        *o += w * x;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::model::host_ops::kernels::reference_softmax;

    /// Decode attention from the pool against a direct computation over
    /// each row's own keys, with rows of different lengths, scattered
    /// blocks and grouped heads.
    #[test]
    fn decode_attention_matches_a_direct_computation() {
        let shape = PoolAttention {
            heads: 6,
            kv_heads: 2,
            head_dim: 11,
            scale: 0.3,
        };
        let (heads, kv, hd, bs) = (6, 2, 11, 4);
        let width = kv * hd;
        let slots = 12 * bs;
        let val = |i: usize, m: usize| ((i * m % 37) as f32 - 18.0) / 9.0;
        let keys: Vec<f32> = (0..slots * width).map(|i| val(i, 7)).collect();
        let values: Vec<f32> = (0..slots * width).map(|i| val(i, 11)).collect();
        let tables: [(&[u32], usize); 3] = [(&[5, 2, 9], 10), (&[0], 1), (&[11, 3, 7, 1], 16)];
        let rows: Vec<DecodeRow> = tables
            .iter()
            .map(|&(table, len)| DecodeRow::new(table, len, bs).unwrap())
            .collect();
        let q: Vec<f32> = (0..rows.len() * heads * hd).map(|i| val(i, 5)).collect();
        let got = decode_attention(&q, &keys, &values, &rows, shape).unwrap();
        // The portable build gives the same, where the AVX2 one ran above.
        let row_out = heads * hd;
        let mut portable = vec![0f32; got.len()];
        for ((q_row, o), row) in q
            .chunks_exact(row_out)
            .zip(portable.chunks_exact_mut(row_out))
            .zip(&rows)
        {
            let pool = PoolLayer {
                keys: &keys,
                values: &values,
                shape,
            };
            attend_row(q_row, &pool, row, o, &mut Vec::new(), false);
        }
        for (a, b) in got.iter().zip(&portable) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        for (r, &(table, len)) in tables.iter().enumerate() {
            for h in 0..heads {
                let g = h / (heads / kv);
                let qh = &q[(r * heads + h) * hd..][..hd];
                let at = |p: usize| (table[p / bs] as usize * bs + p % bs) * width + g * hd;
                let scores: Vec<f32> = (0..len)
                    .map(|p| {
                        let k = &keys[at(p)..][..hd];
                        qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * 0.3
                    })
                    .collect();
                let weights = reference_softmax(&scores);
                for d in 0..hd {
                    let want: f32 = (0..len).map(|p| weights[p] * values[at(p) + d]).sum();
                    let got = got[(r * heads + h) * hd + d];
                    assert!(
                        (got - want).abs() < 1e-5,
                        "row {r} head {h} dim {d}: {got} vs {want}"
                    );
                }
            }
        }
        // A table that does not cover its row, a block past the pool and a
        // row with no token are errors, not panics.
        assert!(DecodeRow::new(&[0], 5, bs).is_err());
        let past = [DecodeRow::new(&[12], 1, bs).unwrap()];
        assert!(decode_attention(&q[..heads * hd], &keys, &values, &past, shape).is_err());
        assert!(DecodeRow::new(&[0], 0, bs).is_err());
    }

    /// Enough rows and tokens that the team splits the rows: every row's
    /// result is the same bits as when it is computed alone.
    #[test]
    fn split_rows_match_rows_computed_alone() {
        let shape = PoolAttention {
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            scale: 0.25,
        };
        let (bs, width) = (8, 2 * 16);
        let blocks = 200;
        let val = |i: usize, m: usize| ((i * m % 41) as f32 - 20.0) / 13.0;
        let keys: Vec<f32> = (0..blocks * bs * width).map(|i| val(i, 3)).collect();
        let values: Vec<f32> = (0..blocks * bs * width).map(|i| val(i, 7)).collect();
        // 9 rows of 30 to 110 tokens in scattered blocks: over the split
        // threshold.
        let rows: Vec<DecodeRow> = (0..9)
            .map(|r| {
                let len: usize = 30 + r * 10;
                let table: Vec<u32> = (0..len.div_ceil(bs))
                    .map(|b| ((b * 9 + r) % blocks) as u32)
                    .collect();
                DecodeRow::new(&table, len, bs).unwrap()
            })
            .collect();
        assert!(rows.iter().map(|r| r.slots.len()).sum::<usize>() >= SPLIT_FROM_TOKENS);
        let row_out = 4 * 16;
        let q: Vec<f32> = (0..rows.len() * row_out).map(|i| val(i, 5)).collect();
        let together = decode_attention(&q, &keys, &values, &rows, shape).unwrap();
        for (r, row) in rows.iter().enumerate() {
            let q_row = &q[r * row_out..(r + 1) * row_out];
            let alone =
                decode_attention(q_row, &keys, &values, std::slice::from_ref(row), shape).unwrap();
            assert_eq!(alone, together[r * row_out..(r + 1) * row_out], "row {r}");
        }
    }

    proptest::proptest! {
        #[test]
        fn row_groups_cover_every_row_once_in_order(
            lens in proptest::collection::vec(1usize..300, 1..40),
            parts in 1usize..6,
        ) {
            let rows: Vec<DecodeRow> = lens
                .iter()
                .map(|&len| DecodeRow::new(&vec![0; len], len, 1).unwrap())
                .collect();
            let groups = row_groups(&rows, parts);
            proptest::prop_assert!(!groups.is_empty() && groups.len() <= parts);
            let mut next = 0;
            for group in &groups {
                proptest::prop_assert_eq!(group.start, next);
                proptest::prop_assert!(group.end > group.start);
                next = group.end;
            }
            proptest::prop_assert_eq!(next, rows.len());
        }
    }
}
