//! Raw bindings to mlx-c, MLX's C API, for `mlx-rs`.
//!
//! This crate replaces the crates.io `mlx-sys` 0.7.0 through
//! `[patch.crates-io]`, under the same name, version and `links` key, so that
//! `mlx-rs` 0.33.0 builds unmodified. Its main design decision: **link a
//! prebuilt MLX instead of compiling it.** Upstream's build script compiles
//! MLX from a GitHub checkout and links Apple frameworks, which cannot work
//! on Linux; here `cargo xtask setup` installs the official MLX wheel
//! (`mlx-cpu`, `mlx-cuda-13` or `mlx-metal`, version 0.32.2, hash-checked)
//! into the project-local `.mlx/` folder, and the build script compiles only
//! the thin mlx-c layer against it, links `libmlx` dynamically and runs
//! bindgen with upstream's settings.
//!
//! On Linux the build script also finds Debian's OpenBLAS (unless
//! `MLX_BATCH_NO_OPENBLAS=1` at build time) for dependents to link ahead of
//! the wheel's bundled reference BLAS, which is about 30x slower for f32
//! matmul.
//!
//! # For crates that build binaries
//!
//! Link arguments do not travel from a dependency to the final binary, so a
//! crate whose tests, benches or binaries use MLX depends on `mlx-sys`
//! directly (which gives its build script the `DEP_MLX_*` variables) and
//! has this `build.rs`:
//!
//! ```ignore
//! fn main() {
//!     // The folders of libmlx (and OpenBLAS): run with no LD_LIBRARY_PATH.
//!     if let Some(paths) = std::env::var_os("DEP_MLX_RPATH") {
//!         for dir in std::env::split_paths(&paths) {
//!             println!("cargo::rustc-link-arg=-Wl,-rpath,{}", dir.display());
//!         }
//!     }
//!     // Linux only: OpenBLAS as a direct dependency, so that libmlx's BLAS
//!     // calls resolve to it rather than to the wheel's reference BLAS.
//!     if let Ok(openblas) = std::env::var("DEP_MLX_OPENBLAS") {
//!         println!("cargo::rustc-link-arg=-Wl,--no-as-needed");
//!         println!("cargo::rustc-link-arg={openblas}");
//!         println!("cargo::rustc-link-arg=-Wl,--as-needed");
//!     }
//! }
//! ```
//!
//! The metadata also has `DEP_MLX_LIB_DIR` and `DEP_MLX_INCLUDE_DIR`.
//!
//! macOS takes the same path with the `mlx-metal` wheel; it is not tested in
//! CI.

#[allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    missing_docs,
    unsafe_op_in_unsafe_fn,
    improper_ctypes,
    rust_2018_idioms,
    clippy::all,
    rustdoc::all
)]
mod bindings {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}

pub use bindings::*;

#[cfg(not(target_vendor = "apple"))]
mod mach_shim;
