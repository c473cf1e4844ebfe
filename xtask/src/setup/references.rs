//! The Python references the tests compare against, installed for `ci`.
//!
//! - mlx-lm on the same MLX wheel that the Rust crates link, in
//!   `.mlx/python`: the oracle tests check our models against it, and the
//!   bench runs its server.
//! - The official `openai` client, in `.mlx/openai-client`: the end-to-end
//!   tests drive the server with it.
//!
//! Both go into project-local folders with `pip install --target`, so
//! nothing touches the system's Python. A stamp file named after the pinned
//! requirements marks a finished install: a second run does not start
//! Python at all.

use std::{fs, path::Path};

use anyhow::Context;

use crate::progress::{log_path, run_logged};
use crate::setup::MLX_VERSION;

/// The `openai` client versions the end-to-end tests are written for.
pub const OPENAI_REQUIREMENT: &str = "openai>=1.40,<3";

/// One pip install into a project-local folder.
struct Reference<'a> {
    /// What the progress line calls it.
    what: &'a str,
    /// The folder under `.mlx/`.
    folder: &'a str,
    /// Requirement specifiers.
    requirements: Vec<String>,
}

impl Reference<'_> {
    /// The stamp's name changes with the requirements, so a new pin
    /// installs again.
    fn stamp(&self) -> String {
        let pins: String = self
            .requirements
            .join(" ")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!(".installed-{pins}")
    }

    fn installed(&self, root: &Path) -> bool {
        root.join(".mlx")
            .join(self.folder)
            .join(self.stamp())
            .is_file()
    }

    fn ensure(&self, root: &Path) -> anyhow::Result<()> {
        if self.installed(root) {
            return Ok(());
        }
        let dir = root.join(".mlx").join(self.folder);
        run_logged(
            &format!("downloading and installing {}", self.what),
            crate::setup::pip()?
                .args(["install", "--upgrade", "--target"])
                .arg(&dir)
                .args(&self.requirements),
            &log_path(self.folder),
        )?;
        let stamp = dir.join(self.stamp());
        fs::write(&stamp, "").with_context(|| format!("writing {}", stamp.display()))
    }
}

/// mlx-lm on the pinned wheel (its CPU build: what the tests run on).
fn mlx_lm() -> Reference<'static> {
    Reference {
        what: "the reference mlx-lm",
        folder: "python",
        requirements: vec![
            format!("mlx-lm=={MLX_VERSION}"),
            format!("mlx=={MLX_VERSION}"),
            format!("mlx-cpu=={MLX_VERSION}"),
            "numpy".to_owned(),
        ],
    }
}

fn openai_client() -> Reference<'static> {
    Reference {
        what: "the openai client",
        folder: "openai-client",
        requirements: vec![OPENAI_REQUIREMENT.to_owned()],
    }
}

/// Installs every reference that is missing.
pub fn ensure(root: &Path) -> anyhow::Result<()> {
    mlx_lm().ensure(root)?;
    openai_client().ensure(root)
}

/// Installs mlx-lm alone (the bench needs it, not the client).
pub fn ensure_mlx_lm(root: &Path) -> anyhow::Result<()> {
    mlx_lm().ensure(root)
}

/// Whether mlx-lm is installed.
pub fn mlx_lm_installed(root: &Path) -> bool {
    mlx_lm().installed(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_names_its_pins_so_a_new_pin_installs_again() {
        let stamp = openai_client().stamp();
        assert!(stamp.starts_with(".installed-openai"), "{stamp}");
        let mut other = openai_client();
        other.requirements = vec!["openai==2.0".to_owned()];
        assert_ne!(stamp, other.stamp());
        assert!(!stamp.contains('/') && !stamp.contains(' '), "{stamp}");
    }
}
