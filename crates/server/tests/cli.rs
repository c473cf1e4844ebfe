//! The `mlx-batch` binary as a user runs it: one-line errors with a
//! non-zero exit code, `generate` streaming a continuation, and log lines
//! that fit where they go.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod default_model;

use default_model::model_or_skip;
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

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
    if model_or_skip().is_none() {
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

/// The log lines `serve` writes to stderr (a pipe here, not a terminal) up
/// to and including the one saying it serves, in the given format.
fn serve_log_until_ready(log_format: &str) -> Option<Vec<String>> {
    model_or_skip()?;
    let mut child = mlx_batch()
        .args([
            "serve",
            "--port",
            "0",
            "--device",
            "cpu",
            "--log-format",
            log_format,
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let ready = line.contains("serving ");
        lines.push(line);
        if ready {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        lines.last().is_some_and(|l| l.contains("serving ")),
        "the server never said it serves: {lines:?}"
    );
    Some(lines)
}

#[test]
fn text_logs_to_a_pipe_carry_no_escape_codes() {
    let Some(lines) = serve_log_until_ready("text") else {
        return;
    };
    for line in &lines {
        assert!(!line.contains('\u{1b}'), "an escape code in {line:?}");
    }
    assert!(lines.last().unwrap().contains("INFO"), "{lines:?}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let Some(lines) = serve_log_until_ready("json") else {
        return;
    };
    for line in &lines {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line:?}"));
        assert!(value["timestamp"].is_string(), "{line}");
        assert!(value["level"].is_string(), "{line}");
    }
    let ready: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(ready["level"], "INFO");
    let message = ready["fields"]["message"].as_str().unwrap();
    assert!(message.starts_with("serving "), "{message}");
}

#[test]
fn an_unknown_log_format_is_refused_by_clap() {
    let out = mlx_batch()
        .args(["serve", "--log-format", "xml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("--log-format"), "{stderr}");
}
