//! Matmul throughput on the MLX device, in GFLOP/s.
//!
//! Every product of a default-model decode step at batch 1, 8 and 32
//! through OpenBLAS and through this project's routes, the MLP weight's
//! product in f32 and 4-bit quantized form, a square
//! 2048x2048 f32 product that shows the raw BLAS speed, and the two
//! batched products of a 512-token prefill chunk's attention. On Linux,
//! build with `MLX_BATCH_NO_OPENBLAS=1` to measure the wheel's bundled BLAS.
//! This bench leaves MLX's buffer cache at its default, so outputs larger
//! than it (the 2k-context scores) pay for fresh pages on every call.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mlx_rs::{ops, transforms::eval, Array};

/// A deterministic pseudo-random f32 matrix in [-1, 1).
fn matrix(rows: i32, cols: i32, seed: u64) -> Array {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Array::from_slice(&data, &[rows, cols])
}

/// Prints GFLOP/s for `f` measured over a short fixed loop, alongside
/// criterion's own report, so the number is visible in one line.
fn print_gflops(label: &str, flops: u64, mut f: impl FnMut()) {
    f();
    let runs = 20;
    let start = Instant::now();
    for _ in 0..runs {
        f();
    }
    let secs = start.elapsed().as_secs_f64() / f64::from(runs);
    println!(
        "{label}: {:.1} GFLOP/s ({:.3} ms)",
        flops as f64 / secs / 1e9,
        secs * 1e3
    );
}

/// The f32 products of one decode step of the default model (hidden 576,
/// MLP 1536, vocabulary 49152, q/k/v and gate/up each fused into one
/// weight), `x W^T` with `W` stored `[out, in]`.
const STEP_PRODUCTS: [(&str, i32, i32); 5] = [
    ("qkv_960x576", 960, 576),
    ("o_576x576", 576, 576),
    ("gate_up_3072x576", 3072, 576),
    ("down_576x1536", 576, 1536),
    ("lm_head_49152x576", 49152, 576),
];

/// Each product of a decode step at batch 1, 8 and 32, through OpenBLAS
/// alone and through this project's routes (the few-rows kernel and
/// sgemv; see `backend_mlx::blas`), in one process so that both see the
/// same machine.
#[cfg(target_os = "linux")]
fn decode_products(c: &mut Criterion) {
    use backend_mlx::blas::{routed_and_passed, routes, set_routes, Routes};

    let ours = routes();
    let openblas = Routes {
        few_rows: false,
        sgemv: false,
    };
    let mut group = c.benchmark_group("decode_products");
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.measurement_time(std::time::Duration::from_secs(2));
    for (seed, (name, n, k)) in (1..).zip(STEP_PRODUCTS) {
        let weight = matrix(n, k, seed);
        let weight_t = weight.t();
        for batch in [1, 8, 32] {
            let x = matrix(batch, k, 2);
            let flops = 2 * batch as u64 * k as u64 * n as u64;
            group.throughput(Throughput::Elements(flops));
            let step = || {
                let y = ops::matmul(&x, &weight_t).unwrap();
                eval([&y]).unwrap();
            };
            for (label, route) in [("openblas", openblas), ("routed", ours)] {
                set_routes(route);
                let (before, _) = routed_and_passed();
                print_gflops(&format!("{name} batch {batch} {label}"), flops, step);
                let (after, _) = routed_and_passed();
                if route.few_rows || (route.sgemv && batch == 1) {
                    assert!(after > before, "libmlx did not call our cblas_sgemm");
                }
                group.bench_function(BenchmarkId::new(format!("{name}/{label}"), batch), |b| {
                    b.iter(step)
                });
            }
            set_routes(ours);
        }
    }
    group.finish();
}

#[cfg(not(target_os = "linux"))]
fn decode_products(_: &mut Criterion) {}

