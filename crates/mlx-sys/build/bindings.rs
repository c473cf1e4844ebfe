//! Generates the Rust bindings for every mlx-c header.
//!
//! The settings reproduce upstream mlx-sys 0.7.0's, so that `mlx-rs` 0.33.0
//! finds every item it uses under the same name and type.

use std::{ffi::OsStr, fs, path::Path};

use crate::{locate::Sources, BuildError, Env};

/// Writes `$OUT_DIR/bindings.rs`.
pub fn generate(env: &Env, sources: &Sources, compat_header: &Path) -> Result<(), BuildError> {
    let header_dir = sources.mlx_c_dir.join("mlx").join("c");
    let mut headers: Vec<_> = fs::read_dir(&header_dir)
        .map_err(|err| format!("mlx-sys: cannot list {}: {err}", header_dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension() == Some(OsStr::new("h")))
        .collect();
    headers.sort();

    let rust_target = "1.73.0"
        .parse()
        .map_err(|err| format!("mlx-sys: bad bindgen rust target: {err}"))?;
    let builder = headers.iter().fold(
        bindgen::Builder::default()
            .rust_target(rust_target)
            .clang_arg(format!("-I{}", sources.mlx_c_dir.display()))
            .clang_arg("-DMLX_SYS_BINDGEN")
            .clang_arg("-include")
            .clang_arg(compat_header.display().to_string())
            // Their `c_ulong` sizes trip rustc's
            // suspicious_runtime_symbol_definitions lint, as upstream notes.
            .blocklist_function("malloc")
            .blocklist_function("realloc"),
        |builder, header| builder.header(header.display().to_string()),
    );

    // bindgen panics (instead of returning an error) when libclang cannot be
    // loaded; turn that into the one-line message this build promises.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    // `AssertUnwindSafe`: nothing of the builder is used after a panic.
    let generated =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || builder.generate()));
    std::panic::set_hook(previous_hook);
    let bindings = match generated {
        Ok(Ok(bindings)) => bindings,
        Ok(Err(err)) => {
            return Err(BuildError(format!(
                "mlx-sys: bindgen failed on the mlx-c headers: {err}"
            )))
        }
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            let first_line = detail.lines().next().unwrap_or_default();
            return Err(BuildError(format!(
                "libclang not found: install it (Debian: `apt-get install libclang-dev`) or set LIBCLANG_PATH ({first_line})"
            )));
        }
    };
    let out = env.out_dir.join("bindings.rs");
    bindings
        .write_to_file(&out)
        .map_err(|err| format!("mlx-sys: cannot write {}: {err}", out.display()))?;
    Ok(())
}
