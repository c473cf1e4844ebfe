//! What the integration tests share: finding the default model.

use std::path::PathBuf;

/// The default model's folder (`cargo xtask setup` puts it there), or
/// `None` with a message when it is absent. With
/// `MLX_BATCH_REQUIRE_REFERENCES` set (CI), an absent model fails the test
/// instead of skipping it.
pub fn default_model_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.models/SmolLM2-135M-Instruct");
    if dir.join("tokenizer.json").is_file() {
        Some(dir)
    } else {
        eprintln!("SKIPPED: the default model is absent; run `cargo xtask setup`");
        assert!(
            std::env::var_os("MLX_BATCH_REQUIRE_REFERENCES").is_none(),
            "MLX_BATCH_REQUIRE_REFERENCES is set, so this may not be skipped"
        );
        None
    }
}
