//! Builds mlx-c once, as a static library, against the installed MLX.
//!
//! This used to happen inside mlx-sys's build script, where cargo hides the
//! output of a several-minute cmake build and redoes it for every profile
//! (dev for the tests, release for the server). Built here, it shows its
//! progress, and every profile links the same `.mlx/mlx-c-build/libmlxc.a`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context;

use crate::progress::{log_path, run_logged};

/// The folder that holds `libmlxc.a` once built (mlx-sys's build script
/// looks for it here).
pub fn build_dir(mlx: &Path) -> PathBuf {
    mlx.join("mlx-c-build")
}

/// The header force-included into every mlx-c source: it fills what GCC 12
/// and x86_64 lack (see the header).
pub fn compat_header(root: &Path) -> PathBuf {
    root.join("crates")
        .join("mlx-sys")
        .join("include")
        .join("mlx_sys_compat.h")
}

/// Whether the library is there.
pub fn built(mlx: &Path) -> bool {
    build_dir(mlx).join("libmlxc.a").is_file()
}

/// Configures and builds the `mlxc` target in `.mlx/mlx-c-build`.
pub fn build(root: &Path, mlx: &Path) -> anyhow::Result<()> {
    let build_dir = build_dir(mlx);
    if build_dir.exists() {
        // A build configured against another MLX must not be reused.
        fs::remove_dir_all(&build_dir)
            .with_context(|| format!("removing {}", build_dir.display()))?;
    }
    let mlx_prefix = mlx.join("wheel").join("mlx");
    let cmake_config = cmake_config(mlx, &mlx_prefix)?;
    run_logged(
        "configuring mlx-c (cmake)",
        Command::new("cmake")
            .arg("-S")
            .arg(mlx.join("mlx-c"))
            .arg("-B")
            .arg(&build_dir)
            .arg("-DCMAKE_BUILD_TYPE=Release")
            .arg("-DMLX_C_USE_SYSTEM_MLX=ON")
            .arg("-DMLX_C_BUILD_EXAMPLES=OFF")
            .arg("-DBUILD_SHARED_LIBS=OFF")
            .arg(format!("-DMLX_DIR={}", cmake_config.display()))
            .arg(format!(
                "-DCMAKE_CXX_FLAGS=-include {}",
                compat_header(root).display()
            )),
        &log_path("mlx-c-configure"),
    )?;
    let jobs = std::thread::available_parallelism().map_or(1, usize::from);
    run_logged(
        "building mlx-c (cmake)",
        Command::new("cmake").arg("--build").arg(&build_dir).args([
            "--target",
            "mlxc",
            "--parallel",
            &jobs.to_string(),
        ]),
        &log_path("mlx-c-build"),
    )
}

/// The cmake package config that describes MLX.
///
/// On Linux the wheel's own `MLXConfig.cmake` is not usable everywhere: the
/// CUDA wheel's version looks for the CUDA toolkit (nvcc), which a machine
/// that only runs MLX does not have. A config of our own that declares the
/// imported `mlx` target (headers plus the shared library) serves every
/// wheel. On macOS the Metal wheel's config adds the Metal defines and
/// include folders that the headers need, so it is used as shipped.
fn cmake_config(mlx: &Path, prefix: &Path) -> anyhow::Result<PathBuf> {
    if cfg!(target_os = "macos") {
        return Ok(prefix.join("share").join("cmake").join("MLX"));
    }
    let dir = mlx.join("mlx-cmake");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = format!(
        r#"# Written by `cargo xtask setup`: the prebuilt MLX as an imported target.
if(NOT TARGET mlx)
  add_library(mlx SHARED IMPORTED)
  set_target_properties(mlx PROPERTIES
    IMPORTED_LOCATION "{lib}"
    INTERFACE_INCLUDE_DIRECTORIES "{include}"
    INTERFACE_COMPILE_FEATURES "cxx_std_20")
endif()
set(MLX_FOUND TRUE)
set(MLX_INCLUDE_DIRS "{include}")
set(MLX_LIBRARIES mlx)
"#,
        lib = cmake_path(&prefix.join("lib").join("libmlx.so")),
        include = cmake_path(&prefix.join("include")),
    );
    let path = dir.join("MLXConfig.cmake");
    fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    Ok(dir)
}

/// A path as cmake reads it inside a quoted string.
fn cmake_path(path: &Path) -> String {
    path.display().to_string().replace('\\', "/")
}
