//! Real MLX (on the CPU in CI) against plain-Rust reference computations.
//!
//! Each test runs one MLX operation that the model will use and checks it
//! against an independent implementation written here on f32 slices, never
//! against MLX itself, so that a wrong binding, layout or kernel shows up.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;

use mlx_rs::{
    fast::{self, ScaledDotProductAttentionMask},
    ops, Array,
};
use proptest::prelude::*;

/// A small deterministic generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in [-1, 1).
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.next_f32()).collect()
    }
}

fn array(data: &[f32], shape: &[usize]) -> Array {
    let shape: Vec<i32> = shape.iter().map(|&d| d as i32).collect();
    Array::from_slice(data, &shape)
}

/// Evaluates `a` and copies it out in row-major order.
fn values(a: &Array) -> Vec<f32> {
    let a = a.contiguous().unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

fn assert_close(actual: &[f32], expected: &[f32], tol: f32) {
    assert_eq!(actual.len(), expected.len(), "lengths differ");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= tol * (1.0 + e.abs()),
            "element {i}: MLX gave {a}, the reference {e}"
        );
    }
}

/// `a` (m x k) times `b` (k x n), row-major.
fn ref_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    out
}

#[test]
fn matmul_matches_the_reference() {
    let (m, k, n) = (5, 37, 11);
    let mut rng = Rng::new(1);
    let (a, b) = (rng.vec(m * k), rng.vec(k * n));
    let got = ops::matmul(array(&a, &[m, k]), array(&b, &[k, n])).unwrap();
    assert_eq!(got.shape(), &[m as i32, n as i32]);
    assert_close(&values(&got), &ref_matmul(&a, &b, m, k, n), 1e-5);
}

/// A decode-shaped product (`x W^T`, a few rows) through MLX reaches
/// backend-mlx's own kernel and gives the reference's values, with a width
/// and depth that leave partial tiles and a masked tail (on a CPU without
/// AVX2 the product goes to OpenBLAS, and only the values are checked).
#[cfg(target_os = "linux")]
#[test]
fn few_row_matmuls_go_through_our_kernel() {
    let (k, n) = (83, 37);
    let mut rng = Rng::new(11);
    for m in [2, 8, 13] {
        let (x, w) = (rng.vec(m * k), rng.vec(n * k));
        let (routed, _) = backend_mlx::blas::routed_and_passed();
        let w = array(&w, &[n, k]);
        let got = ops::matmul(array(&x, &[m, k]), w.t()).unwrap();
        let expected = ref_matmul(&x, &values(&w.t()), m, k, n);
        assert_close(&values(&got), &expected, 1e-5);
        let (after, _) = backend_mlx::blas::routed_and_passed();
        if backend_mlx::blas::few_rows_active() {
            assert!(after > routed, "a {m}-row product did not reach our kernel");
        }
    }
}

