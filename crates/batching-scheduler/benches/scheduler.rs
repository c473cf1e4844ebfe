//! Scheduler benchmarks.
//!
//! 1. `step_overhead/256_running`: the engine's own cost per step with 256
//!    decoding sequences on a backend that does nothing. The target is far
//!    below 1% of a 10 ms model step, i.e. well under 100 µs.
//! 2. `pause_resume/256_running`: the same full batch, and per iteration one
//!    HIGH request of one token: a step that pauses a running request and
//!    admits HIGH, then a step that resumes the paused one. Against two
//!    `step_overhead` steps, the difference is what a pause and a resume
//!    cost the engine (the backend keeps the cache, so it does no extra
//!    work).
//! 3. A virtual-time simulation (printed as a table, not timed by
//!    criterion): throughput and p50/p99 latency by priority of continuous
//!    batching against static batching (wait for a full batch, run it to
//!    the end) on the same workload and the same cost model.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    collections::HashMap,
    hint::black_box,
    time::{Duration, Instant},
};

use batching_scheduler::{Scheduler, SchedulerConfig};
use batching_types::{
    Backend, BackendCapacity, BackendMemory, Clock, EventReceiver, KvBlocks, ManualClock,
    NewRequest, OutputEvent, Priority, RequestId, SamplingParams, SequenceOutcome, SequenceResult,
    StepOutput, StepPlan, SystemClock, WorkKind,
};
use criterion::Criterion;
use sim_backend::{SimBackend, SimConfig, TimeMode};

/// A backend that does no work: it only tracks how much context each
/// sequence has left to prefill, so the engine's bookkeeping is all that
/// is measured.
#[derive(Default)]
struct NullBackend {
    left: HashMap<RequestId, usize>,
}

impl Backend for NullBackend {
    type Error = std::convert::Infallible;

    fn capacity(&self) -> BackendCapacity {
        BackendCapacity {
            kv_tokens: 1 << 22,
            max_context: 1 << 16,
        }
    }

    fn configure_kv(&mut self, _: KvBlocks) -> Result<(), Self::Error> {
        Ok(())
    }

    fn memory(&self) -> BackendMemory {
        BackendMemory::default()
    }

    fn use_cached_prefix(&mut self, id: RequestId, tokens: usize) -> Result<(), Self::Error> {
        if let Some(left) = self.left.get_mut(&id) {
            *left = left.saturating_sub(tokens);
        }
        Ok(())
    }

    fn add_sequence(
        &mut self,
        id: RequestId,
        context: &[u32],
        _: &SamplingParams,
    ) -> Result<(), Self::Error> {
        self.left.insert(id, context.len());
        Ok(())
    }

    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, Self::Error> {
        let results = plan
            .items
            .iter()
            .map(|item| {
                let outcome = match item.kind {
                    WorkKind::Decode => SequenceOutcome::Token(7),
                    WorkKind::Prefill { len } => {
                        let left = self.left.entry(item.id).or_default();
                        *left = left.saturating_sub(len);
                        if *left == 0 {
                            SequenceOutcome::Token(7)
                        } else {
                            SequenceOutcome::Pending
                        }
                    }
                };
                SequenceResult {
                    id: item.id,
                    outcome,
                    logprobs: None,
                }
            })
            .collect();
        Ok(StepOutput { results })
    }

    fn release(&mut self, id: RequestId) {
        self.left.remove(&id);
    }
}

fn long_request() -> NewRequest {
    NewRequest {
        prompt_tokens: vec![1; 32],
        max_tokens: 8000,
        ..NewRequest::default()
    }
}

fn step_overhead(c: &mut Criterion) {
    let config = SchedulerConfig {
        max_batch_size: 256,
        max_batch_tokens: 8192,
        max_queue: None,
        ..SchedulerConfig::default()
    };
    let mut engine = Scheduler::new(config, NullBackend::default(), SystemClock).unwrap();
    let mut streams: Vec<EventReceiver> = (0..256)
        .map(|_| engine.submit(long_request()).unwrap().1)
        .collect();
    engine.step();
    assert_eq!(engine.status().running, 256);
    let mut steps = 0u64;
    c.bench_function("step_overhead/256_running", |b| {
        b.iter(|| {
            let trace = engine.step();
            steps += 1;
            // Keep the batch full: replace finished requests, and empty the
            // streams now and then so memory stays flat.
            for _ in &trace.finished {
                streams.push(engine.submit(long_request()).unwrap().1);
            }
            if steps.is_multiple_of(32) {
                streams.retain_mut(|rx| {
                    while rx.try_recv().is_ok() {}
                    !rx.is_closed()
                });
            }
            black_box(trace.items.len())
        });
    });
}

