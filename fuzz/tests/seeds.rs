//! Replays the committed seeds and every crash the fuzzer ever found (one
//! file per input under `seeds/openai_request` and
//! `regressions/openai_request`) through the harness, so CI keeps them
//! passing on stable Rust without `cargo fuzz`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeSet, fs, path::Path};

fn inputs(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.display().to_string(), fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

#[test]
fn every_seed_and_regression_gets_a_well_formed_answer() {
    let mut statuses = BTreeSet::new();
    let mut all = inputs("seeds/openai_request");
    assert!(all.len() >= 8, "the seeds are missing");
    all.extend(inputs("regressions/openai_request"));
    for (name, data) in all {
        // `run_one` panics, naming the broken contract, on a bad answer.
        let status = mlx_batch_fuzz::run_one(&data).unwrap_or_else(|| panic!("{name}: empty"));
        statuses.insert(status.as_u16());
    }
    // The seeds reach every kind of answer, so the fuzzer starts from all.
    assert_eq!(
        statuses,
        BTreeSet::from([200, 400, 404, 413]),
        "statuses the seeds reached"
    );
}