/// libmlx binds `cblas_sgemm` to backend-mlx's router: a single-row product
/// (a decode at batch 1, `x W^T`) goes to sgemv, and gives the same values.
#[cfg(target_os = "linux")]
#[test]
fn single_row_matmuls_go_through_the_sgemv_router() {
    let (k, n) = (64, 48);
    let mut rng = Rng::new(9);
    let (x, w) = (rng.vec(k), rng.vec(n * k));
    let (routed, _) = backend_mlx::blas::routed_and_passed();
    let w = array(&w, &[n, k]);
    let got = ops::matmul(array(&x, &[1, k]), w.t()).unwrap();
    let expected = ref_matmul(&x, &values(&w.t()), 1, k, n);
    assert_close(&values(&got), &expected, 1e-5);
    let (after, _) = backend_mlx::blas::routed_and_passed();
    assert!(
        after > routed,
        "libmlx did not call this process's cblas_sgemm"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any shape, including the degenerate ones, matches the reference.
    #[test]
    fn matmul_matches_the_reference_for_any_shape(
        m in 1usize..9, k in 1usize..70, n in 1usize..9, seed in any::<u64>()
    ) {
        let mut rng = Rng::new(seed);
        let (a, b) = (rng.vec(m * k), rng.vec(k * n));
        let got = ops::matmul(array(&a, &[m, k]), array(&b, &[k, n])).unwrap();
        assert_close(&values(&got), &ref_matmul(&a, &b, m, k, n), 1e-5);
    }
}

#[test]
fn rms_norm_matches_the_reference() {
    let (rows, dim, eps) = (3, 64, 1e-5);
    let mut rng = Rng::new(2);
    let (x, w) = (rng.vec(rows * dim), rng.vec(dim));
    let got = fast::rms_norm(array(&x, &[rows, dim]), Some(&array(&w, &[dim])), eps).unwrap();

    let mut expected = Vec::with_capacity(rows * dim);
    for row in x.chunks(dim) {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (mean_square + eps).sqrt();
        expected.extend(row.iter().zip(&w).map(|(v, w)| v * inv * w));
    }
    assert_close(&values(&got), &expected, 1e-5);
}

/// RoPE on `x` shaped (heads, len, dim): position `offset + l` rotates each
/// pair by `pos * base^(-2i/dim)`. Pairs are (2i, 2i+1) in the traditional
/// layout and (i, i + dim/2) in the Llama / Hugging Face layout.
fn ref_rope(
    x: &[f32],
    len: usize,
    dim: usize,
    base: f32,
    offset: usize,
    traditional: bool,
) -> Vec<f32> {
    let half = dim / 2;
    let mut out = x.to_vec();
    for (row_index, row) in x.chunks(dim).enumerate() {
        let pos = (offset + row_index % len) as f64;
        for i in 0..half {
            let theta = pos * f64::from(base).powf(-2.0 * i as f64 / dim as f64);
            let (sin, cos) = (theta.sin() as f32, theta.cos() as f32);
            let (a, b) = if traditional {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            out[row_index * dim + a] = row[a] * cos - row[b] * sin;
            out[row_index * dim + b] = row[a] * sin + row[b] * cos;
        }
    }
    out
}

#[test]
fn rope_matches_the_reference_in_both_layouts() {
    let (heads, len, dim, base) = (3, 5, 64, 100_000.0);
    let mut rng = Rng::new(3);
    let x = rng.vec(heads * len * dim);
    for traditional in [false, true] {
        for offset in [0, 17] {
            let got = fast::rope(
                array(&x, &[1, heads, len, dim]),
                dim as i32,
                traditional,
                base,
                1.0,
                offset as i32,
                None,
            )
            .unwrap();
            assert_close(
                &values(&got),
                &ref_rope(&x, len, dim, base, offset, traditional),
                1e-4,
            );
        }
    }
}

/// The mask of one attention call, as the reference sees it.
enum RefMask<'a> {
    None,
    /// Query `i` sees keys `0..=i + (k_len - q_len)`.
    Causal,
    /// Added to the scores, shape (q_len, k_len).
    Additive(&'a [f32]),
    /// `true` keeps a score, shape (q_len, k_len).
    Keep(&'a [bool]),
}

/// Attention on (heads, len, dim) queries and (kv_heads, len, dim) keys and
/// values: query head `h` reads key/value head `h / (heads / kv_heads)`.
#[allow(clippy::too_many_arguments)]
fn ref_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    kv_heads: usize,
    q_len: usize,
    k_len: usize,
    dim: usize,
    mask: &RefMask<'_>,
) -> Vec<f32> {
    let scale = 1.0 / (dim as f32).sqrt();
    let group = heads / kv_heads;
    let mut out = vec![0.0; heads * q_len * dim];
    for h in 0..heads {
        let kv = h / group;
        for i in 0..q_len {
            let query = &q[(h * q_len + i) * dim..][..dim];
            let scores: Vec<f32> = (0..k_len)
                .map(|j| {
                    let key = &k[(kv * k_len + j) * dim..][..dim];
                    let s = scale * query.iter().zip(key).map(|(a, b)| a * b).sum::<f32>();
                    match mask {
                        RefMask::None => s,
                        RefMask::Causal if j > i + (k_len - q_len) => f32::NEG_INFINITY,
                        RefMask::Causal => s,
                        RefMask::Additive(m) => s + m[i * k_len + j],
                        RefMask::Keep(m) if m[i * k_len + j] => s,
                        RefMask::Keep(_) => f32::NEG_INFINITY,
                    }
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f32 = weights.iter().sum();
            for d in 0..dim {
                out[(h * q_len + i) * dim + d] = (0..k_len)
                    .map(|j| weights[j] / total * v[(kv * k_len + j) * dim + d])
                    .sum();
            }
        }
    }
    out
}

#[test]
fn attention_with_grouped_query_heads_matches_the_reference() {
    // The default model's layout: 9 query heads share 3 key/value heads.
    let (heads, kv_heads, dim) = (9, 3, 64);
    let mut rng = Rng::new(4);
    for (q_len, k_len) in [(1, 7), (4, 4), (3, 6)] {
        let q = rng.vec(heads * q_len * dim);
        let k = rng.vec(kv_heads * k_len * dim);
        let v = rng.vec(kv_heads * k_len * dim);
        let additive: Vec<f32> = rng.vec(q_len * k_len).iter().map(|x| 2.0 * x).collect();
        // Keep the first key always, so no row is fully masked.
        let keep: Vec<bool> = (0..q_len * k_len)
            .map(|idx| idx % k_len == 0 || rng.next_f32() > 0.0)
            .collect();
        let qa = array(&q, &[1, heads, q_len, dim]);
        let ka = array(&k, &[1, kv_heads, k_len, dim]);
        let va = array(&v, &[1, kv_heads, k_len, dim]);
        let additive_a = array(&additive, &[q_len, k_len]);
        let keep_a = Array::from_slice(&keep, &[q_len as i32, k_len as i32]);
        let scale = 1.0 / (dim as f32).sqrt();

        let cases: [(Option<ScaledDotProductAttentionMask<'_>>, RefMask<'_>); 4] = [
            (None, RefMask::None),
            (Some(ScaledDotProductAttentionMask::Causal), RefMask::Causal),
            (Some((&additive_a).into()), RefMask::Additive(&additive)),
            (Some((&keep_a).into()), RefMask::Keep(&keep)),
        ];
        for (mlx_mask, ref_mask) in cases {
            let got =
                fast::scaled_dot_product_attention(&qa, &ka, &va, scale, mlx_mask, None).unwrap();
            assert_eq!(got.shape(), &[1, heads as i32, q_len as i32, dim as i32]);
            let expected = ref_attention(&q, &k, &v, heads, kv_heads, q_len, k_len, dim, &ref_mask);
            assert_close(&values(&got), &expected, 1e-4);
        }
    }
}

/// Unpacks MLX's affine 4-bit layout: eight values per `u32`, lowest bits
/// first; each group of `group` values along a row shares a scale and bias.
fn ref_dequantize_4bit(
    packed: &[u32],
    scales: &[f32],
    biases: &[f32],
    rows: usize,
    cols: usize,
    group: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let word = packed[r * cols / 8 + c / 8];
            let q = (word >> (4 * (c % 8))) & 0xF;
            let g = r * cols / group + c / group;
            out.push(scales[g] * q as f32 + biases[g]);
        }
    }
    out
}

#[test]
fn quantized_matmul_matches_a_reference_on_the_unpacked_weights() {
    let (batch, k, n) = (3, 256, 24);
    let mut rng = Rng::new(5);
    let x = rng.vec(batch * k);
    let w = rng.vec(n * k);
    for group in [32, 64] {
        let (wq, scales, biases) = ops::quantize(array(&w, &[n, k]), group as i32, 4).unwrap();
        assert_eq!(wq.shape(), &[n as i32, (k / 8) as i32]);
        assert_eq!(scales.shape(), &[n as i32, (k / group) as i32]);
        wq.eval().unwrap();
        let packed = wq.as_slice::<u32>().to_vec();
        let (s, b) = (values(&scales), values(&biases));
        let dequantized = ref_dequantize_4bit(&packed, &s, &b, n, k, group);

        // Affine 4-bit quantization keeps every value within one step (its
        // group's scale) of the original; MLX shifts the grid so that zero
        // is exact, hence not always within half a step. A wrong unpacking
        // would be off by a large part of the range.
        for (idx, (orig, deq)) in w.iter().zip(&dequantized).enumerate() {
            // MLX may pick a negative scale (it anchors the grid at the
            // extreme with the larger magnitude).
            let step = s[idx / group].abs();
            assert!(
                (orig - deq).abs() <= step + 1e-6,
                "group {group}, element {idx}: {orig} came back as {deq} (step {step})"
            );
        }

        let got = ops::quantized_matmul(
            array(&x, &[batch, k]),
            &wq,
            &scales,
            &biases,
            true,
            group as i32,
            4,
        )
        .unwrap();
        // x (batch x k) times the transpose of the (n x k) weight.
        let mut w_t = vec![0.0; k * n];
        for r in 0..n {
            for c in 0..k {
                w_t[c * n + r] = dequantized[r * k + c];
            }
        }
        assert_close(&values(&got), &ref_matmul(&x, &w_t, batch, k, n), 1e-4);
    }
}

/// A unique scratch file name for this test process.
fn scratch_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("backend-mlx-{}-{name}", std::process::id()))
}

