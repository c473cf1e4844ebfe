//! Finds the prebuilt MLX, the mlx-c sources and the mlx-c library.

use std::path::{Path, PathBuf};

use crate::{BuildError, Env};

/// What the rest of the build needs to know about MLX and mlx-c.
pub struct Sources {
    /// `<mlx_dir>/include`.
    pub mlx_include_dir: PathBuf,
    /// The folder that holds `libmlx`.
    pub mlx_lib_dir: PathBuf,
    /// The mlx-c source tree (with `CMakeLists.txt` and `mlx/c/*.h`).
    pub mlx_c_dir: PathBuf,
    /// The folder that holds the static `libmlxc.a`.
    pub mlx_c_lib_dir: PathBuf,
}

/// Looks in `MLX_DIR` / `MLX_C_DIR` first, then in the project-local
/// `.mlx/` folder that `cargo xtask setup` fills.
pub fn find(env: &Env) -> Result<Sources, BuildError> {
    let project_mlx = env
        .manifest_dir
        .parent()
        .and_then(Path::parent)
        .map(|root| root.join(".mlx"))
        .ok_or("mlx-sys: cannot find the workspace root above this crate")?;
    let stamp = project_mlx.join("stamp");
    if stamp.exists() {
        // Setup rewrites the stamp whenever it installs something else.
        println!("cargo::rerun-if-changed={}", stamp.display());
    }

    let mlx_dir = match std::env::var_os("MLX_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => project_mlx.join("wheel").join("mlx"),
    };
    let lib_name = if env.target_os == "macos" || env.target_os == "ios" {
        "libmlx.dylib"
    } else {
        "libmlx.so"
    };
    let mlx_lib = mlx_dir.join("lib").join(lib_name);
    let mlx_include_dir = mlx_dir.join("include");
    if !mlx_lib.is_file() || !mlx_include_dir.join("mlx").join("mlx.h").is_file() {
        return Err(BuildError(format!(
            "MLX not found (looked for {} and include/mlx/mlx.h in {}): run `cargo xtask setup` or set MLX_DIR",
            lib_name,
            mlx_dir.display()
        )));
    }
    println!("cargo::rerun-if-changed={}", mlx_lib.display());

    let mlx_c_dir = match std::env::var_os("MLX_C_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => project_mlx.join("mlx-c"),
    };
    let cmake_lists = mlx_c_dir.join("CMakeLists.txt");
    if !cmake_lists.is_file() || !mlx_c_dir.join("mlx").join("c").join("mlx.h").is_file() {
        return Err(BuildError(format!(
            "mlx-c sources not found in {}: run `cargo xtask setup` or set MLX_C_DIR",
            mlx_c_dir.display()
        )));
    }
    println!("cargo::rerun-if-changed={}", cmake_lists.display());

    let mlx_c_lib_dir = match std::env::var_os("MLX_C_LIB_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => project_mlx.join("mlx-c-build"),
    };
    let mlx_c_lib = mlx_c_lib_dir.join("libmlxc.a");
    if !mlx_c_lib.is_file() {
        return Err(BuildError(format!(
            "mlx-c is not built (no {}): run `cargo xtask setup` or set MLX_C_LIB_DIR",
            mlx_c_lib.display()
        )));
    }
    println!("cargo::rerun-if-changed={}", mlx_c_lib.display());

    Ok(Sources {
        mlx_c_lib_dir,
        mlx_lib_dir: mlx_dir.join("lib"),
        mlx_include_dir,
        mlx_c_dir,
    })
}
