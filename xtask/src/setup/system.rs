//! The system packages the build needs: checked in milliseconds, installed
//! with apt-get when setup runs as root on Debian or Ubuntu.
//!
//! Each need is first looked for the way the build will look for it (a
//! command on `PATH`, a library file), so a tool installed some other way
//! counts. Only what is missing is installed. When setup cannot install
//! (not root, not Debian, macOS) it stops with one line that gives the exact
//! command to run, instead of failing deep inside a build.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::bail;

use crate::progress::{log_path, run_logged};

/// Something the build or setup needs from the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// cmake, to build mlx-c.
    Cmake,
    /// A C++ compiler, for mlx-c and for MLX's run-time kernel fusion.
    Cxx,
    /// libclang, for bindgen.
    Libclang,
    /// OpenBLAS, which makes MLX's f32 matmuls fast on a CPU.
    Openblas,
    /// pip, which installs the MLX wheel, the model and the references.
    Pip,
    /// HAProxy, the load balancer of the replica test (`deploy-test`).
    Haproxy,
    /// Prometheus and its `promtool`, which scrape the replicas in
    /// `deploy-test` and check the shipped rules.
    Prometheus,
}

/// What the Rust build needs.
pub const BUILD: [Need; 4] = [Need::Cmake, Need::Cxx, Need::Libclang, Need::Openblas];

/// What the replica test needs besides the build: `ci` installs it with the
/// references, `serve` never does.
pub const DEPLOY: [Need; 2] = [Need::Haproxy, Need::Prometheus];

impl Need {
    /// The Debian/Ubuntu packages that provide it.
    fn debian(self) -> &'static [&'static str] {
        match self {
            Need::Cmake => &["cmake"],
            Need::Cxx => &["g++"],
            Need::Libclang => &["libclang-dev"],
            Need::Openblas => &["libopenblas0-pthread"],
            Need::Pip => &["python3", "python3-pip"],
            Need::Haproxy => &["haproxy"],
            Need::Prometheus => &["prometheus"],
        }
    }

    /// What to install on macOS, where it is not part of the system.
    fn macos(self) -> Option<&'static str> {
        match self {
            Need::Cmake => Some("`brew install cmake`"),
            Need::Cxx | Need::Libclang => {
                Some("the Xcode command line tools (`xcode-select --install`)")
            }
            Need::Pip => Some("Python 3 with pip (`brew install python`)"),
            Need::Haproxy => Some("`brew install haproxy`"),
            Need::Prometheus => Some("`brew install prometheus`"),
            // MLX uses Accelerate on macOS.
            Need::Openblas => None,
        }
    }

    /// Whether this machine already has it.
    fn present(self) -> bool {
        match self {
            Need::Cmake => on_path("cmake"),
            Need::Cxx => on_path("c++") || on_path("g++") || on_path("clang++"),
            Need::Libclang => libclang_present(),
            Need::Openblas => cfg!(target_os = "macos") || openblas_present(),
            Need::Pip => pip_works(),
            Need::Haproxy => find_program("haproxy").is_some(),
            Need::Prometheus => {
                find_program("prometheus").is_some() && find_program("promtool").is_some()
            }
        }
    }
}

