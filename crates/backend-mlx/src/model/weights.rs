//! Reading `*.safetensors` into typed, shape-checked layers.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use mlx_rs::{ops, Array, Dtype};

use super::{
    config::{ModelConfig, QuantSpec},
    linear::{Embedding, Linear},
};
use crate::error::BackendError;

/// What dtype the weights end up in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelDType {
    /// 32-bit floats; quantized weights are dequantized at load. The only
    /// batched fast path on MLX's CPU backend (OpenBLAS).
    F32,
    /// 16-bit floats; quantized weights are dequantized at load.
    F16,
    /// bfloat16; quantized weights are dequantized at load.
    BF16,
    /// As stored: quantized layers stay quantized, float ones keep their
    /// dtype. The natural choice on a GPU.
    Native,
}

impl ModelDType {
    fn float(self) -> Option<Dtype> {
        match self {
            ModelDType::F32 => Some(Dtype::Float32),
            ModelDType::F16 => Some(Dtype::Float16),
            ModelDType::BF16 => Some(Dtype::Bfloat16),
            ModelDType::Native => None,
        }
    }
}

impl std::str::FromStr for ModelDType {
    type Err = BackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            "native" | "auto-native" | "quantized" => Ok(Self::Native),
            other => Err(BackendError::UnknownDType(other.to_owned())),
        }
    }
}

/// Every tensor of a model folder, with the file it came from.
pub(crate) struct WeightStore {
    tensors: HashMap<String, (Array, usize)>,
    files: Vec<PathBuf>,
    dir: PathBuf,
    dtype: ModelDType,
    /// The dtype floats are cast to; for `Native`, a placeholder (the model
    /// derives its activation dtype from the weights it got).
    pub(crate) compute_dtype: Dtype,
}

impl WeightStore {
    /// Loads every `*.safetensors` file of `dir`.
    pub(crate) fn open(dir: &Path, dtype: ModelDType) -> Result<Self, BackendError> {
        let entries = std::fs::read_dir(dir).map_err(|source| BackendError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(BackendError::Weights {
                file: dir.to_path_buf(),
                tensor: "*".into(),
                message: "no *.safetensors file in the model folder".into(),
            });
        }
        let mut tensors = HashMap::new();
        for (i, file) in files.iter().enumerate() {
            let loaded = Array::load_safetensors(file).map_err(|e| BackendError::Weights {
                file: file.clone(),
                tensor: "*".into(),
                message: format!("cannot read the file: {e}"),
            })?;
            // Loading is lazy; reading now ties a truncated or unreadable
            // data section to its file instead of failing mid-build.
            mlx_rs::transforms::eval(loaded.values()).map_err(|e| BackendError::Weights {
                file: file.clone(),
                tensor: "*".into(),
                message: format!("cannot read the tensor data: {e}"),
            })?;
            for (name, array) in loaded {
                tensors.insert(name, (array, i));
            }
        }
        let compute_dtype = dtype.float().unwrap_or(Dtype::Float32);
        Ok(Self {
            tensors,
            files,
            dir: dir.to_path_buf(),
            dtype,
            compute_dtype,
        })
    }

    fn file_of(&self, name: &str) -> PathBuf {
        match self.tensors.get(name) {
            Some((_, i)) => self.files[*i].clone(),
            None => self.dir.clone(),
        }
    }

