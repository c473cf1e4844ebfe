//! End-to-end tests with the real default model on the CPU, driven by the
//! official `openai` Python package against a server started here.
//!
//! They skip, printing why, when the default model or the `openai` package
//! is missing; `cargo xtask setup --references` (which `cargo xtask ci`
//! runs) installs both, the client into the git-ignored
//! `.mlx/openai-client` folder.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod default_model;

use default_model::{model_or_skip, skip};
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use batching_scheduler::SchedulerConfig;
use server::{
    app::{AppState, ServerConfig},
    cli::{default_model_dir, DeviceArg, ModelArgs},
    commands::{load, KvSize},
    telemetry,
    text_model::TextModel,
};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn imports_openai(dir: &Path) -> bool {
    Command::new("python3")
        .env("PYTHONPATH", dir)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The folder holding the `openai` package, which setup installs.
fn openai_package() -> Result<PathBuf, String> {
    let dir = workspace_root().join(".mlx").join("openai-client");
    if imports_openai(&dir) {
        return Ok(dir);
    }
    Err(format!(
        "the openai client is not installed in {} (run `cargo xtask setup --references`)",
        dir.display()
    ))
}

/// Starts a server on the default model; `None` (after printing why) when
/// the test must be skipped.
async fn start_server(max_batch_size: usize) -> Option<(String, String, PathBuf)> {
    let model_dir = model_or_skip()?;
    let python_path = match openai_package() {
        Ok(p) => p,
        Err(why) => {
            skip(&why);
            return None;
        }
    };
    let metrics = telemetry::prometheus().unwrap();
    let args = ModelArgs {
        model: Some(model_dir),
        device: DeviceArg::Cpu,
    };
    let scheduler = SchedulerConfig {
        max_batch_size,
        ..SchedulerConfig::default()
    };
    let loaded =
        tokio::task::block_in_place(|| load(&args, scheduler, KvSize::Tokens(4096).into()))
            .unwrap();
    let model_id = loaded.model.id().to_owned();
    let state = AppState::new(
        Arc::new(loaded.engine),
        Arc::new(loaded.model),
        metrics,
        ServerConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(server::app::serve(listener, state, std::future::pending()));
    Some((base, model_id, python_path))
}

/// Runs the Python checks named in `checks` and returns their output.
async fn run_python(base: String, model: String, python_path: PathBuf, checks: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/openai_client.py");
    let checks: Vec<String> = checks.iter().map(|c| (*c).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .env("PYTHONPATH", python_path)
            .env("MLX_BATCH_MODEL_DIR", default_model_dir())
            .arg(script)
            .arg(base)
            .arg(model)
            .args(checks)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The checks of `tests/e2e/openai_client.py` that CI runs, in order.
const CHECKS: &[&str] = &[
    "basic",
    "structured",
    "tools",
    "logprobs",
    "concurrent",
    "priority",
    "preempt",
    "long_prompt",
    "disconnect",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_works_against_the_default_model() {
    let Some((base, model, python_path)) = start_server(8).await else {
        return;
    };
    let out = run_python(base, model, python_path, CHECKS).await;
    println!("{out}");
    for check in CHECKS {
        assert!(
            out.contains(&format!("ok: {check}")),
            "{check} did not run:\n{out}"
        );
    }
}

/// Time to first token and throughput with 1 and 8 streams, for the report:
/// `cargo test -p server --release --test e2e_openai -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check; run it on purpose"]
async fn measure_ttft_and_throughput() {
    let Some((base, model, python_path)) = start_server(8).await else {
        return;
    };
    println!(
        "{}",
        run_python(base, model, python_path, &["measure", "measure_structured"]).await
    );
}
