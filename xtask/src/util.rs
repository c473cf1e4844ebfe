//! Small helpers shared by the xtask commands.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};

/// The workspace root (the parent of this crate's folder).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs `cmd` in the workspace root, echoing it first, and fails with
/// `what` in the message when it does not succeed.
pub fn run(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    cmd.current_dir(workspace_root());
    eprintln!("xtask: {what}: {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("{what}: could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and returns its standard output.
pub fn output(what: &str, cmd: &mut Command) -> anyhow::Result<String> {
    cmd.current_dir(workspace_root());
    let out = cmd
        .output()
        .with_context(|| format!("{what}: could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Cargo's target folder: `CARGO_TARGET_DIR`, else `target` in the
/// workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds the release `mlx-batch` binary as a step named `what` and
/// returns its path.
pub fn build_release_server(what: &str) -> anyhow::Result<PathBuf> {
    run(
        what,
        cargo().args([
            "build",
            "--release",
            "--package",
            "server",
            "--bin",
            "mlx-batch",
        ]),
    )?;
    Ok(target_dir().join("release").join("mlx-batch"))
}

/// A `cargo` command using the same cargo that runs xtask.
pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
}
