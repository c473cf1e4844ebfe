//! ggml block formats to MLX's affine quantization, without float round
//! trips.
//!
//! MLX stores a quantized matrix as `weight` (uint32 words, `32 / bits`
//! values each, the first value in the lowest bits), and per group of
//! `group_size` values along a row a `scale` and a `bias`, with
//! `w = scale * q + bias`. The ggml formats map onto that with group size 32:
//!
//! * Q4_1 (`d * q + m`): 4 bits, scale `d`, bias `m`: always exact.
//! * Q4_0 (`d * (q - 8)`): 4 bits, scale `d`, bias `-8 d`.
//! * Q8_0 (`d * q`, `q` signed): 8 bits, `q' = q + 128`, scale `d`, bias `-128 d`.
//!
//! The biases of Q4_0 and Q8_0 are products of an f16 and a power of two,
//! exact unless they overflow f16; that is checked for every block, and a
//! tensor with any inexact block is dequantized instead (to f16 if every
//! value is exactly representable there, else to f32).

use half::f16;

use crate::gguf::GgmlType;
use crate::tensor::{Dtype, RawTensor};

/// Values per quantization group in every supported ggml block format.
pub const GROUP_SIZE: usize = 32;

/// A converted tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Converted {
    /// MLX affine quantization: `weight`, `scales`, `biases`.
    Quantized {
        /// Packed values, shape `[.., cols * bits / 32]`.
        weight: RawTensor,
        /// f16 scales, shape `[.., cols / group_size]`.
        scales: RawTensor,
        /// f16 biases, shape `[.., cols / group_size]`.
        biases: RawTensor,
        /// Bits per value (4 or 8).
        bits: u32,
        /// Values per group.
        group_size: u32,
    },
    /// A plain float tensor.
    Dense {
        /// The values.
        tensor: RawTensor,
        /// Set when the source was quantized but had to be dequantized.
        dequantized_from: Option<GgmlType>,
    },
}

/// Why a tensor could not be converted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertFault(pub String);

/// Converts one tensor's bytes. `shape` is row-major; its last entry is the
/// row length. With `keep_quantized` false every quantized tensor is
/// dequantized.
pub fn convert(
    ty: GgmlType,
    data: &[u8],
    shape: &[usize],
    keep_quantized: bool,
) -> Result<Converted, ConvertFault> {
    let n: usize = shape.iter().product();
    let cols = shape.last().copied().unwrap_or(1);
    let (block_values, block_bytes) = ty
        .block_layout()
        .ok_or_else(|| ConvertFault(format!("unsupported ggml type {}", ty.id())))?;
    let block_values = block_values as usize;
    if !cols.is_multiple_of(block_values) || data.len() != n / block_values * block_bytes as usize {
        return Err(ConvertFault(format!(
            "{} bytes do not hold a {shape:?} tensor of type {ty:?}",
            data.len()
        )));
    }
    let dense = |dtype| Converted::Dense {
        tensor: RawTensor {
            dtype,
            shape: shape.to_vec(),
            data: data.to_vec(),
        },
        dequantized_from: None,
    };
    match ty {
        GgmlType::F32 => return Ok(dense(Dtype::F32)),
        GgmlType::F16 => return Ok(dense(Dtype::F16)),
        _ => {}
    }
    // One-dimensional tensors (norms) are never quantized modules in MLX.
    if keep_quantized && shape.len() >= 2 {
        if let Some(q) = to_affine(ty, data, shape) {
            return Ok(q);
        }
    }
    let values = dequantize(ty, data)?;
    Ok(Converted::Dense {
        tensor: dense_from_f32(&values, shape),
        dequantized_from: Some(ty),
    })
}

/// Dequantizes with llama.cpp's formulas, in f32.
pub fn dequantize(ty: GgmlType, data: &[u8]) -> Result<Vec<f32>, ConvertFault> {
    let mut out = Vec::new();
    match ty {
        GgmlType::F32 => out.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(data.chunks_exact(2).map(|c| half_at(c, 0))),
        GgmlType::Q4_0 => {
            for b in data.chunks_exact(18) {
                let d = half_at(b, 0);
                out.extend(nibbles(&b[2..18]).map(|q| d * (f32::from(q) - 8.0)));
            }
        }
        GgmlType::Q4_1 => {
            for b in data.chunks_exact(20) {
                let (d, m) = (half_at(b, 0), half_at(b, 2));
                out.extend(nibbles(&b[4..20]).map(|q| d * f32::from(q) + m));
            }
        }
        GgmlType::Q8_0 => {
            for b in data.chunks_exact(34) {
                let d = half_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| d * f32::from(q as i8)));
            }
        }
        GgmlType::Other(id) => return Err(ConvertFault(format!("unsupported ggml type {id}"))),
    }
    Ok(out)
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 32 values of a 4-bit ggml block in order: the low nibbles of the 16
/// bytes are values 0..16, the high nibbles values 16..32.
fn nibbles(qs: &[u8]) -> impl Iterator<Item = u8> + '_ {
    qs.iter().map(|b| b & 0x0f).chain(qs.iter().map(|b| b >> 4))
}

