//! Speed of the hot client-side paths: SSE parsing of a long stream and
//! percentile summaries of a large run.

use criterion::{criterion_group, criterion_main, Criterion};
use loadgen::{Percentiles, SseParser};
use std::hint::black_box;

fn sse_stream(c: &mut Criterion) {
    let chunk = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" word\"},\"finish_reason\":null}]}\n\n";
    let body: String = chunk.repeat(1024);
    c.bench_function("sse_parse_1024_events_in_64_byte_pieces", |b| {
        b.iter(|| {
            let mut p = SseParser::default();
            let mut n = 0;
            for piece in body.as_bytes().chunks(64) {
                n += p.push(black_box(piece)).len();
            }
            n
        })
    });
}

fn percentiles(c: &mut Criterion) {
    // 32 requests x 1024 tokens: the gaps of a large level.
    let samples: Vec<f64> = (0..32 * 1024)
        .map(|i| ((i * 7919) % 1000) as f64 / 10.0)
        .collect();
    c.bench_function("percentiles_32k_samples", |b| {
        b.iter(|| Percentiles::from_samples(black_box(&samples).iter().copied()))
    });
}

criterion_group!(benches, sse_stream, percentiles);
criterion_main!(benches);
