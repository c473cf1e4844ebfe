//! Generation throughput of `MlxBackend` on the default model: prefill
//! tokens/s, and decode tokens/s (summed over the batch) at batch 1, 8 and
//! 32, for the weights dequantized to f32 (the CPU default) and kept as
//! stored (4-bit).
//!
//! Each configuration prints one `RESULT` line from a short fixed loop
//! (what `benches/compare.sh` puts beside mlx-lm), then criterion measures
//! the same step. Knobs, all optional:
//! `MLX_BATCH_BENCH_MODEL` (model folder), `MLX_BATCH_BENCH_DTYPES`
//! (`f32,native`), `MLX_BATCH_BENCH_BATCHES` (`1,8,32`),
//! `MLX_BATCH_BENCH_REPORT_ONLY=1` (skip criterion).
//!
//! `cargo bench -p backend-mlx --bench generate -- --profile` instead
//! prints where a step's time goes (see `backend_mlx::profile`), for decode
//! at batch 1, 8 and 32 and for a 512-token prefill chunk, beside the plain
//! step time and its ratio to the step's own weight matmuls.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use backend_mlx::{Device, LoadOptions, MlxBackend, ModelDType, Stage, StepProfile};
use batching_types::{Backend, KvBlocks, RequestId, SamplingParams, StepItem, StepPlan, WorkKind};
use criterion::{BenchmarkId, Criterion, Throughput};

/// Context tokens of each decoding sequence when decoding starts.
const DECODE_PROMPT: usize = 64;
/// Tokens of the prefill benchmark's prompt.
const PREFILL_PROMPT: usize = 256;

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("MLX_BATCH_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.models/SmolLM2-135M-Instruct")
        });
    if dir.join("config.json").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: no model at {}; run `cargo xtask setup`",
            dir.display()
        );
        None
    }
}

/// Tokens per KV block, as the scheduler's default.
const BLOCK_SIZE: usize = 16;
/// Blocks each decoding sequence may use: its prompt and 512 steps.
const BLOCKS_PER_SEQUENCE: usize = (DECODE_PROMPT + 513).div_ceil(BLOCK_SIZE);

/// Loads the model on the CPU with its KV pool configured.
fn load(dir: &PathBuf, dtype: ModelDType, batch: usize) -> MlxBackend {
    let mut backend = MlxBackend::load(&LoadOptions {
        device: Device::Cpu,
        dtype: Some(dtype),
        max_batch_size: batch.max(1),
        ..LoadOptions::new(dir)
    })
    .unwrap();
    let num_blocks = backend.capacity().kv_tokens / BLOCK_SIZE;
    backend
        .configure_kv(KvBlocks {
            block_size: BLOCK_SIZE,
            num_blocks,
        })
        .unwrap();
    backend
}

/// The block table of batch slot `slot` of `batch`: block `i` of every
/// sequence sits beside block `i` of the others, as the scheduler's
/// lowest-first allocation lays out sequences that grow together, so the
/// pool holds only the blocks in use.
fn table(slot: usize, batch: usize) -> Vec<u32> {
    (0..BLOCKS_PER_SEQUENCE)
        .map(|i| (i * batch + slot) as u32)
        .collect()
}

/// Distinct, deterministic prompt tokens.
fn prompt(seq: u64, len: usize) -> Vec<u32> {
    (0..len as u64)
        .map(|i| ((seq * 7919 + i * 104_729) % 40_000 + 100) as u32)
        .collect()
}

struct Decoder {
    backend: MlxBackend,
    ids: Vec<RequestId>,
    next: u64,
    plan: StepPlan,
    /// Decode steps since the last restart, across `decode` calls.
    steps_since_restart: u64,
}

impl Decoder {
    fn new(dir: &PathBuf, dtype: ModelDType, batch: usize) -> Self {
        let backend = load(dir, dtype, batch);
        let mut d = Self {
            backend,
            ids: Vec::new(),
            next: 0,
            plan: StepPlan::default(),
            steps_since_restart: 0,
        };
        d.restart(batch);
        d
    }