/// The MLP's product in f32 and 4-bit quantized (MLX's own kernels).
fn quantized(c: &mut Criterion) {
    let (k, n) = (576, 1536);
    let weight = matrix(n, k, 1);
    let weight_t = weight.t();
    // Quantized once per group size, outside the timed loops.
    let quantized: Vec<_> = [32, 64]
        .into_iter()
        .map(|group_size| (group_size, ops::quantize(&weight, group_size, 4).unwrap()))
        .collect();
    let mut group = c.benchmark_group("decode_576x1536");
    for batch in [1, 8, 32] {
        let x = matrix(batch, k, 2);
        let flops = 2 * batch as u64 * k as u64 * n as u64;
        group.throughput(Throughput::Elements(flops));

        let f32_step = || {
            let y = ops::matmul(&x, &weight_t).unwrap();
            eval([&y]).unwrap();
        };
        print_gflops(&format!("f32 batch {batch}"), flops, f32_step);
        group.bench_function(BenchmarkId::new("f32", batch), |b| b.iter(f32_step));

        for (group_size, (wq, scales, biases)) in &quantized {
            let group_size = *group_size;
            let q4_step = || {
                let y = ops::quantized_matmul(&x, wq, scales, biases, true, group_size, 4).unwrap();
                eval([&y]).unwrap();
            };
            print_gflops(&format!("q4 g{group_size} batch {batch}"), flops, q4_step);
            group.bench_function(BenchmarkId::new(format!("q4_g{group_size}"), batch), |b| {
                b.iter(q4_step)
            });
        }
    }
    group.finish();
}

fn square(c: &mut Criterion) {
    let size = 2048;
    let a = matrix(size, size, 3);
    let b = matrix(size, size, 4);
    let flops = 2 * (size as u64).pow(3);
    let mut group = c.benchmark_group("square");
    group.throughput(Throughput::Elements(flops));
    group.sample_size(10);
    let step = || {
        let y = ops::matmul(&a, &b).unwrap();
        eval([&y]).unwrap();
    };
    print_gflops("f32 2048x2048", flops, step);
    group.bench_function("f32_2048", |bench| bench.iter(step));
    group.finish();
}

/// The products of a 512-token prefill chunk's attention in the default
/// model (3 KV heads, each shared by 3 query heads, head size 64) over a
/// context of 512 and 2048 keys: scores `[3, 1536, 64] x [3, 64, span]`
/// and the weighted sum `[3, 1536, span] x [3, span, 64]`, batched over
/// the KV heads as the CPU attention path issues them.
fn prefill_attention(c: &mut Criterion) {
    let (kv, rows, hd) = (3, 1536, 64);
    let mut group = c.benchmark_group("prefill_attention");
    group.sample_size(10);
    for span in [512, 2048] {
        let q = matrix(kv * rows, hd, 5).reshape(&[kv, rows, hd]).unwrap();
        let k = matrix(kv * span, hd, 6).reshape(&[kv, span, hd]).unwrap();
        let p = matrix(kv * rows, span, 7)
            .reshape(&[kv, rows, span])
            .unwrap();
        let kt = k.transpose_axes(&[0, 2, 1]).unwrap();
        let flops = 2 * (kv * rows * span * hd) as u64;
        let scores = || {
            let y = ops::matmul(&q, &kt).unwrap();
            eval([&y]).unwrap();
        };
        print_gflops(&format!("scores span {span}"), flops, scores);
        group.bench_function(BenchmarkId::new("scores", span), |b| b.iter(scores));
        let weighted = || {
            let y = ops::matmul(&p, &k).unwrap();
            eval([&y]).unwrap();
        };
        print_gflops(&format!("weighted sum span {span}"), flops, weighted);
        group.bench_function(BenchmarkId::new("weighted_sum", span), |b| b.iter(weighted));
    }
    group.finish();
}

criterion_group!(
    benches,
    decode_products,
    quantized,
    square,
    prefill_attention
);
criterion_main!(benches);
