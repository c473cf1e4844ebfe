//! Links the `mlx-batch` binary and this crate's tests the way `mlx-sys`
//! asks through its `DEP_MLX_*` metadata: link arguments of a dependency
//! never reach a final binary, so every crate that builds binaries over MLX
//! repeats these lines (the same as `backend-mlx`'s build script).
//!
//! - an rpath to libmlx (and OpenBLAS), so the binary runs with no
//!   environment variables set;
//! - on Linux, OpenBLAS as a direct dependency (`--no-as-needed`, since no
//!   Rust code calls it), so that libmlx's BLAS calls resolve to it instead
//!   of the wheel's slow reference BLAS;
//! - `cblas_sgemm` kept and exported, so that libmlx's matmuls go through
//!   backend-mlx's router of single-row products (its `blas` module).

fn main() {
    if let Some(paths) = std::env::var_os("DEP_MLX_RPATH") {
        for dir in std::env::split_paths(&paths) {
            println!("cargo::rustc-link-arg=-Wl,-rpath,{}", dir.display());
        }
    }
    if let Ok(openblas) = std::env::var("DEP_MLX_OPENBLAS") {
        println!("cargo::rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo::rustc-link-arg={openblas}");
        println!("cargo::rustc-link-arg=-Wl,--as-needed");
        // backend-mlx's own `cblas_sgemm` (see its `blas` module), kept and
        // exported so that libmlx binds to it ahead of OpenBLAS's.
        println!("cargo::rustc-link-arg=-Wl,--undefined=cblas_sgemm");
        println!("cargo::rustc-link-arg=-Wl,--export-dynamic-symbol=cblas_sgemm");
    }
}