/// `-k * d` as f16 if that is exact, else `None`.
fn exact_bias(d: [u8; 2], k: f32) -> Option<[u8; 2]> {
    let bias = -k * f16::from_le_bytes(d).to_f32();
    let h = f16::from_f32(bias);
    (h.is_finite() && h.to_f32() == bias).then(|| h.to_le_bytes())
}

/// Repacks a quantized tensor into MLX's affine format, or `None` if some
/// block cannot be represented exactly.
fn to_affine(ty: GgmlType, data: &[u8], shape: &[usize]) -> Option<Converted> {
    let (bits, block_bytes) = match ty {
        GgmlType::Q4_0 => (4usize, 18usize),
        GgmlType::Q4_1 => (4, 20),
        GgmlType::Q8_0 => (8, 34),
        _ => return None,
    };
    let n_blocks = data.len() / block_bytes;
    let mut packed = Vec::with_capacity(n_blocks * GROUP_SIZE * bits / 8);
    let mut scales = Vec::with_capacity(n_blocks * 2);
    let mut biases = Vec::with_capacity(n_blocks * 2);
    for b in data.chunks_exact(block_bytes) {
        let d = [b[0], b[1]];
        scales.extend_from_slice(&d);
        match ty {
            GgmlType::Q4_1 => {
                biases.extend_from_slice(&b[2..4]);
                pack_nibbles(&b[4..20], &mut packed);
            }
            GgmlType::Q4_0 => {
                biases.extend_from_slice(&exact_bias(d, 8.0)?);
                pack_nibbles(&b[2..18], &mut packed);
            }
            _ => {
                biases.extend_from_slice(&exact_bias(d, 128.0)?);
                // Flipping the top bit adds 128 to a two's complement byte;
                // four bytes in little-endian order are one uint32 with the
                // first value in the lowest bits.
                packed.extend(b[2..34].iter().map(|q| q ^ 0x80));
            }
        }
    }
    let (outer, cols) = shape.split_at(shape.len().saturating_sub(1));
    let cols = cols.first().copied().unwrap_or(1);
    let with_last = |last: usize| outer.iter().copied().chain([last]).collect::<Vec<_>>();
    Some(Converted::Quantized {
        weight: RawTensor {
            dtype: Dtype::U32,
            shape: with_last(cols * bits / 32),
            data: packed,
        },
        scales: RawTensor {
            dtype: Dtype::F16,
            shape: with_last(cols / GROUP_SIZE),
            data: scales,
        },
        biases: RawTensor {
            dtype: Dtype::F16,
            shape: with_last(cols / GROUP_SIZE),
            data: biases,
        },
        bits: bits as u32,
        group_size: GROUP_SIZE as u32,
    })
}

/// Packs a 4-bit ggml block: output byte `p` holds value `2p` in its low
/// nibble and value `2p + 1` in its high nibble, which read as little-endian
/// uint32 words puts eight values per word, first value lowest.
fn pack_nibbles(qs: &[u8], out: &mut Vec<u8>) {
    let mut values = [0u8; GROUP_SIZE];
    for (slot, v) in values.iter_mut().zip(nibbles(qs)) {
        *slot = v;
    }
    out.extend(values.chunks_exact(2).map(|p| p[0] | (p[1] << 4)));
}

/// Stores values as f16 when every one is exactly representable, else f32.
fn dense_from_f32(values: &[f32], shape: &[usize]) -> RawTensor {
    let halves: Option<Vec<u8>> = values
        .iter()
        .map(|&v| {
            let h = f16::from_f32(v);
            (h.to_f32() == v).then(|| h.to_le_bytes())
        })
        .try_fold(Vec::with_capacity(values.len() * 2), |mut acc, h| {
            acc.extend_from_slice(&h?);
            Some(acc)
        });
    match halves {
        Some(data) => RawTensor {
            dtype: Dtype::F16,
            shape: shape.to_vec(),
            data,
        },
        None => RawTensor {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        },
    }
}
