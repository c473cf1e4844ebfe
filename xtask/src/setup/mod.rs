//! `cargo xtask setup`: installs everything a fresh machine lacks, into
//! project-local, git-ignored folders where it can.
//!
//! In order: the system packages the build needs ([`system`], apt-get when
//! root; with `--references` also HAProxy and Prometheus for the replica
//! test), the MLX wheel and the mlx-c sources, the mlx-c library
//! ([`mlx_c`]), the default model ([`crate::model`]) and, for `ci`, the
//! Python references ([`references`]). Everything is pinned: the MLX wheel
//! by version and sha256 (pip checks the hash with `--require-hashes`), the
//! mlx-c sources by the exact version of the crates.io package `mlx-sys`
//! that carries them. Every step checks before it acts (stamp files, a
//! `PATH` lookup), so a second run takes milliseconds; `serve` and `ci` start
//! with it.

mod mlx_c;
pub mod references;
pub mod system;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context};
use clap::Args;
use sha2::{Digest, Sha256};

use crate::progress::{log_path, run_logged};
use crate::util::cargo;

/// The MLX release that mlx-c 0.7.0 is written against; 0.32.3 changed the
/// signature of `gather_qmm`, which breaks mlx-c 0.7.0.
pub(crate) const MLX_VERSION: &str = "0.32.2";

/// The crates.io package whose `src/mlx-c` folder holds the mlx-c sources.
const MLX_C_CRATE: &str = "mlx-sys";
/// Its exact version: the one `mlx-rs` 0.33.0 binds to.
const MLX_C_CRATE_VERSION: &str = "0.7.0";

/// Bump when the layout of `.mlx/` changes, so old installs are redone.
/// Version 2 builds mlx-c here instead of in mlx-sys's build script.
const LAYOUT_VERSION: u32 = 2;

/// A wheel that setup may install: the pip package and the sha256 of every
/// file pip may pick for it (one per platform tag).
struct Wheel {
    package: &'static str,
    sha256: &'static [&'static str],
}

/// Linux CPU: `mlx_cpu-0.32.2-py3-none-manylinux_2_35_x86_64.whl`.
const MLX_CPU: Wheel = Wheel {
    package: "mlx-cpu",
    sha256: &["fc5d31b90fc4f457b2f9614ed45651a567d22a6a11a03d114a90a4e10bdd8878"],
};

/// NVIDIA GPUs: `mlx_cuda_13-0.32.2-py3-none-manylinux_2_35_x86_64.whl`.
const MLX_CUDA: Wheel = Wheel {
    package: "mlx-cuda-13",
    sha256: &["335094ccd1c0c6dc3e09c8caba207c8180602bacc0c38ba20c1d81e9456ab394"],
};

/// CUDA runtime libraries that the CUDA wheel loads; pip resolves them from
/// the wheel's own requirements (they are not hash-pinned here).
const CUDA_RUNTIME: [&str; 6] = [
    "nvidia-cudnn-cu13==9.*",
    "nvidia-nccl-cu13",
    "nvidia-cublas==13.*",
    "nvidia-cufft==12.*",
    "nvidia-cuda-nvrtc==13.*",
    "nvidia-cuda-runtime==13.*",
];

/// macOS: `mlx_metal-0.32.2-py3-none-macosx_{14,15,26}_0_arm64.whl`.
const MLX_METAL: Wheel = Wheel {
    package: "mlx-metal",
    sha256: &[
        "3825fff379dbc107dd3413e564a06caeaa24819910ec49c0439e454c06a1b9b8",
        "55a369250d220b2cf10213a87a2ac1b1a420608c5b35b1df4e7147ac8e32f121",
        "e6abeac9ac5265830c9c1541b6f96e9be37a85c2446763a46ad466c63a3837ab",
    ],
};

