//! Parses a whole GGUF file held in memory.
//!
//! Every count read from the file is bounded by the bytes that are left
//! before anything is allocated for it, and every tensor's byte range is
//! checked against the file size here, once, so that later stages can
//! slice tensor data without further checks.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use super::cursor::{Cursor, Fault};
use super::{GgmlType, MetaValue};
use crate::ImportError;

/// The alignment of the tensor data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml tensors have at most this many dimensions.
const MAX_DIMS: u32 = 4;

/// In-memory items are larger than their encoding, so vectors start no
/// larger than this and grow only as real items are read.
const INITIAL_CAPACITY: usize = 1 << 16;

/// Arrays of arrays are allowed, but not arbitrarily deep: the limit keeps a
/// hostile file from exhausting the stack.
const MAX_ARRAY_DEPTH: u32 = 3;

/// One tensor's description from the tensor info table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The GGUF tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions as GGUF lists them: fastest-varying first (`dims[0]` is
    /// the row length).
    pub dims: Vec<u64>,
    /// How the values are stored.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// The shape in row-major order (slowest-varying first), as Hugging Face
    /// and MLX write it.
    pub fn row_major_shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A parsed GGUF file: metadata, tensor descriptions and the raw bytes.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    bytes: Vec<u8>,
    /// The GGUF format version (2 or 3).
    pub version: u32,
    /// The metadata key/value table.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensor descriptions in file order.
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

impl GgufFile {
    /// Reads and parses the file at `path`.
    pub fn open(path: &Path) -> Result<Self, ImportError> {
        let bytes = std::fs::read(path).map_err(|e| ImportError::io(path, e))?;
        Self::parse(path, bytes)
    }

    /// Parses `bytes`; `path` is only used to name the file in errors.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self, ImportError> {
        let malformed = |f: Fault| ImportError::Malformed {
            path: path.to_path_buf(),
            offset: f.offset,
            reason: f.reason,
        };
        let mut cur = Cursor::new(&bytes);
        let magic = cur.take(4).map_err(malformed)?;
        if magic != b"GGUF" {
            return Err(ImportError::Malformed {
                path: path.to_path_buf(),
                offset: 0,
                reason: format!("bad magic {magic:02x?}, expected \"GGUF\""),
            });
        }
        let version = cur.u32().map_err(malformed)?;
        if !(2..=3).contains(&version) {
            return Err(ImportError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
            });
        }
        // The smallest tensor info is an empty name, no dims, a type and an
        // offset (8 + 4 + 4 + 8 bytes); the smallest key/value pair is an
        // empty key, a type and a one-byte value (8 + 4 + 1 bytes).
        let n_tensors = cur.count("tensor", 24).map_err(malformed)?;
        let n_kv = cur.count("metadata", 13).map_err(malformed)?;

        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let at = cur.pos();
            let key = cur.string().map_err(malformed)?;
            let ty = cur.u32().map_err(malformed)?;
            let value = read_value(&mut cur, ty, 0)
                .map_err(|f| malformed(prefix(f, &format!("metadata `{key}`"))))?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(malformed(Fault {
                    offset: at as u64,
                    reason: format!("duplicate metadata key `{key}`"),
                }));
            }
        }

        let mut raw = Vec::with_capacity(n_tensors.min(INITIAL_CAPACITY));
        let mut names = HashSet::with_capacity(n_tensors.min(INITIAL_CAPACITY));
        for i in 0..n_tensors {
            let at = cur.pos();
            let name = cur.string().map_err(malformed)?;
            let what = format!("tensor info {i} (`{name}`)");
            let n_dims = cur.u32().map_err(malformed)?;
            if n_dims > MAX_DIMS {
                return Err(malformed(prefix(
                    cur.fault(format!("{n_dims} dimensions (at most {MAX_DIMS})")),
                    &what,
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(cur.u64().map_err(|f| malformed(prefix(f, &what)))?);
            }
            let ty = cur.u32().map_err(|f| malformed(prefix(f, &what)))?;
            let offset = cur.u64().map_err(|f| malformed(prefix(f, &what)))?;
            if !names.insert(name.clone()) {
                return Err(malformed(Fault {
                    offset: at as u64,
                    reason: format!("duplicate tensor name `{name}`"),
                }));
            }
            raw.push((name, dims, GgmlType::from_id(ty), offset));
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(ImportError::BadMetadata {
                        path: path.to_path_buf(),
                        key: "general.alignment".to_owned(),
                        reason: format!("{v:?} is not a power of two up to 1 MiB"),
                    })
                }
            },
        };
        let data_offset = (cur.pos() as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;

        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ggml_type, offset) in raw {
            let bad = |reason: String| ImportError::BadTensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                reason,
            };
            let Some((block_values, block_bytes)) = ggml_type.block_layout() else {
                return Err(ImportError::UnsupportedTensorType {
                    path: path.to_path_buf(),
                    tensor: name,
                    ggml_type: ggml_type.id(),
                });
            };
            let row = dims.first().copied().unwrap_or(1);
            if !row.is_multiple_of(block_values) {
                return Err(bad(format!(
                    "row length {row} is not a multiple of the block size {block_values}"
                )));
            }
            let n_bytes = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .and_then(|n| (n / block_values).checked_mul(block_bytes))
                .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
            if !offset.is_multiple_of(alignment) {
                return Err(bad(format!(
                    "data offset {offset} is not aligned to {alignment}"
                )));
            }
            let end = data_offset
                .checked_add(offset)
                .and_then(|s| s.checked_add(n_bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(bad(format!(
                        "data ({n_bytes} bytes at data offset {offset}) runs past the end of the file ({file_len} bytes); the file is truncated or corrupt"
                    )))
                }
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                n_bytes,
            });
        }

        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            version,
            metadata,
            tensors,
            data_offset,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor description named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor described by this file.
    pub fn tensor_data(&self, info: &TensorInfo) -> Result<&[u8], ImportError> {
        // The range was checked in `parse`; the checked slice still guards
        // against a `TensorInfo` that came from elsewhere.
        let start = self.data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(info.n_bytes));
        start
            .zip(end)
            .and_then(|(s, e)| {
                self.bytes
                    .get(usize::try_from(s).ok()?..usize::try_from(e).ok()?)
            })
            .ok_or_else(|| ImportError::BadTensor {
                path: self.path.clone(),
                tensor: info.name.clone(),
                reason: "data lies outside the file".to_owned(),
            })
    }
}

