//! Throughput of repacking ggml blocks into MLX's affine format, the bulk
//! of an import's CPU time. The matrix is the size of one SmolLM2-135M MLP
//! projection (1536 x 576).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gguf_import::gguf::GgmlType;
use gguf_import::quant::convert;

const ROWS: usize = 1536;
const COLS: usize = 576;

/// Deterministic blocks whose scales are small enough to stay exact.
fn blocks(block_bytes: usize) -> Vec<u8> {
    let n = ROWS * COLS / 32;
    let mut out = Vec::with_capacity(n * block_bytes);
    let mut x = 0x2545_f491_u32;
    for _ in 0..n {
        // An f16 scale of 0.0625 (and a minimum of -0.5 for Q4_1).
        out.extend_from_slice(&[0x00, 0x2c]);
        if block_bytes == 20 {
            out.extend_from_slice(&[0x00, 0xb8]);
        }
        while !out.len().is_multiple_of(block_bytes) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            out.push(x as u8);
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("convert");
    group.throughput(Throughput::Elements((ROWS * COLS) as u64));
    for (ty, block_bytes) in [
        (GgmlType::Q4_1, 20),
        (GgmlType::Q4_0, 18),
        (GgmlType::Q8_0, 34),
    ] {
        let data = blocks(block_bytes);
        group.bench_function(format!("{ty:?}_to_affine"), |b| {
            b.iter(|| convert(ty, &data, &[ROWS, COLS], true).unwrap())
        });
        group.bench_function(format!("{ty:?}_dequantize"), |b| {
            b.iter(|| convert(ty, &data, &[ROWS, COLS], false).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
