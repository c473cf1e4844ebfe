//! The `mlx-batch` binary as a user runs it: one-line errors with a
//! non-zero exit code, and `generate` streaming a continuation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn mlx_batch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mlx-batch"))
}

#[test]
fn a_missing_model_is_one_line_on_stderr_and_a_failing_exit_code() {
    let cases: [&[&str]; 2] = [
        &["serve", "--model", "no/such/model"],
        &["generate", "--prompt", "hi", "--model", "no/such/model"],
    ];
    for args in cases {
        let out = mlx_batch().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(
            lines[0].starts_with("mlx-batch: error: no model at no/such/model"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn bad_arguments_are_refused_by_clap_with_usage() {
    let out = mlx_batch()
        .args(["serve", "--kv-memory", "lots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("--kv-memory"), "{stderr}");
}

#[test]
fn generate_prints_a_greedy_continuation_with_the_default_model() {
    let model = server::cli::default_model_dir();
    if !model.join("config.json").is_file() {
        eprintln!(
            "skipping: no default model at {} (run `cargo xtask setup`)",
            model.display()
        );
        assert!(
            std::env::var_os("MLX_BATCH_REQUIRE_REFERENCES").is_none(),
            "MLX_BATCH_REQUIRE_REFERENCES is set, so this may not be skipped"
        );
        return;
    }
    let run = || {
        let out = mlx_batch()
            .args([
                "generate",
                "--prompt",
                "Once upon a time,",
                "--max-tokens",
                "6",
                "--device",
                "cpu",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let first = run();
    assert!(first.trim().len() > 3, "{first:?}");
    assert_eq!(run(), first, "greedy output is deterministic");
}