fn pause_resume(c: &mut Criterion) {
    let config = SchedulerConfig {
        max_batch_size: 256,
        max_batch_tokens: 8192,
        max_queue: None,
        // No aging and no limit, so every cycle pauses one request.
        aging_rate: 0.0,
        max_preemptions: u32::MAX,
        ..SchedulerConfig::default()
    };
    let low = || NewRequest {
        priority: Priority::Low,
        ..long_request()
    };
    let high = || NewRequest {
        prompt_tokens: vec![1],
        max_tokens: 1,
        priority: Priority::High,
        ..NewRequest::default()
    };
    c.bench_function("pause_resume/256_running", |b| {
        // A fresh full batch per sample, so that it stays full (and inside
        // its KV) for every cycle measured; building it is not timed.
        b.iter_custom(|cycles| {
            let mut timed = Duration::ZERO;
            let mut left = cycles;
            while left > 0 {
                // 256 requests of 8,000 tokens stay in the batch for 3,999
                // cycles of two steps.
                let run = left.min(3_000);
                left -= run;
                let mut engine =
                    Scheduler::new(config.clone(), NullBackend::default(), SystemClock).unwrap();
                let mut streams: Vec<EventReceiver> =
                    (0..256).map(|_| engine.submit(low()).unwrap().1).collect();
                engine.step();
                let start = Instant::now();
                for n in 0..run {
                    streams.push(engine.submit(high()).unwrap().1);
                    let paused = engine.step();
                    let resumed = engine.step();
                    assert_eq!(
                        (paused.paused.len(), resumed.resumed.len()),
                        (1, 1),
                        "cycle {n}"
                    );
                    if n % 16 == 15 {
                        streams.retain_mut(|rx| {
                            while rx.try_recv().is_ok() {}
                            !rx.is_closed()
                        });
                    }
                }
                timed += start.elapsed();
            }
            timed
        });
    });
}

/// CPU time this thread has run, in nanoseconds (Linux only). On a shared
/// machine wall-clock samples include time spent waiting for a core, so
/// the bench also reports CPU time per step.
fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Steps with 256 decoding sequences, timed by this thread's CPU clock.
fn step_cpu_time() {
    let config = SchedulerConfig {
        max_batch_size: 256,
        max_batch_tokens: 8192,
        max_queue: None,
        ..SchedulerConfig::default()
    };
    let mut engine = Scheduler::new(config, NullBackend::default(), SystemClock).unwrap();
    let mut streams: Vec<EventReceiver> = (0..256)
        .map(|_| engine.submit(long_request()).unwrap().1)
        .collect();
    engine.step();
    let steps = 5000u64;
    let (Some(cpu0), wall0) = (thread_cpu_ns(), Instant::now()) else {
        return;
    };
    for n in 0..steps {
        black_box(engine.step());
        if n % 32 == 0 {
            streams
                .iter_mut()
                .for_each(|rx| while rx.try_recv().is_ok() {});
        }
    }
    let wall = wall0.elapsed();
    if let Some(cpu1) = thread_cpu_ns() {
        println!(
            "step_overhead/256_running: {:.1} µs CPU per step ({:.1} µs wall) over {steps} steps",
            (cpu1 - cpu0) as f64 / steps as f64 / 1000.0,
            wall.as_secs_f64() * 1e6 / steps as f64
        );
    }
}

/// One request of the simulated workload.
#[derive(Clone)]
struct Job {
    arrival: Duration,
    prompt: usize,
    max_tokens: usize,
    priority: Priority,
}

/// A fixed pseudo-random workload: bursts of arrivals, mixed prompt and
/// output lengths, 20% HIGH, 50% NORMAL, 30% LOW.
fn workload(n: usize) -> Vec<Job> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |m: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % m
    };
    let mut t = Duration::ZERO;
    (0..n)
        .map(|_| {
            t += Duration::from_millis(next(60));
            let priority = match next(10) {
                0 | 1 => Priority::High,
                2..=6 => Priority::Normal,
                _ => Priority::Low,
            };
            Job {
                arrival: t,
                prompt: 16 + next(496) as usize,
                max_tokens: 16 + next(240) as usize,
                priority,
            }
        })
        .collect()
}

fn costs(clock: &ManualClock) -> SimConfig {
    SimConfig {
        step_cost: Duration::from_millis(10),
        prefill_token_cost: Duration::from_micros(50),
        decode_token_cost: Duration::from_micros(200),
        kv_tokens: 32 * 1024,
        time: TimeMode::Advance(clock.clone()),
        ..SimConfig::default()
    }
}

/// Per request: arrival, first token, finish; all in virtual time.
struct Outcome {
    priority: Priority,
    arrival: Duration,
    first: Duration,
    done: Duration,
    tokens: usize,
}

