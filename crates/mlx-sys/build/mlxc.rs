//! Builds mlx-c as a static library with cmake, against the prebuilt MLX.
//!
//! cmake's output goes to a log file in `OUT_DIR`; only its tail is shown,
//! and only when something fails.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::{locate::Sources, BuildError, Env};

/// How many lines of the cmake log a failure shows.
const LOG_TAIL_LINES: usize = 40;

/// Configures and builds the `mlxc` target; returns the folder holding
/// `libmlxc.a`.
pub fn build(env: &Env, sources: &Sources, compat_header: &Path) -> Result<PathBuf, BuildError> {
    if Command::new("cmake")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| !status.success())
        .unwrap_or(true)
    {
        return Err("cmake not found: install it (Debian: `apt-get install cmake`)".into());
    }

    let build_dir = env.out_dir.join("mlx-c-build");
    let log_path = env.out_dir.join("mlx-c-build.log");
    let mlx_cmake_dir = mlx_cmake_config(env, sources)?;

    let mut configure = Command::new("cmake");
    configure
        .arg("-S")
        .arg(&sources.mlx_c_dir)
        .arg("-B")
        .arg(&build_dir)
        .arg("-DCMAKE_BUILD_TYPE=Release")
        .arg("-DMLX_C_USE_SYSTEM_MLX=ON")
        .arg("-DMLX_C_BUILD_EXAMPLES=OFF")
        .arg("-DBUILD_SHARED_LIBS=OFF")
        .arg(format!("-DMLX_DIR={}", mlx_cmake_dir.display()))
        .arg(format!(
            "-DCMAKE_CXX_FLAGS=-include {}",
            compat_header.display()
        ));
    let log = fs::File::create(&log_path)
        .map_err(|err| format!("mlx-sys: cannot write {}: {err}", log_path.display()))?;
    run_logged("configuring mlx-c", &mut configure, &log, &log_path)?;

    let mut build = Command::new("cmake");
    build
        .arg("--build")
        .arg(&build_dir)
        .args(["--target", "mlxc", "--parallel", &env.jobs]);
    run_logged("building mlx-c", &mut build, &log, &log_path)?;
    Ok(build_dir)
}

/// Chooses the cmake package config that describes MLX.
///
/// On Linux the wheel's own `MLXConfig.cmake` is not usable everywhere: the
/// CUDA wheel's version looks for the CUDA toolkit (nvcc), which a machine
/// that only runs MLX does not have. A config of our own that declares the
/// imported `mlx` target (headers plus the shared library) serves every
/// wheel. On macOS the Metal wheel's config adds the Metal defines and
/// include folders that the headers need, so it is used as shipped.
fn mlx_cmake_config(env: &Env, sources: &Sources) -> Result<PathBuf, BuildError> {
    if env.target_os == "macos" {
        return Ok(sources.mlx_dir.join("share").join("cmake").join("MLX"));
    }
    let dir = env.out_dir.join("mlx-cmake");
    fs::create_dir_all(&dir)
        .map_err(|err| format!("mlx-sys: cannot create {}: {err}", dir.display()))?;
    let config = format!(
        r#"# Written by mlx-sys's build script: the prebuilt MLX as an imported target.
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
        lib = cmake_path(&sources.mlx_lib),
        include = cmake_path(&sources.mlx_include_dir),
    );
    let path = dir.join("MLXConfig.cmake");
    fs::write(&path, config)
        .map_err(|err| format!("mlx-sys: cannot write {}: {err}", path.display()))?;
    Ok(dir)
}

/// A path as cmake reads it inside a quoted string.
fn cmake_path(path: &Path) -> String {
    path.display().to_string().replace('\\', "/")
}

/// Runs `cmd` with its output appended to `log`; on failure returns the
/// log's last lines.
fn run_logged(
    what: &str,
    cmd: &mut Command,
    log: &fs::File,
    log_path: &Path,
) -> Result<(), BuildError> {
    let stdout = log
        .try_clone()
        .map_err(|err| format!("mlx-sys: cannot share the log file: {err}"))?;
    let stderr = log
        .try_clone()
        .map_err(|err| format!("mlx-sys: cannot share the log file: {err}"))?;
    let status = cmd
        .stdout(stdout)
        .stderr(stderr)
        .status()
        .map_err(|err| format!("mlx-sys: {what}: cannot run cmake: {err}"))?;
    if status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(log_path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    Err(BuildError(format!(
        "mlx-sys: {what} failed ({status}); the last lines of {}:\n{tail}",
        log_path.display()
    )))
}
