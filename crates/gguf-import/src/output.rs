//! Writing the output folder: safetensors weights and JSON files.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype as StDtype, TensorView};
use serde_json::Value;

use crate::tensor::{Dtype, RawTensor};
use crate::ImportError;

/// Writes `tensors` as one safetensors file with mlx-lm's `format` tag.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, RawTensor>,
) -> Result<(), ImportError> {
    let fail = |reason: String| ImportError::Output {
        path: path.to_path_buf(),
        reason,
    };
    let views = tensors
        .iter()
        .map(|(name, t)| {
            let dtype = match t.dtype {
                Dtype::U32 => StDtype::U32,
                Dtype::F16 => StDtype::F16,
                Dtype::F32 => StDtype::F32,
            };
            TensorView::new(dtype, t.shape.clone(), &t.data)
                .map(|v| (name.as_str(), v))
                .map_err(|e| fail(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = HashMap::from([("format".to_owned(), "mlx".to_owned())]);
    safetensors::tensor::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| fail(e.to_string()))
}

/// Writes `value` as pretty-printed JSON.
pub fn write_json(path: &Path, value: &Value) -> Result<(), ImportError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ImportError::Output {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    std::fs::write(path, text + "\n").map_err(|e| ImportError::io(path, e))
}
