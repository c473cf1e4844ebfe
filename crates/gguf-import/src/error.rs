//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while importing a GGUF file.
///
/// Every variant names the file it concerns, and those about a single tensor
/// also name the tensor, so that a user who points the importer at the wrong
/// or a damaged file learns which file and which part of it is at fault.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file that could not be read or written.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a well-formed GGUF file (bad magic, truncated,
    /// counts that cannot fit in the file, invalid UTF-8, ...).
    #[error("{path}: malformed GGUF at byte {offset}: {reason}")]
    Malformed {
        /// The GGUF file.
        path: PathBuf,
        /// Where in the file the problem was noticed.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// The GGUF version is one this importer does not read.
    #[error("{path}: unsupported GGUF version {version} (2 and 3 are supported)")]
    UnsupportedVersion {
        /// The GGUF file.
        path: PathBuf,
        /// The version found in the header.
        version: u32,
    },
    /// `general.architecture` names a model family this importer cannot map.
    #[error("{path}: unsupported architecture `{architecture}` (only `llama` is supported)")]
    UnknownArchitecture {
        /// The GGUF file.
        path: PathBuf,
        /// The architecture found in the metadata.
        architecture: String,
    },
    /// A metadata key the import needs is absent.
    #[error("{path}: missing metadata key `{key}`")]
    MissingMetadata {
        /// The GGUF file.
        path: PathBuf,
        /// The key that is missing.
        key: String,
    },
    /// A metadata key has the wrong type or an unusable value.
    #[error("{path}: bad metadata `{key}`: {reason}")]
    BadMetadata {
        /// The GGUF file.
        path: PathBuf,
        /// The offending key.
        key: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A tensor the model needs is absent.
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor {
        /// The GGUF file.
        path: PathBuf,
        /// The GGUF name of the missing tensor.
        tensor: String,
    },
    /// A tensor whose name has no Hugging Face counterpart.
    #[error("{path}: unexpected tensor `{tensor}` (no Hugging Face name for it)")]
    UnknownTensor {
        /// The GGUF file.
        path: PathBuf,
        /// The GGUF name of the tensor.
        tensor: String,
    },
    /// A tensor's shape disagrees with the hyperparameters.
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?} (row-major)")]
    ShapeMismatch {
        /// The GGUF file.
        path: PathBuf,
        /// The GGUF name of the tensor.
        tensor: String,
        /// The shape the metadata implies.
        expected: Vec<u64>,
        /// The shape found in the file.
        found: Vec<u64>,
    },
    /// A tensor is stored in a ggml type this importer does not convert.
    #[error("{path}: tensor `{tensor}` has unsupported ggml type {ggml_type}")]
    UnsupportedTensorType {
        /// The GGUF file.
        path: PathBuf,
        /// The GGUF name of the tensor.
        tensor: String,
        /// The numeric ggml type id.
        ggml_type: u32,
    },
    /// A tensor's description is inconsistent (data outside the file,
    /// misaligned, a row length that is not a whole number of blocks, ...).
    #[error("{path}: tensor `{tensor}`: {reason}")]
    BadTensor {
        /// The GGUF file.
        path: PathBuf,
        /// The GGUF name of the tensor.
        tensor: String,
        /// What was wrong.
        reason: String,
    },
    /// The tokenizer in the metadata cannot be turned into a `tokenizer.json`.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer {
        /// The GGUF file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// Writing an output file failed in a way that is not plain I/O.
    #[error("{path}: could not write output: {reason}")]
    Output {
        /// The output file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl ImportError {
    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
