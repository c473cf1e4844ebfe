//! `cargo xtask ci`: setup (with the Python references, HAProxy and
//! Prometheus), then every check, in order, failing fast, ending with the
//! replica test (`cargo xtask deploy-test`).
//!
//! A missing reference makes the tests that need it skip with a message on
//! a developer's machine; `.ci/run` sets `MLX_BATCH_REQUIRE_REFERENCES=1` so
//! that in CI the same skip is a failure.

use anyhow::bail;

use crate::util::{cargo, output, run as run_step};

/// Crates that must stay free of MLX and HTTP so that the batching core is
/// testable anywhere and never blocks on I/O.
const CORE_CRATES: [&str; 3] = ["batching-types", "batching-queue", "batching-scheduler"];

/// The fuzz harness, tested on its own (see [`run`]).
const FUZZ_CRATE: &str = "mlx-batch-fuzz";

/// Crates that bring MLX or HTTP with them.
const FORBIDDEN_IN_CORE: [&str; 7] = [
    "mlx-rs",
    "mlx-sys",
    "axum",
    "hyper",
    "reqwest",
    "tower-http",
    "http",
];

/// Sets up what is missing, then runs every check in order and stops at
/// the first failure.
pub fn run() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    crate::setup::run(crate::setup::SetupArgs {
        cuda: false,
        references: true,
    })?;
    run_step("format check", cargo().args(["fmt", "--all", "--check"]))?;
    run_step(
        "clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run_step(
        "tests",
        cargo().args([
            "test",
            "--workspace",
            "--exclude",
            FUZZ_CRATE,
            "--locked",
            "--no-fail-fast",
        ]),
    )?;
    // A workspace build unifies features, so it always has the server's
    // `mlx` feature on, and the fuzz harness's test binaries would need
    // libmlx's rpath, which only crates that build binaries over MLX set.
    // Built alone, the harness has the HTTP layer without MLX, as under
    // `cargo fuzz`: this checks that it still builds that way and replays
    // the seeds and every regression input.
    run_step(
        "clippy, the server without MLX",
        cargo().args([
            "clippy",
            "--package",
            FUZZ_CRATE,
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run_step(
        "fuzz seeds and regressions, the server without MLX",
        cargo().args(["test", "--package", FUZZ_CRATE, "--locked"]),
    )?;
    run_step(
        "docs",
        cargo()
            .args(["doc", "--workspace", "--no-deps", "--locked"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    // Benches are compiled in the dev profile: that proves they build while
    // reusing the test build's artifacts, instead of a second full release
    // build (MLX's C++ bindings included) that would double CI's time.
    run_step(
        "benches compile",
        cargo().args([
            "bench",
            "--workspace",
            "--no-run",
            "--locked",
            "--profile",
            "dev",
        ]),
    )?;
    boundary_checks()?;
    // Last, since it builds the release server and runs it: the replica
    // setup of docs/deploy.md behind HAProxy and Prometheus.
    crate::deploy_test::run()?;
    eprintln!(
        "xtask: ci passed in {}",
        crate::progress::minutes(started.elapsed())
    );
    Ok(())
}

/// Fails when a core crate depends, directly or not, on MLX or HTTP.
fn boundary_checks() -> anyhow::Result<()> {
    for krate in CORE_CRATES {
        let tree = output(
            "dependency tree",
            cargo().args([
                "tree",
                "--locked",
                "--package",
                krate,
                "--edges",
                "normal,build",
                "--prefix",
                "none",
                "--format",
                "{p}",
            ]),
        )?;
        let names: Vec<&str> = tree
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .collect();
        for bad in FORBIDDEN_IN_CORE {
            if names.contains(&bad) {
                bail!(
                    "boundary check failed: {krate} depends on {bad}; the batching core must know neither MLX nor HTTP"
                );
            }
        }
        eprintln!("xtask: boundary check: {krate} depends on neither MLX nor HTTP");
    }
    Ok(())
}
