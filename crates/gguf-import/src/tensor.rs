//! Output tensors: raw little-endian bytes with a dtype and a row-major shape.

/// The element types the importer writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// Packed quantized values (MLX's `uint32` weight format).
    U32,
    /// Half-precision floats.
    F16,
    /// Single-precision floats.
    F32,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::U32 | Self::F32 => 4,
            Self::F16 => 2,
        }
    }
}

/// A tensor ready to be written to safetensors.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Element type of `data`.
    pub dtype: Dtype,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Little-endian element bytes, `shape.product() * dtype.size()` long.
    pub data: Vec<u8>,
}

impl RawTensor {
    /// Number of rows when viewed as a matrix `[rows, last_dim]`.
    pub fn rows(&self) -> usize {
        self.shape
            .split_last()
            .map(|(_, outer)| outer.iter().product())
            .unwrap_or(1)
    }
}
