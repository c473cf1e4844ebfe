//! The default model for the tests that run it, and the one way those
//! tests skip when a reference is missing.

#![allow(dead_code)]

use std::path::PathBuf;

/// The default model's folder, or `None` (after saying why) when it is
/// missing and references are not required.
pub fn model_or_skip() -> Option<PathBuf> {
    let model = server::cli::default_model_dir();
    if model.join("config.json").is_file() {
        return Some(model);
    }
    skip(&format!(
        "no default model at {} (run `cargo xtask setup`)",
        model.display()
    ));
    None
}

/// Says why a test is skipped. With `MLX_BATCH_REQUIRE_REFERENCES` set
/// (CI) a missing reference fails the test instead.
pub fn skip(why: &str) {
    eprintln!("skipping: {why}");
    assert!(
        std::env::var_os("MLX_BATCH_REQUIRE_REFERENCES").is_none(),
        "MLX_BATCH_REQUIRE_REFERENCES is set, so this may not be skipped"
    );
}