fn continuous(jobs: &[Job], batch: usize) -> Vec<Outcome> {
    let clock = ManualClock::new();
    let t0 = clock.now();
    let backend = SimBackend::new(costs(&clock)).unwrap();
    let config = SchedulerConfig {
        max_batch_size: batch,
        max_queue: None,
        ..SchedulerConfig::default()
    };
    let mut engine = Scheduler::new(config, backend, clock.clone()).unwrap();
    let mut live: Vec<(usize, EventReceiver, Option<Duration>, usize)> = vec![];
    let mut out: Vec<Option<Outcome>> = jobs.iter().map(|_| None).collect();
    let mut next = 0;
    while next < jobs.len() || engine.has_work() {
        let now = clock.now() - t0;
        if !engine.has_work() && next < jobs.len() && jobs[next].arrival > now {
            clock.advance(jobs[next].arrival - now);
        }
        while next < jobs.len() && jobs[next].arrival <= clock.now() - t0 {
            let j = &jobs[next];
            let spec = NewRequest {
                prompt_tokens: vec![5; j.prompt],
                max_tokens: j.max_tokens,
                priority: j.priority,
                ..NewRequest::default()
            };
            live.push((next, engine.submit(spec).unwrap().1, None, 0));
            next += 1;
        }
        engine.step();
        let now = clock.now() - t0;
        live.retain_mut(|(i, rx, first, tokens)| {
            while let Ok(event) = rx.try_recv() {
                match event {
                    OutputEvent::Token { .. } => {
                        first.get_or_insert(now);
                        *tokens += 1;
                    }
                    OutputEvent::Finished { .. } => {
                        let j = &jobs[*i];
                        out[*i] = Some(Outcome {
                            priority: j.priority,
                            arrival: j.arrival,
                            first: first.unwrap_or(now),
                            done: now,
                            tokens: *tokens,
                        });
                        return false;
                    }
                }
            }
            true
        });
    }
    out.into_iter().map(|o| o.unwrap()).collect()
}

/// Static batching: wait until `batch` requests have arrived (or no more
/// will), prefill them together, decode until the longest is done.
fn static_batching(jobs: &[Job], batch: usize, cost: &SimConfig) -> Vec<Outcome> {
    let mut now = Duration::ZERO;
    let mut out = vec![];
    for group in jobs.chunks(batch) {
        now = now.max(group.last().map_or(now, |j| j.arrival));
        let prompt: usize = group.iter().map(|j| j.prompt).sum();
        now += cost.step_cost_for(prompt, 0);
        let first = now;
        let longest = group.iter().map(|j| j.max_tokens).max().unwrap_or(0);
        let mut done = vec![first; group.len()];
        for step in 1..longest {
            // Padded slots of finished requests still run to the end.
            now += cost.step_cost_for(0, group.len());
            for (k, j) in group.iter().enumerate() {
                if step + 1 == j.max_tokens {
                    done[k] = now;
                }
            }
        }
        for (k, j) in group.iter().enumerate() {
            out.push(Outcome {
                priority: j.priority,
                arrival: j.arrival,
                first,
                done: done[k],
                tokens: j.max_tokens,
            });
        }
    }
    out
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(idx).copied().unwrap_or(f64::NAN)
}

struct Summary {
    throughput: f64,
    rows: Vec<(String, f64, f64, f64, f64)>,
}

fn summarize(outcomes: &[Outcome]) -> Summary {
    let start = outcomes.iter().map(|o| o.arrival).min().unwrap_or_default();
    let end = outcomes.iter().map(|o| o.done).max().unwrap_or_default();
    let tokens: usize = outcomes.iter().map(|o| o.tokens).sum();
    let mut rows = vec![];
    for p in Priority::ALL {
        let of: Vec<&Outcome> = outcomes.iter().filter(|o| o.priority == p).collect();
        let lat: Vec<f64> = of
            .iter()
            .map(|o| (o.done - o.arrival).as_secs_f64())
            .collect();
        let ttft: Vec<f64> = of
            .iter()
            .map(|o| (o.first - o.arrival).as_secs_f64())
            .collect();
        rows.push((
            p.to_string(),
            percentile(ttft.clone(), 0.5),
            percentile(ttft, 0.99),
            percentile(lat.clone(), 0.5),
            percentile(lat, 0.99),
        ));
    }
    Summary {
        throughput: tokens as f64 / (end - start).as_secs_f64(),
        rows,
    }
}

fn simulation_table() {
    let jobs = workload(600);
    let batch = 32;
    let started = Instant::now();
    let cont = summarize(&continuous(&jobs, batch));
    let stat = summarize(&static_batching(&jobs, batch, &costs(&ManualClock::new())));
    println!(
        "\nvirtual-time simulation: {} requests, batch {batch}, step 10 ms + 0.05 ms/prompt token + 0.2 ms/decode token (simulated in {:.2?})",
        jobs.len(),
        started.elapsed()
    );
    println!(
        "throughput: continuous {:.0} tok/s, static {:.0} tok/s, ratio {:.2}x",
        cont.throughput,
        stat.throughput,
        cont.throughput / stat.throughput
    );
    println!("priority | TTFT p50 / p99 (s) cont. | static | latency p50 / p99 (s) cont. | static | p50 ratio");
    for (c, s) in cont.rows.iter().zip(&stat.rows) {
        println!(
            "{:<8} | {:>6.2} / {:>6.2} | {:>6.2} / {:>6.2} | {:>6.2} / {:>6.2} | {:>6.2} / {:>6.2} | {:.2}x",
            c.0, c.1, c.2, s.1, s.2, c.3, c.4, s.3, s.4, s.3 / c.3
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(30)
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    step_overhead(&mut c);
    pause_resume(&mut c);
    c.final_summary();
    step_cpu_time();
    simulation_table();
}
