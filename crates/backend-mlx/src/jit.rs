//! Lets MLX's CPU JIT build its fused kernels for this machine's ISA.
//!
//! On the CPU, `mlx::compile` fuses elementwise ops into C++ that it builds
//! at run time with `g++` from `PATH`, adding `-mavx2 -mfma -mf16c` only
//! when libmlx itself was built with AVX2. The prebuilt x86-64 wheel is
//! built for the baseline ISA, so its fused kernels are scalar code whose
//! every `fma` is a call into libm: an `exp` costs about 12 ns, which makes
//! softmax and SiLU the largest non-matmul costs of a step. On a CPU that
//! has AVX2, FMA and F16C, this puts a small `g++` wrapper ahead of the real
//! compiler on `PATH` that passes exactly the flags MLX passes on its own
//! AVX2 builds; the same fused `exp` then runs about 4x faster.
//!
//! MLX caches built kernels on disk by name only (under
//! `$TMPDIR/mlx/<version>/cpu`), so kernels that some earlier process built
//! without the flags are reused as they are. Set `MLX_BATCH_NATIVE_JIT=0` to
//! leave the compiler alone (for A/B measurements).

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// The flags MLX's JIT adds when libmlx was built with AVX2.
const FLAGS: &str = "-mavx2 -mfma -mf16c";

/// What [`enable`] did, decided once per process (the server logs it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NativeJit {
    /// The wrapper is first on `PATH`.
    Enabled(PathBuf),
    /// Left alone, and why.
    Skipped(&'static str),
}

static STATE: OnceLock<NativeJit> = OnceLock::new();

/// Puts the `g++` wrapper first on `PATH` when this CPU and platform allow
/// it; idempotent. Call it before the first compiled function runs.
///
/// It changes this process's `PATH`, which is only safe while no other
/// thread reads the environment: the backend calls it once while loading,
/// before MLX compiles anything.
pub fn enable() -> &'static NativeJit {
    STATE.get_or_init(decide)
}

fn decide() -> NativeJit {
    if std::env::var("MLX_BATCH_NATIVE_JIT").is_ok_and(|v| v == "0") {
        return NativeJit::Skipped("MLX_BATCH_NATIVE_JIT=0");
    }
    if !cpu_supports_flags() {
        return NativeJit::Skipped("this CPU lacks AVX2, FMA or F16C, or is not x86-64");
    }
    let Some(path) = std::env::var_os("PATH") else {
        return NativeJit::Skipped("PATH is not set");
    };
    let dir = std::env::temp_dir().join(format!("mlx-batch-jit-{}", user_tag()));
    let dirs: Vec<PathBuf> = std::env::split_paths(&path).filter(|d| d != &dir).collect();
    let Some(gxx) = dirs
        .iter()
        .map(|d| d.join("g++"))
        .find(|p| is_executable(p))
    else {
        return NativeJit::Skipped("no g++ on PATH (MLX's JIT needs it anyway)");
    };
    if write_wrapper(&dir, &gxx).is_err() {
        return NativeJit::Skipped("could not write the g++ wrapper");
    }
    let mut all = vec![dir.clone()];
    all.extend(dirs);
    let Ok(joined) = std::env::join_paths(all) else {
        return NativeJit::Skipped("PATH could not be rebuilt");
    };
    std::env::set_var("PATH", joined);
    NativeJit::Enabled(dir)
}

#[cfg(target_arch = "x86_64")]
fn cpu_supports_flags() -> bool {
    cfg!(target_os = "linux")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_supports_flags() -> bool {
    false
}

/// Keeps users on one machine from sharing (and racing on) one folder.
fn user_tag() -> String {
    std::env::var("USER").unwrap_or_else(|_| "user".to_owned())
}

fn is_executable(p: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        p.is_file()
    }
}

/// Writes `dir/g++` atomically (a temporary file renamed into place), so
/// that two processes starting together never run a half-written script.
fn write_wrapper(dir: &Path, gxx: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let quoted = gxx.display().to_string().replace('\'', r"'\''");
    let script = format!(
        "#!/bin/sh\n# Written by mlx-batch: MLX's CPU JIT adds these flags only when libmlx\n# itself was built for AVX2; this CPU has them.\nexec '{quoted}' {FLAGS} \"$@\"\n"
    );
    let target = dir.join("g++");
    if std::fs::read_to_string(&target).is_ok_and(|s| s == script) {
        return Ok(());
    }
    let tmp = dir.join(format!("g++.{}", std::process::id()));
    std::fs::write(&tmp, script)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::rename(&tmp, &target)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_wrapper_passes_the_flags_and_every_argument_to_the_real_compiler() {
        let dir = std::env::temp_dir().join(format!("mlx-batch-jit-test-{}", std::process::id()));
        // A stand-in compiler that prints its arguments.
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("fake-g++");
        std::fs::write(&fake, "#!/bin/sh\necho \"$@\"\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let wrapper_dir = dir.join("bin");
        write_wrapper(&wrapper_dir, &fake).unwrap();
        let out = std::process::Command::new(wrapper_dir.join("g++"))
            .args(["-O3", "a file.cpp"])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text.trim(), format!("{FLAGS} -O3 a file.cpp"));
        // Writing it again leaves it as it is.
        write_wrapper(&wrapper_dir, &fake).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
