//! The ggml tensor types this importer understands.

/// A ggml tensor storage type, with the block layout needed to size it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit IEEE floats.
    F32,
    /// 16-bit IEEE floats.
    F16,
    /// Blocks of 32 values: f16 scale `d`, 16 bytes of nibbles; `w = d * (q - 8)`.
    Q4_0,
    /// Blocks of 32 values: f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles; `w = d * q + m`.
    Q4_1,
    /// Blocks of 32 values: f16 scale `d`, 32 signed bytes; `w = d * q`.
    Q8_0,
    /// Any other type id; kept so that the error can name it.
    Other(u32),
}

impl GgmlType {
    /// Maps ggml's numeric type id.
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            other => Self::Other(other),
        }
    }

    /// ggml's numeric type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::Other(id) => id,
        }
    }

    /// Values per block and bytes per block, or `None` for an unknown type.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        match self {
            Self::F32 => Some((1, 4)),
            Self::F16 => Some((1, 2)),
            Self::Q4_0 => Some((32, 18)),
            Self::Q4_1 => Some((32, 20)),
            Self::Q8_0 => Some((32, 34)),
            Self::Other(_) => None,
        }
    }
}
