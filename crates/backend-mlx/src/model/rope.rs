//! Rotary position embeddings.
//!
//! The angles depend only on each token's position, so on the CPU they are
//! computed once per step on the host (cosines and sines, `[tokens, 1,
//! head_dim / 2]`) and every layer applies them to queries and keys
//! together with one compiled kernel. MLX's `fast::rope` would recompute
//! them from the positions in about twenty primitive ops per call, twice per
//! layer; on a GPU it is a fused kernel and is used instead.

use mlx_rs::{fast, ops, ops::indexing::IndexOp, Array, Dtype};

use super::{
    config::{ModelConfig, RopeScaling},
    fused::Fused,
};

type MlxResult<T> = mlx_rs::error::Result<T>;

/// A model's RoPE constants.
pub(crate) struct Rope {
    head_dim: i32,
    traditional: bool,
    base: f32,
    /// Position scale (linear scaling), as `fast::rope` takes it.
    scale: f32,
    /// `fast::rope`'s frequencies for scaled variants (`None`: plain RoPE,
    /// from the base).
    freqs: Option<Array>,
    /// The inverse frequencies, `head_dim / 2` of them, for host tables.
    inv_freq: Vec<f64>,
}

/// One step's angles.
pub(crate) enum Angles {
    /// Cosines and sines, `[tokens, 1, head_dim / 2]` (fused path).
    Tables { cos: Array, sin: Array },
    /// Each token's position, `[tokens]` (for `fast::rope`).
    Offsets(Array),
}

impl Rope {
    pub(crate) fn new(c: &ModelConfig) -> Self {
        let half = c.head_dim / 2;
        let (freqs, scale): (Option<Vec<f32>>, f32) = match c.rope_scaling {
            RopeScaling::None => (None, 1.0),
            RopeScaling::Linear { factor } => (None, 1.0 / factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                // The same formula as mlx-lm's Llama3RoPE, in f32.
                let dims = c.head_dim;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let freqs = (0..dims)
                    .step_by(2)
                    .map(|i| {
                        let f = c.rope_theta.powf(i as f32 / dims as f32);
                        let wavelen = 2.0 * std::f32::consts::PI * f;
                        let scaled = if wavelen > low_wavelen { f * factor } else { f };
                        if wavelen > high_wavelen && wavelen < low_wavelen {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            scaled / ((1.0 - smooth) / factor + smooth)
                        } else {
                            scaled
                        }
                    })
                    .collect();
                (Some(freqs), 1.0)
            }
        };
        let inv_freq = match &freqs {
            Some(f) => f.iter().map(|&f| 1.0 / f64::from(f)).collect(),
            None => (0..half)
                .map(|i| f64::from(c.rope_theta).powf(-(i as f64) / half as f64))
                .collect(),
        };
        Self {
            head_dim: c.head_dim as i32,
            traditional: c.rope_traditional,
            base: c.rope_theta,
            scale,
            freqs: freqs.map(|f| {
                let n = f.len() as i32;
                Array::from_slice(&f, &[n])
            }),
            inv_freq,
        }
    }

    /// The angles of tokens at `positions`, in the form the path needs.
    pub(crate) fn angles(&self, positions: &[i32], dtype: Dtype, fused: bool) -> MlxResult<Angles> {
        if !fused {
            let n = positions.len() as i32;
            return Ok(Angles::Offsets(Array::from_slice(positions, &[n])));
        }
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let p = f64::from(p) * f64::from(self.scale);
            for &f in &self.inv_freq {
                let (s, c) = (p * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        let shape = [positions.len() as i32, 1, half as i32];
        let cast = |a: Array| -> MlxResult<Array> {
            if dtype == Dtype::Float32 {
                Ok(a)
            } else {
                a.as_dtype(dtype)
            }
        };
        Ok(Angles::Tables {
            cos: cast(Array::from_slice(&cos, &shape))?,
            sin: cast(Array::from_slice(&sin, &shape))?,
        })
    }

    /// Rotates `x` (`[tokens, heads, head_dim]`, any heads: queries and
    /// keys together) by each token's angles.
    pub(crate) fn apply(
        &self,
        x: &Array,
        angles: &Angles,
        fused: Option<&Fused>,
    ) -> MlxResult<Array> {
        let (t, heads, hd) = (x.dim(0), x.dim(1), self.head_dim);
        match (angles, fused) {
            (Angles::Tables { cos, sin }, Some(fused)) => {
                if self.traditional {
                    // Pairs are adjacent lanes: (x[2i], x[2i + 1]).
                    let pairs = x.reshape(&[t, heads, hd / 2, 2])?;
                    let a = pairs.index((.., .., .., 0));
                    let b = pairs.index((.., .., .., 1));
                    let (ra, rb) = fused.rope(&a, &b, cos, sin)?;
                    ops::stack(&[ra, rb], -1)?.reshape(&[t, heads, hd])
                } else {
                    // Pairs are the two halves: (x[i], x[i + head_dim / 2]).
                    let half = hd / 2;
                    let a = x.index((.., .., 0..half));
                    let b = x.index((.., .., half..hd));
                    let (ra, rb) = fused.rope(&a, &b, cos, sin)?;
                    ops::concatenate(&[ra, rb], -1)
                }
            }
            (Angles::Offsets(offsets), _) => {
                let base = if self.freqs.is_some() {
                    None
                } else {
                    Some(self.base)
                };
                fast::rope_dynamic(
                    x.reshape(&[t, heads, 1, hd])?,
                    hd,
                    self.traditional,
                    base,
                    self.scale,
                    offsets,
                    self.freqs.as_ref(),
                )?
                .reshape(&[t, heads, hd])
            }
            (Angles::Tables { .. }, None) => Err(mlx_rs::error::Exception::custom(
                "RoPE tables need the fused kernels",
            )),
        }
    }
}
