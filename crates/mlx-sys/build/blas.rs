//! Finds Debian's OpenBLAS so that libmlx's BLAS calls use it.
//!
//! The Linux wheels bundle the reference BLAS, which makes f32 matmul about
//! 30x slower than OpenBLAS. libmlx does not define `cblas_*` itself but
//! takes them from its own dependency on that BLAS; a binary that lists
//! OpenBLAS among its direct dependencies puts it ahead of every indirect
//! one in the dynamic linker's search order, so `cblas_*` resolve to
//! OpenBLAS with no `LD_PRELOAD`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::Env;

/// The OpenBLAS shared library to link.
pub struct OpenBlas {
    /// The library file, linked by full path: Debian's runtime package has
    /// no unversioned `libopenblas.so` for `-lopenblas`.
    pub path: PathBuf,
    /// The folder that holds it.
    pub dir: PathBuf,
}

const FILE_NAME: &str = "libopenblas.so.0";

/// Returns OpenBLAS on Linux when it is installed and not disabled with
/// `MLX_BATCH_NO_OPENBLAS=1`; warns once when it is absent.
pub fn find_openblas(env: &Env) -> Option<OpenBlas> {
    if env.target_os != "linux" {
        return None;
    }
    if std::env::var("MLX_BATCH_NO_OPENBLAS").is_ok_and(|value| !value.is_empty() && value != "0") {
        println!("cargo::warning=MLX_BATCH_NO_OPENBLAS is set: MLX uses its bundled reference BLAS (slow f32 matmul)");
        return None;
    }
    let found = known_paths()
        .into_iter()
        .chain(ldconfig_paths())
        .find(|path| path.is_file());
    match found {
        Some(path) => Some(OpenBlas {
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            path,
        }),
        None => {
            println!("cargo::warning=OpenBLAS not found: MLX uses its bundled reference BLAS, about 30x slower for f32 matmul (Debian: `apt-get install libopenblas0-pthread`)");
            None
        }
    }
}

/// The pthread build first: it is what Debian's `libopenblas0-pthread`
/// installs, and it is the variant that uses every core.
fn known_paths() -> Vec<PathBuf> {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let triple = format!("{arch}-linux-gnu");
    ["openblas-pthread", "openblas-openmp", "openblas-serial", ""]
        .iter()
        .map(|variant| {
            Path::new("/usr/lib")
                .join(&triple)
                .join(variant)
                .join(FILE_NAME)
        })
        .chain([
            PathBuf::from("/usr/lib64").join(FILE_NAME),
            PathBuf::from("/usr/lib").join(FILE_NAME),
        ])
        .collect()
}

/// Whatever the dynamic linker's cache knows, for other distributions.
fn ldconfig_paths() -> Vec<PathBuf> {
    let output = ["ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"]
        .iter()
        .find_map(|cmd| Command::new(cmd).arg("-p").output().ok())
        .filter(|out| out.status.success());
    let Some(output) = output else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.trim_start().starts_with(FILE_NAME))
        .filter_map(|line| line.split("=>").nth(1))
        .map(|path| PathBuf::from(path.trim()))
        .collect()
}
