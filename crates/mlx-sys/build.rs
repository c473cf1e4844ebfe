//! Links mlx-c and a prebuilt MLX and generates the Rust bindings.
//!
//! Nothing is downloaded or built with cmake here: `cargo xtask setup`
//! installs MLX (from the official wheel) and the mlx-c sources (from the
//! crates.io package `mlx-sys` 0.7.0) into the project-local `.mlx/` folder
//! and builds mlx-c there once, where its progress shows and every cargo
//! profile shares it. `MLX_DIR`, `MLX_C_DIR` and `MLX_C_LIB_DIR` point
//! elsewhere. Every failure ends in one `cargo::error` line that says what
//! to run, instead of pages of compiler output.

#[path = "build/bindings.rs"]
mod bindings;
#[path = "build/blas.rs"]
mod blas;
#[path = "build/locate.rs"]
mod locate;

use std::path::PathBuf;

/// A failure that ends the build with one clear message.
#[derive(Debug)]
pub struct BuildError(pub String);

impl<T: Into<String>> From<T> for BuildError {
    fn from(message: T) -> Self {
        Self(message.into())
    }
}

/// What cargo tells every build script, read once.
pub struct Env {
    /// Where generated files and the cmake build go.
    pub out_dir: PathBuf,
    /// This crate's folder.
    pub manifest_dir: PathBuf,
    /// The target's operating system (`linux`, `macos`, ...).
    pub target_os: String,
}

fn main() {
    if let Err(BuildError(message)) = run() {
        // One line per message line: cargo prints each `cargo::error` line.
        for line in message.lines() {
            println!("cargo::error={line}");
        }
    }
}

fn run() -> Result<(), BuildError> {
    let env = read_env()?;
    for var in [
        "MLX_DIR",
        "MLX_C_DIR",
        "MLX_C_LIB_DIR",
        "MLX_BATCH_NO_OPENBLAS",
        "LIBCLANG_PATH",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    for path in ["build.rs", "build", "include"] {
        println!("cargo::rerun-if-changed={path}");
    }

    let sources = locate::find(&env)?;
    let compat_header = env.manifest_dir.join("include").join("mlx_sys_compat.h");
    bindings::generate(&env, &sources, &compat_header)?;

    // The static mlx-c first: it needs libmlx, which comes after it.
    println!(
        "cargo::rustc-link-search=native={}",
        sources.mlx_c_lib_dir.display()
    );
    println!("cargo::rustc-link-lib=static=mlxc");
    println!(
        "cargo::rustc-link-search=native={}",
        sources.mlx_lib_dir.display()
    );
    println!("cargo::rustc-link-lib=dylib=mlx");
    let cxx_runtime = if env.target_os == "macos" || env.target_os == "ios" {
        "c++"
    } else {
        "stdc++"
    };
    println!("cargo::rustc-link-lib=dylib={cxx_runtime}");

    // Dependents read these as DEP_MLX_*. Link arguments such as an rpath
    // do not travel from a dependency to the final binary, and stable Rust
    // cannot mark a library `--no-as-needed` (which OpenBLAS needs, since no
    // Rust code calls it), so each crate that builds binaries adds both from
    // DEP_MLX_RPATH and DEP_MLX_OPENBLAS in its own build script.
    let openblas = blas::find_openblas(&env);
    let mut rpath = vec![sources.mlx_lib_dir.clone()];
    if let Some(openblas) = &openblas {
        rpath.push(openblas.dir.clone());
        println!("cargo::metadata=openblas={}", openblas.path.display());
    }
    let rpath = std::env::join_paths(&rpath)
        .map_err(|err| format!("mlx-sys: a library folder has an odd name: {err}"))?;
    println!("cargo::metadata=rpath={}", rpath.to_string_lossy());
    println!("cargo::metadata=lib_dir={}", sources.mlx_lib_dir.display());
    println!(
        "cargo::metadata=include_dir={}",
        sources.mlx_include_dir.display()
    );
    Ok(())
}

fn read_env() -> Result<Env, BuildError> {
    let var = |name: &str| {
        std::env::var(name).map_err(|_| BuildError(format!("mlx-sys: cargo did not set {name}")))
    };
    Ok(Env {
        out_dir: PathBuf::from(var("OUT_DIR")?),
        manifest_dir: PathBuf::from(var("CARGO_MANIFEST_DIR")?),
        target_os: var("CARGO_CFG_TARGET_OS")?,
    })
}