#[test]
fn safetensors_round_trip_keeps_every_byte() {
    let mut rng = Rng::new(6);
    let weight = rng.vec(4 * 6);
    let ids: Vec<i32> = vec![3, -1, 49_151, 0, 7];
    let path = scratch_file("round-trip.safetensors");
    let metadata = HashMap::from([("format".to_owned(), "mlx".to_owned())]);
    Array::save_safetensors(
        [
            ("layer.weight", array(&weight, &[4, 6])),
            ("ids", Array::from_slice(&ids, &[5])),
        ],
        &metadata,
        &path,
    )
    .unwrap();

    // Read the file by hand: an 8-byte little-endian header length, a JSON
    // header with dtype, shape and data offsets, then the raw data.
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    assert_eq!(header["__metadata__"]["format"], "mlx");
    let tensor = &header["layer.weight"];
    assert_eq!(tensor["dtype"], "F32");
    assert_eq!(tensor["shape"], serde_json::json!([4, 6]));
    let start = tensor["data_offsets"][0].as_u64().unwrap() as usize;
    let stored: Vec<f32> = data[start..start + 4 * weight.len()]
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(stored, weight);
    assert_eq!(header["ids"]["dtype"], "I32");

    let loaded = Array::load_safetensors(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(loaded.len(), 2);
    assert_eq!(loaded["layer.weight"].shape(), &[4, 6]);
    assert_eq!(values(&loaded["layer.weight"]), weight);
    let loaded_ids = loaded["ids"].contiguous().unwrap();
    loaded_ids.eval().unwrap();
    assert_eq!(loaded_ids.as_slice::<i32>(), &ids[..]);
}