    fn error(&self, name: &str, message: impl Into<String>) -> BackendError {
        BackendError::Weights {
            file: self.file_of(name),
            tensor: name.to_owned(),
            message: message.into(),
        }
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn raw(&self, name: &str) -> Result<Array, BackendError> {
        self.tensors
            .get(name)
            .map(|(a, _)| a.clone())
            .ok_or_else(|| self.error(name, "missing from the model's safetensors files"))
    }

    fn check_shape(&self, name: &str, array: &Array, expected: &[i32]) -> Result<(), BackendError> {
        if array.shape() != expected {
            return Err(self.error(
                name,
                format!("shape {:?}, expected {:?}", array.shape(), expected),
            ));
        }
        Ok(())
    }

    /// A float tensor of the given shape, cast to the compute dtype.
    pub(crate) fn float(&self, name: &str, shape: &[i32]) -> Result<Array, BackendError> {
        let array = self.raw(name)?;
        self.check_shape(name, &array, shape)?;
        if !array.dtype().is_float() {
            return Err(self.error(name, format!("dtype {:?} is not a float", array.dtype())));
        }
        self.cast(name, array)
    }

    /// Casts to the requested float dtype; `Native` keeps every tensor as
    /// stored and lets MLX's type promotion decide, exactly as mlx-lm does.
    fn cast(&self, name: &str, array: Array) -> Result<Array, BackendError> {
        if self.dtype == ModelDType::Native || array.dtype() == self.compute_dtype {
            return Ok(array);
        }
        array
            .as_dtype(self.compute_dtype)
            .map_err(|e| self.error(name, e.to_string()))
    }

    /// The linear layer `module` (`module.weight`, maybe `module.scales`,
    /// `module.biases`, `module.bias`) mapping `inputs` to `outputs`.
    pub(crate) fn linear(
        &self,
        config: &ModelConfig,
        module: &str,
        inputs: i32,
        outputs: i32,
        with_bias: bool,
    ) -> Result<Linear, BackendError> {
        let weight_name = format!("{module}.weight");
        let bias = if with_bias {
            Some(self.float(&format!("{module}.bias"), &[outputs])?)
        } else {
            None
        };
        let scales_name = format!("{module}.scales");
        if !self.contains(&scales_name) {
            let weight = self.float(&weight_name, &[outputs, inputs])?;
            return Ok(Linear::Dense { weight, bias });
        }
        let spec = config.quantization_for(module).ok_or_else(|| {
            self.error(
                &scales_name,
                "the layer is quantized but config.json has no `quantization` entry for it",
            )
        })?;
        self.quantized(module, spec, inputs, outputs, bias)
    }

    fn quantized(
        &self,
        module: &str,
        spec: QuantSpec,
        inputs: i32,
        outputs: i32,
        bias: Option<Array>,
    ) -> Result<Linear, BackendError> {
        let weight_name = format!("{module}.weight");
        let scales_name = format!("{module}.scales");
        let biases_name = format!("{module}.biases");
        if inputs % spec.group_size != 0 || (inputs * spec.bits) % 32 != 0 {
            return Err(self.error(
                &weight_name,
                format!(
                    "{inputs} inputs do not split into groups of {} at {} bits",
                    spec.group_size, spec.bits
                ),
            ));
        }
        let weight = self.raw(&weight_name)?;
        self.check_shape(&weight_name, &weight, &[outputs, inputs * spec.bits / 32])?;
        if weight.dtype() != Dtype::Uint32 {
            return Err(self.error(
                &weight_name,
                format!("dtype {:?}, expected packed uint32", weight.dtype()),
            ));
        }
        let groups = inputs / spec.group_size;
        let scales = self.raw(&scales_name)?;
        self.check_shape(&scales_name, &scales, &[outputs, groups])?;
        let biases = self.raw(&biases_name)?;
        self.check_shape(&biases_name, &biases, &[outputs, groups])?;
        match self.dtype.float() {
            // Dequantize once at load: on a CPU only f32 matmul batches.
            Some(dtype) => {
                // Dequantize in f32, as MLX's quantized kernels compute,
                // and only then round to the target dtype.
                let f32_of = |a: &Array| a.as_dtype(Dtype::Float32);
                let dense = f32_of(&scales)
                    .and_then(|s| Ok((s, f32_of(&biases)?)))
                    .and_then(|(s, b)| ops::dequantize(&weight, &s, &b, spec.group_size, spec.bits))
                    .and_then(|w| w.as_dtype(dtype))
                    .map_err(|e| self.error(&weight_name, e.to_string()))?;
                Ok(Linear::Dense {
                    weight: dense,
                    bias,
                })
            }
            None => Ok(Linear::Quantized {
                weight,
                scales: self.cast(&scales_name, scales)?,
                biases: self.cast(&biases_name, biases)?,
                bias,
                spec,
            }),
        }
    }

    /// The token embedding `[vocab, hidden]`.
    pub(crate) fn embedding(
        &self,
        config: &ModelConfig,
        module: &str,
    ) -> Result<Embedding, BackendError> {
        let table = self.linear(
            config,
            module,
            config.hidden_size as i32,
            config.vocab_size as i32,
            false,
        )?;
        Ok(Embedding { table })
    }
}