    /// Replaces every sequence with fresh ones, prefilled (untimed).
    fn restart(&mut self, batch: usize) {
        self.steps_since_restart = 0;
        for id in self.ids.drain(..) {
            self.backend.release(id);
        }
        let mut prefill = StepPlan::default();
        for _ in 0..batch {
            let id = RequestId::from(self.next);
            self.next += 1;
            self.backend
                .add_sequence(
                    id,
                    &prompt(id.seq(), DECODE_PROMPT),
                    &SamplingParams::default(),
                )
                .unwrap();
            prefill.items.push(StepItem {
                id,
                kind: WorkKind::Prefill { len: DECODE_PROMPT },
            });
            prefill.block_tables.push(table(self.ids.len(), batch));
            self.ids.push(id);
        }
        self.backend.step(&prefill).unwrap();
        self.plan = StepPlan {
            items: self
                .ids
                .iter()
                .map(|&id| StepItem {
                    id,
                    kind: WorkKind::Decode,
                })
                .collect(),
            block_tables: (0..batch).map(|slot| table(slot, batch)).collect(),
        };
    }

    /// Runs `steps` decode steps and returns their total time.
    fn decode(&mut self, steps: u64) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..steps {
            // Keep contexts short and comparable across runs: criterion
            // calls this many times on the same sequences.
            if self.steps_since_restart >= 512 {
                let n = self.ids.len();
                self.restart(n);
            }
            let start = Instant::now();
            self.backend.step(&self.plan).unwrap();
            total += start.elapsed();
            self.steps_since_restart += 1;
        }
        total
    }
}

fn prefill_once(backend: &mut MlxBackend, id: u64) -> Duration {
    prefill_len(backend, id, PREFILL_PROMPT)
}

/// Prefills a fresh `len`-token prompt in one chunk and returns the step's
/// time.
fn prefill_len(backend: &mut MlxBackend, id: u64, len: usize) -> Duration {
    let id = RequestId::from(id);
    let tokens = prompt(id.seq(), len);
    backend
        .add_sequence(id, &tokens, &SamplingParams::default())
        .unwrap();
    let plan = StepPlan {
        items: vec![StepItem {
            id,
            kind: WorkKind::Prefill { len },
        }],
        block_tables: vec![(0..len.div_ceil(BLOCK_SIZE) as u32).collect()],
    };
    let start = Instant::now();
    backend.step(&plan).unwrap();
    let elapsed = start.elapsed();
    backend.release(id);
    elapsed
}

fn peak_mib() -> f64 {
    mlx_rs::memory::peak_memory().unwrap_or(0) as f64 / (1 << 20) as f64
}

/// Tokens of the prefill chunk the profile looks at.
const PROFILE_CHUNK: usize = 512;

/// Prints one profile: each stage's time per step and share, then the
/// plain (unprofiled) step time against the weight matmuls.
fn print_profile(label: &str, plain: Duration, profile: &StepProfile) {
    let steps = f64::from(profile.steps.max(1));
    let per_step = |d: Duration| d.as_secs_f64() * 1e3 / steps;
    let total = per_step(profile.total());
    println!("PROFILE {label}: {steps} profiled steps");
    println!("| stage | ms/step | share |");
    println!("|---|---:|---:|");
    for stage in Stage::ALL {
        let ms = per_step(profile.time(stage));
        println!(
            "| {} | {ms:.2} | {:.1}% |",
            stage.name(),
            100.0 * ms / total.max(1e-9)
        );
    }
    let matmul = per_step(profile.matmul());
    let plain = plain.as_secs_f64() * 1e3;
    println!(
        "| profiled total | {total:.2} | |\n\nPROFILE {label}: plain step {plain:.2} ms, its weight matmuls {matmul:.2} ms, step/matmuls {:.2}x\n",
        plain / matmul.max(1e-9)
    );
}