/// Makes sure every need is met, installing what is missing when it can.
pub fn ensure(needs: &[Need]) -> anyhow::Result<()> {
    let missing: Vec<Need> = needs.iter().copied().filter(|n| !n.present()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if cfg!(target_os = "macos") {
        let hints: Vec<&str> = missing.iter().filter_map(|n| n.macos()).collect();
        bail!(
            "missing tools: install {}, then run this command again",
            hints.join(" and ")
        );
    }
    let mut packages: Vec<&str> = missing.iter().flat_map(|n| n.debian()).copied().collect();
    packages.dedup();
    let list = packages.join(" ");
    if !on_path("apt-get") {
        bail!(
            "missing system packages (Debian names: {list}): install them with this system's package manager, then run this command again"
        );
    }
    if !is_root() {
        bail!("missing system packages: run `sudo apt-get install -y {list}`, then this command again");
    }
    run_logged(
        "updating the package lists (apt-get update)",
        apt_get().args(["update", "-qq"]),
        &log_path("apt-get-update"),
    )?;
    run_logged(
        &format!("installing {list} (apt-get)"),
        apt_get().args(["install", "-y", "-qq"]).args(&packages),
        &log_path("apt-get-install"),
    )?;
    let still: Vec<Need> = missing.into_iter().filter(|n| !n.present()).collect();
    if !still.is_empty() {
        bail!("apt-get installed {list}, but these are still not found: {still:?}");
    }
    Ok(())
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// Whether `name` is an executable file in a `PATH` folder.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| is_executable(&dir.join(name))))
}

/// Where the executable `name` is: a `PATH` folder, else one of the `sbin`
/// folders, which a non-root user's `PATH` often lacks although Debian
/// installs daemons such as HAProxy there.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether this process may install system packages.
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// libclang where bindgen looks for it: `LIBCLANG_PATH`, else an LLVM
/// folder (`/usr/lib/llvm-N/lib`) that holds both `libclang.so*` and
/// clang's builtin headers, which bindgen also needs and which Debian ships
/// in a package of their own that `libclang-dev` pulls in.
fn libclang_present() -> bool {
    if cfg!(target_os = "macos") {
        return on_path("clang");
    }
    if let Some(dir) = std::env::var_os("LIBCLANG_PATH") {
        return has_file_starting(&PathBuf::from(dir), "libclang");
    }
    let entries = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten();
    entries
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("llvm-"))
        })
        .map(|path| path.join("lib"))
        .any(|lib| has_file_starting(&lib, "libclang.so") && has_builtin_headers(&lib))
}

/// Whether `<llvm>/lib/clang/<version>/include/stddef.h` exists.
fn has_builtin_headers(lib: &Path) -> bool {
    std::fs::read_dir(lib.join("clang"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|version| version.path().join("include").join("stddef.h").is_file())
}

/// The OpenBLAS file mlx-sys's build links, in the folders it searches.
fn openblas_present() -> bool {
    multiarch_dirs()
        .flat_map(|dir| {
            ["openblas-pthread", "openblas-openmp", "openblas-serial", ""]
                .map(|variant| dir.join(variant).join("libopenblas.so.0"))
        })
        .chain([
            PathBuf::from("/usr/lib64/libopenblas.so.0"),
            PathBuf::from("/usr/lib/libopenblas.so.0"),
        ])
        .any(|path| path.is_file())
}

/// `/usr/lib/<arch>-linux-gnu`.
fn multiarch_dirs() -> impl Iterator<Item = PathBuf> {
    [PathBuf::from("/usr/lib").join(format!("{}-linux-gnu", std::env::consts::ARCH))].into_iter()
}

fn has_file_starting(dir: &Path, prefix: &str) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| entry.file_name().to_string_lossy().starts_with(prefix))
}

/// Whether `python3 -m pip` runs (this spawns Python, so it is only asked
/// when something is about to be installed with pip).
fn pip_works() -> bool {
    Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|out| out.status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_on_path_is_found_and_a_made_up_one_is_not() {
        assert!(on_path("sh"));
        assert!(!on_path("no-such-command-for-xtask"));
    }

    #[test]
    fn a_program_is_found_on_path_and_a_made_up_one_is_not() {
        let sh = find_program("sh").expect("sh is on every Unix system");
        assert!(is_executable(&sh), "{}", sh.display());
        assert!(find_program("no-such-command-for-xtask").is_none());
    }

    #[test]
    fn every_need_names_a_debian_package_and_a_way_on_macos_where_needed() {
        for need in [BUILD.as_slice(), &DEPLOY, &[Need::Pip]].concat() {
            assert!(!need.debian().is_empty(), "{need:?}");
            assert_eq!(need.macos().is_none(), need == Need::Openblas, "{need:?}");
        }
    }
}