/// Options of `cargo xtask setup`.
#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Install the CUDA build of MLX (the default when an NVIDIA driver is
    /// present).
    #[arg(long)]
    pub cuda: bool,
    /// Also install the Python references the tests compare against
    /// (mlx-lm on the same MLX wheel, the official `openai` client) and the
    /// Debian packages `haproxy` and `prometheus` that `deploy-test` runs;
    /// `cargo xtask ci` asks for them.
    #[arg(long)]
    pub references: bool,
}

/// Installs everything `mlx-batch` needs and returns the default model
/// folder; quick when nothing changed.
pub fn run(args: SetupArgs) -> anyhow::Result<PathBuf> {
    let started = Instant::now();
    let root = crate::util::workspace_root();
    let mlx = root.join(".mlx");
    // One apt-get run for everything missing: `ci` (the references) also
    // needs what the replica test runs; `serve` never installs it.
    let needs = if args.references {
        [system::BUILD.as_slice(), &system::DEPLOY].concat()
    } else {
        system::BUILD.to_vec()
    };
    system::ensure(&needs)?;

    let wheel = choose_wheel(args.cuda);
    let stamp = stamp_text(&root, wheel)?;
    let stamp_path = mlx.join("stamp");
    if fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) && installed(&mlx) {
        eprintln!(
            "xtask: MLX {MLX_VERSION} ({}) and mlx-c are already set up",
            wheel.package
        );
    } else {
        // Remove the stamp first: an interrupted setup must not look done.
        let _ = fs::remove_file(&stamp_path);
        fs::create_dir_all(&mlx).with_context(|| format!("creating {}", mlx.display()))?;
        install_wheel(&mlx, wheel)?;
        install_mlx_c_sources(&mlx)?;
        mlx_c::build(&root, &mlx)?;
        fs::write(&stamp_path, &stamp)
            .with_context(|| format!("writing {}", stamp_path.display()))?;
        eprintln!(
            "xtask: MLX {MLX_VERSION} ({}) and mlx-c set up",
            wheel.package
        );
    }

    let model = crate::model::ensure_default_model(&root)?;
    if args.references {
        references::ensure(&root)?;
    }
    eprintln!(
        "xtask: setup finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(model)
}

/// The Metal wheel on macOS; on Linux the CUDA wheel when asked for or when
/// an NVIDIA driver is present, else the CPU wheel.
fn choose_wheel(cuda: bool) -> &'static Wheel {
    if cfg!(target_os = "macos") {
        &MLX_METAL
    } else if cuda || nvidia_driver_present() {
        &MLX_CUDA
    } else {
        &MLX_CPU
    }
}

fn nvidia_driver_present() -> bool {
    Path::new("/proc/driver/nvidia").exists()
        || Command::new("nvidia-smi")
            .arg("-L")
            .output()
            .is_ok_and(|out| out.status.success())
}

/// Everything that decides what is installed; any change redoes setup.
/// The compat header is compiled into mlx-c, so its contents count too.
fn stamp_text(root: &Path, wheel: &Wheel) -> anyhow::Result<String> {
    let header_path = mlx_c::compat_header(root);
    let header =
        fs::read(&header_path).with_context(|| format!("reading {}", header_path.display()))?;
    let header_sha: String = Sha256::digest(&header)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!(
        "layout {LAYOUT_VERSION}\nmlx {} {MLX_VERSION}\nsha256 {}\nmlx-c {MLX_C_CRATE}-{MLX_C_CRATE_VERSION}\ncompat header {header_sha}\n",
        wheel.package,
        wheel.sha256.join(" "),
    ))
}

/// Whether the files the build needs are all there.
fn installed(mlx: &Path) -> bool {
    let lib = mlx.join("wheel").join("mlx").join("lib");
    (lib.join("libmlx.so").is_file() || lib.join("libmlx.dylib").is_file())
        && mlx.join("mlx-c").join("CMakeLists.txt").is_file()
        && mlx_c::built(mlx)
}

