//! `cargo xtask setup`: installs MLX and the default model project-locally.

/// Installs everything `mlx-batch` needs; filled by the MLX issue.
pub fn run() -> anyhow::Result<()> {
    crate::model::ensure_default_model(&crate::util::workspace_root())?;
    Ok(())
}
