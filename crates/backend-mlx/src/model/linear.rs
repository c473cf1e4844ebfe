//! Linear layers and embeddings, dense or MLX-quantized.

use mlx_rs::{
    ops::{self, indexing::IndexOp},
    Array,
};

use super::config::QuantSpec;

/// A linear layer `y = x W^T + b`, with `W` stored `[out, in]` as in
/// Hugging Face checkpoints.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    /// Plain floating-point weights.
    Dense {
        /// `[out, in]`.
        weight: Array,
        /// `[out]`.
        bias: Option<Array>,
    },
    /// MLX affine-quantized weights (packed `uint32`, one scale and bias
    /// per group).
    Quantized {
        /// `[out, in * bits / 32]`, packed.
        weight: Array,
        /// `[out, in / group_size]`.
        scales: Array,
        /// `[out, in / group_size]`.
        biases: Array,
        /// The layer's own additive bias, `[out]`.
        bias: Option<Array>,
        /// Group size and bits.
        spec: QuantSpec,
    },
}

impl Linear {
    /// Applies the layer to `x` of shape `[.., in]`.
    pub(crate) fn forward(&self, x: &Array) -> mlx_rs::error::Result<Array> {
        match self {
            Linear::Dense { weight, bias } => match bias {
                // One fused call instead of a matmul and an add.
                Some(b) => ops::addmm(b, x, weight.t(), None, None),
                None => ops::matmul(x, weight.t()),
            },
            Linear::Quantized {
                weight,
                scales,
                biases,
                bias,
                spec,
            } => {
                let y = ops::quantized_matmul(
                    x,
                    weight,
                    scales,
                    biases,
                    true,
                    spec.group_size,
                    spec.bits,
                )?;
                match bias {
                    Some(b) => y.add(b),
                    None => Ok(y),
                }
            }
        }
    }

    /// Stacks layers that read the same input into one, along the output
    /// dimension, so that q/k/v (or gate/up) run as one matmul per step.
    /// Returns `None` when the parts cannot share a kernel (mixed dense and
    /// quantized, or different quantization).
    pub(crate) fn fuse(parts: &[Linear]) -> mlx_rs::error::Result<Option<Linear>> {
        let any_bias = parts.iter().any(|p| p.bias().is_some());
        let biases = if any_bias {
            let mut list = Vec::with_capacity(parts.len());
            for p in parts {
                list.push(match p.bias() {
                    Some(b) => b.clone(),
                    None => ops::zeros_dtype(&[p.out_features()], p.output_dtype())?,
                });
            }
            Some(ops::concatenate(&list, 0)?)
        } else {
            None
        };
        if parts.iter().all(|p| matches!(p, Linear::Dense { .. })) {
            let weights: Vec<&Array> = parts
                .iter()
                .filter_map(|p| match p {
                    Linear::Dense { weight, .. } => Some(weight),
                    Linear::Quantized { .. } => None,
                })
                .collect();
            return Ok(Some(Linear::Dense {
                weight: ops::concatenate(&weights, 0)?,
                bias: biases,
            }));
        }
        let mut ws = Vec::new();
        let mut ss = Vec::new();
        let mut bs = Vec::new();
        let mut spec0 = None;
        for p in parts {
            match p {
                Linear::Quantized {
                    weight,
                    scales,
                    biases,
                    spec,
                    ..
                } if spec0.is_none() || spec0 == Some(*spec) => {
                    spec0 = Some(*spec);
                    ws.push(weight);
                    ss.push(scales);
                    bs.push(biases);
                }
                _ => return Ok(None),
            }
        }
        let Some(spec) = spec0 else { return Ok(None) };
        Ok(Some(Linear::Quantized {
            weight: ops::concatenate(&ws, 0)?,
            scales: ops::concatenate(&ss, 0)?,
            biases: ops::concatenate(&bs, 0)?,
            bias: biases,
            spec,
        }))
    }

    fn bias(&self) -> Option<&Array> {
        match self {
            Linear::Dense { bias, .. } | Linear::Quantized { bias, .. } => bias.as_ref(),
        }
    }

    /// Rows of `W`.
    pub(crate) fn out_features(&self) -> i32 {
        match self {
            Linear::Dense { weight, .. } | Linear::Quantized { weight, .. } => weight.dim(0),
        }
    }

    /// The dtype of `forward`'s result for an input of the same dtype.
    pub(crate) fn output_dtype(&self) -> mlx_rs::Dtype {
        match self {
            Linear::Dense { weight, .. } => weight.dtype(),
            Linear::Quantized { scales, .. } => scales.dtype(),
        }
    }
}

/// A token embedding; also the output projection when embeddings are tied.
#[derive(Debug, Clone)]
pub(crate) struct Embedding {
    /// The table as a linear layer `[vocab, hidden]`.
    pub(crate) table: Linear,
}

impl Embedding {
    /// Looks up `ids` (`[T]`, `uint32`) and returns `[T, hidden]`.
    pub(crate) fn lookup(&self, ids: &Array) -> mlx_rs::error::Result<Array> {
        match &self.table {
            Linear::Dense { weight, .. } => weight.take_axis(ids, 0),
            Linear::Quantized {
                weight,
                scales,
                biases,
                spec,
                ..
            } => {
                // Only the looked-up rows are dequantized.
                let w = weight.take_axis(ids, 0)?;
                let s = scales.take_axis(ids, 0)?;
                let b = biases.take_axis(ids, 0)?;
                ops::dequantize(&w, &s, &b, spec.group_size, spec.bits)
            }
        }
    }

    /// Uses the table as the output projection (`x E^T`).
    pub(crate) fn as_linear(&self, x: &Array) -> mlx_rs::error::Result<Array> {
        self.table.forward(x)
    }
}

/// Splits the last axis of `x` (`[T, sum(widths)]`) into consecutive
/// pieces of the given widths, as views.
pub(crate) fn split_last(x: &Array, widths: &[i32]) -> Vec<Array> {
    let mut start = 0;
    widths
        .iter()
        .map(|&w| {
            let piece = x.index((.., start..start + w));
            start += w;
            piece
        })
        .collect()
}