fn prefix(f: Fault, what: &str) -> Fault {
    Fault {
        offset: f.offset,
        reason: format!("{what}: {}", f.reason),
    }
}

/// The fewest bytes a value of type `ty` occupies, used to bound array counts.
fn min_size(ty: u32) -> usize {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

fn read_value(cur: &mut Cursor<'_>, ty: u32, depth: u32) -> Result<MetaValue, Fault> {
    Ok(match ty {
        0 => MetaValue::U8(cur.u8()?),
        1 => MetaValue::I8(i8::from_le_bytes([cur.u8()?])),
        2 => MetaValue::U16(cur.u16()?),
        3 => MetaValue::I16(i16::from_le_bytes(cur.u16()?.to_le_bytes())),
        4 => MetaValue::U32(cur.u32()?),
        5 => MetaValue::I32(i32::from_le_bytes(cur.u32()?.to_le_bytes())),
        6 => MetaValue::F32(cur.f32()?),
        7 => match cur.u8()? {
            0 => MetaValue::Bool(false),
            1 => MetaValue::Bool(true),
            b => return Err(cur.fault(format!("bool byte {b} is neither 0 nor 1"))),
        },
        8 => MetaValue::String(cur.string()?),
        9 => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(cur.fault("arrays nested too deeply"));
            }
            let elem = cur.u32()?;
            if elem > 12 {
                return Err(cur.fault(format!("unknown array element type {elem}")));
            }
            let n = cur.count("array", min_size(elem))?;
            let mut items = Vec::with_capacity(n.min(INITIAL_CAPACITY));
            for _ in 0..n {
                items.push(read_value(cur, elem, depth + 1)?);
            }
            MetaValue::Array(items)
        }
        10 => MetaValue::U64(cur.u64()?),
        11 => MetaValue::I64(i64::from_le_bytes(cur.u64()?.to_le_bytes())),
        12 => MetaValue::F64(cur.f64()?),
        other => return Err(cur.fault(format!("unknown metadata value type {other}"))),
    })
}