/// Installs the pinned wheel into `.mlx/wheel` (replacing what was there)
/// and checks the version that landed.
fn install_wheel(mlx: &Path, wheel: &Wheel) -> anyhow::Result<()> {
    let target = mlx.join("wheel");
    if target.exists() {
        fs::remove_dir_all(&target).with_context(|| format!("removing {}", target.display()))?;
    }
    let hashes: String = wheel
        .sha256
        .iter()
        .map(|hash| format!(" --hash=sha256:{hash}"))
        .collect();
    let requirements = mlx.join("requirements.txt");
    fs::write(
        &requirements,
        format!("{}=={MLX_VERSION}{hashes}\n", wheel.package),
    )
    .with_context(|| format!("writing {}", requirements.display()))?;

    run_logged(
        &format!(
            "downloading and installing the MLX wheel ({})",
            wheel.package
        ),
        pip()?
            .args(["install", "--no-deps"])
            .args(["--only-binary=:all:", "--require-hashes", "--target"])
            .arg(&target)
            .arg("-r")
            .arg(&requirements),
        &log_path("mlx-wheel"),
    )?;
    if wheel.package == MLX_CUDA.package {
        run_logged(
            "downloading and installing the CUDA runtime libraries",
            pip()?
                .args(["install", "--no-deps"])
                .args(["--only-binary=:all:", "--target"])
                .arg(&target)
                .args(CUDA_RUNTIME),
            &log_path("cuda-runtime"),
        )?;
    }

    Ok(())
}

/// `python3 -m pip` with its version check off, after making sure pip is
/// there (installing it with apt-get where setup can).
pub fn pip() -> anyhow::Result<Command> {
    system::ensure(&[system::Need::Pip])?;
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "pip"])
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1");
    Ok(cmd)
}

/// Fetches the crates.io package that carries mlx-c through cargo and copies
/// its `src/mlx-c` folder to `.mlx/mlx-c`.
fn install_mlx_c_sources(mlx: &Path) -> anyhow::Result<()> {
    let fetch = mlx.join("mlx-c-fetch");
    fs::create_dir_all(fetch.join("src"))
        .with_context(|| format!("creating {}", fetch.display()))?;
    fs::write(
        fetch.join("Cargo.toml"),
        format!(
            "# Written by `cargo xtask setup` to fetch the mlx-c sources through cargo.\n\
             [package]\nname = \"mlx-c-fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
             [dependencies]\n{MLX_C_CRATE} = \"={MLX_C_CRATE_VERSION}\"\n\n[workspace]\n"
        ),
    )
    .context("writing the fetch manifest")?;
    fs::write(fetch.join("src").join("lib.rs"), "").context("writing the fetch crate")?;
    let manifest = fetch.join("Cargo.toml");
    run_logged(
        "fetching the mlx-c sources (cargo)",
        cargo().arg("fetch").arg("--manifest-path").arg(&manifest),
        &log_path("mlx-c-fetch"),
    )?;

    let package = find_registry_package()?;
    let source = package.join("src").join("mlx-c");
    let dest = mlx.join("mlx-c");
    if dest.exists() {
        fs::remove_dir_all(&dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    copy_dir(&source, &dest)?;
    Ok(())
}

/// Where cargo unpacked `mlx-sys-0.7.0`: `$CARGO_HOME/registry/src/*/`.
fn find_registry_package() -> anyhow::Result<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let registry = cargo_home.join("registry").join("src");
    let name = format!("{MLX_C_CRATE}-{MLX_C_CRATE_VERSION}");
    let entries =
        fs::read_dir(&registry).with_context(|| format!("listing {}", registry.display()))?;
    for entry in entries.flatten() {
        let candidate = entry.path().join(&name);
        if candidate
            .join("src")
            .join("mlx-c")
            .join("CMakeLists.txt")
            .is_file()
        {
            return Ok(candidate);
        }
    }
    bail!(
        "cargo fetched {name} but it is not under {}",
        registry.display()
    )
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else {
            fs::copy(entry.path(), &dest)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}
