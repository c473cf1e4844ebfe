//! `mlx-batch import-gguf FILE OUT_DIR`.

use anyhow::Context;
use gguf_import::{import_gguf, ImportConfig};

use crate::cli::ImportArgs;

/// Converts the GGUF file and prints what was written.
pub fn run(args: &ImportArgs) -> anyhow::Result<()> {
    let report = import_gguf(&ImportConfig {
        gguf: args.file.clone(),
        out_dir: args.out_dir.clone(),
        ..ImportConfig::default()
    })
    .with_context(|| format!("importing {}", args.file.display()))?;
    println!(
        "imported {} into {}: {} quantized modules, {} dense tensors, {} bytes of weights",
        args.file.display(),
        report.out_dir.display(),
        report.quantized_modules,
        report.dense_tensors,
        report.weights_bytes
    );
    Ok(())
}
