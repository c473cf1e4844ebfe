//! The peers a user would pick instead of mlx-batch, installed on first use
//! under `.mlx/`:
//!
//! - llama.cpp's own batching server, `llama-server`, built from the
//!   llama.cpp sources that the `llama-cpp-python` sdist vendors (PyPI is
//!   the only source reachable here). llama-cpp-python's own Python server
//!   serves one request at a time and is not the peer.
//! - mlx-lm's server (continuous batching since 0.32) on the same MLX wheel,
//!   given the same dtype mlx-batch runs on the device: a folder converted
//!   to f32 on a CPU, the stored (quantized) one on a GPU.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};

use crate::progress::{log_path, run_logged};

/// The sdist whose vendored llama.cpp is built.
const LLAMA_CPP_PYTHON: &str = "llama-cpp-python==0.3.36";
/// Its folder name once unpacked.
const SDIST_DIR: &str = "llama_cpp_python-0.3.36";

/// The flags llama.cpp is built with on x86-64, beside `GGML_NATIVE`.
///
/// A native build turns on llama.cpp's AMX kernels wherever the CPU
/// advertises AMX; on a VM whose kernel grants AMX permission those kernels
/// died with SIGILL at their first `tilezero`. Every other native
/// instruction set (AVX-512 included) stays on.
const NO_AMX: &str = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16";

/// `llama-server`, built if it is not there yet (about 7 minutes on two
/// cores, once).
pub fn ensure_llama_server(root: &Path, no_install: bool) -> anyhow::Result<PathBuf> {
    let dir = root.join(".mlx").join("llama-server");
    let src = dir.join(SDIST_DIR).join("vendor").join("llama.cpp");
    let build = src.join("build");
    let bin = build.join("bin").join("llama-server");
    if bin.is_file() {
        return Ok(bin);
    }
    if no_install {
        bail!(
            "llama-server is not built in {} (--no-install)",
            dir.display()
        );
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let sdist = dir.join(format!("{SDIST_DIR}.tar.gz"));
    if !sdist.is_file() {
        run_logged(
            &format!("downloading the {LLAMA_CPP_PYTHON} sdist (llama.cpp's sources)"),
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    LLAMA_CPP_PYTHON,
                    "-d",
                ])
                .arg(&dir),
            &log_path("llama-server-download"),
        )?;
    }
    if !src.join("CMakeLists.txt").is_file() {
        run_logged(
            "unpacking llama.cpp's sources",
            Command::new("tar")
                .arg("xzf")
                .arg(&sdist)
                .arg("-C")
                .arg(&dir),
            &log_path("llama-server-unpack"),
        )?;
    }
    let mut configure = Command::new("cmake");
    configure.arg("-S").arg(&src).arg("-B").arg(&build).args([
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
    ]);
    if cfg!(target_arch = "x86_64") {
        configure
            .arg(format!("-DCMAKE_C_FLAGS={NO_AMX}"))
            .arg(format!("-DCMAKE_CXX_FLAGS={NO_AMX}"));
    }
    run_logged(
        "configuring llama-server (cmake)",
        &mut configure,
        &log_path("llama-server-configure"),
    )?;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    run_logged(
        "building llama-server (cmake, several minutes)",
        Command::new("cmake").arg("--build").arg(&build).args([
            "--target",
            "llama-server",
            "-j",
            &jobs.to_string(),
        ]),
        &log_path("llama-server-build"),
    )?;
    if !bin.is_file() {
        bail!("the build finished without {}", bin.display());
    }
    Ok(bin)
}

/// The model folder mlx-lm serves: on a CPU a copy converted to f32 (the
/// dtype mlx-batch runs there, since only f32 matmuls use BLAS), made once
/// with mlx-lm's own converter; on a GPU the folder as stored.
pub fn mlx_lm_model(root: &Path, model_dir: &Path, gpu: bool) -> anyhow::Result<PathBuf> {
    if gpu {
        return Ok(model_dir.to_path_buf());
    }
    let name = model_dir
        .file_name()
        .context("the model folder has no name")?;
    let out = root.join(".mlx").join("mlx-lm-f32").join(name);
    if out.join("config.json").is_file() {
        return Ok(out);
    }
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    run_logged(
        "converting the model to f32 for mlx-lm",
        super::mlx_python(root)
            .args(["-m", "mlx_lm", "convert", "--hf-path"])
            .arg(model_dir)
            .arg("--mlx-path")
            .arg(&out)
            .args(["-d", "--dtype", "float32"]),
        &log_path("mlx-lm-convert-f32"),
    )?;
    Ok(out)
}

/// Whether MLX runs on a GPU here (as mlx-batch's `auto` device would).
pub fn mlx_has_gpu(root: &Path) -> bool {
    super::mlx_python(root)
        .args(["-c", "import mlx.core as mx; print(mx.default_device())"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("gpu"))
}