/// A plain step with every product through OpenBLAS against one through
/// this project's routes (`backend_mlx::blas`), alternating three times in
/// one process so that both see the same machine (shared hosts drift by
/// tens of percent within minutes).
#[cfg(target_os = "linux")]
fn compare_routes(batch: usize, mut step: impl FnMut() -> Duration) {
    use backend_mlx::blas::{routes, set_routes, Routes};

    let ours = routes();
    let openblas = Routes {
        few_rows: false,
        sgemv: false,
    };
    let (mut theirs_total, mut ours_total) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..3 {
        set_routes(openblas);
        theirs_total += step();
        set_routes(ours);
        ours_total += step();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3 / 3.0;
    println!(
        "ROUTES decode batch={batch}: plain step {:.2} ms with OpenBLAS only, {:.2} ms routed ({:.2}x)\n",
        ms(theirs_total),
        ms(ours_total),
        ms(theirs_total) / ms(ours_total).max(1e-9)
    );
}

#[cfg(not(target_os = "linux"))]
fn compare_routes(_: usize, _: impl FnMut() -> Duration) {}

/// `--profile`: where the time of a decode step (batch 1, 8, 32) and of a
/// prefill chunk goes, on f32 weights (the CPU default).
fn profile(dir: &PathBuf) {
    for batch in env_list("MLX_BATCH_BENCH_BATCHES", "1,8,32") {
        let batch: usize = batch.parse().unwrap();
        let mut decoder = Decoder::new(dir, ModelDType::F32, batch);
        decoder.decode(3);
        let steps = if batch >= 32 { 12 } else { 20 };
        let plain = decoder.decode(steps) / steps as u32;
        decoder.backend.set_profiling(true);
        decoder.decode(steps);
        decoder.backend.set_profiling(false);
        let profile = decoder.backend.take_profile();
        print_profile(&format!("decode batch={batch}"), plain, &profile);
        compare_routes(batch, || decoder.decode(steps) / steps as u32);
    }
    let mut backend = load(dir, ModelDType::F32, 1);
    let mut next = 3_000_000;
    let mut run = |backend: &mut MlxBackend| {
        next += 1;
        prefill_len(backend, next, PROFILE_CHUNK)
    };
    run(&mut backend);
    let runs = 3;
    let plain = (0..runs).map(|_| run(&mut backend)).sum::<Duration>() / runs;
    backend.set_profiling(true);
    for _ in 0..runs {
        run(&mut backend);
    }
    backend.set_profiling(false);
    let profile = backend.take_profile();
    print_profile(&format!("prefill chunk={PROFILE_CHUNK}"), plain, &profile);
}

fn main() {
    let Some(dir) = model_dir() else { return };
    if std::env::args().any(|a| a == "--profile") {
        profile(&dir);
        return;
    }
    let report_only = std::env::var_os("MLX_BATCH_BENCH_REPORT_ONLY").is_some();
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    for dtype_name in env_list("MLX_BATCH_BENCH_DTYPES", "f32,native") {
        let dtype: ModelDType = dtype_name.parse().unwrap();

        // Prefill.
        let mut backend = load(&dir, dtype, 1);
        prefill_once(&mut backend, 1_000_000);
        let _ = mlx_rs::memory::reset_peak_memory();
        let runs = 3;
        let total: Duration = (0..runs)
            .map(|i| prefill_once(&mut backend, 1_000_001 + i))
            .sum();
        println!(
            "RESULT ours prefill dtype={dtype_name} batch=1 tok_s={:.1} peak_mib={:.0}",
            (PREFILL_PROMPT as u64 * runs) as f64 / total.as_secs_f64(),
            peak_mib()
        );
        if !report_only {
            let mut group = criterion.benchmark_group(format!("prefill/{dtype_name}"));
            group.throughput(Throughput::Elements(PREFILL_PROMPT as u64));
            let mut next = 2_000_000;
            group.bench_function(BenchmarkId::from_parameter(PREFILL_PROMPT), |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            next += 1;
                            prefill_once(&mut backend, next)
                        })
                        .sum()
                })
            });
            group.finish();
        }
        drop(backend);

        // Decode.
        for batch in env_list("MLX_BATCH_BENCH_BATCHES", "1,8,32") {
            let batch: usize = batch.parse().unwrap();
            let mut decoder = Decoder::new(&dir, dtype, batch);
            decoder.decode(2);
            let _ = mlx_rs::memory::reset_peak_memory();
            // About three seconds of steps, at least four.
            let probe = decoder.decode(2).as_secs_f64() / 2.0;
            let steps = ((3.0 / probe) as u64).clamp(4, 64);
            let elapsed = decoder.decode(steps);
            println!(
                "RESULT ours decode dtype={dtype_name} batch={batch} tok_s={:.1} peak_mib={:.0}",
                (steps * batch as u64) as f64 / elapsed.as_secs_f64(),
                peak_mib()
            );
            if !report_only {
                let mut group = criterion.benchmark_group(format!("decode/{dtype_name}"));
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_function(BenchmarkId::from_parameter(batch), |b| {
                    b.iter_custom(|iters| decoder.decode(iters))
                });
                group.finish();
            }
        }
    }
    criterion.final_summary();
}
