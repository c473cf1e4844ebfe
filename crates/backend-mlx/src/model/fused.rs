//! The elementwise-heavy parts of a layer as compiled MLX functions, for
//! the CPU.
//!
//! On a GPU, MLX's `fast` kernels (RMS norm, RoPE, attention) are fused
//! kernels and are used as they are. On the CPU they fall back to chains of
//! primitive ops, each a pass over memory, and every `exp` in them runs as
//! scalar code (see [`crate::jit`]). Here the same maths is written as
//! functions that `mlx::compile` traces once (shapeless, so one trace
//! serves every batch) and whose elementwise runs MLX fuses into single
//! kernels built for this machine: fewer ops per layer, fewer passes over
//! memory, and vectorisable `exp`.
//!
//! Numerics match MLX's own composition (f32 throughout on the CPU): the
//! mlx-lm oracle tests hold them to the same tolerance as before.

use std::cell::RefCell;

use mlx_rs::{error::Exception, transforms::compile::compile, Array, Dtype};

type MlxResult<T> = Result<T, Exception>;

/// A compiled function of a list of arrays.
type Compiled = Box<dyn for<'a> FnMut(&'a [Array]) -> MlxResult<Vec<Array>>>;

fn compiled(f: impl FnMut(&[Array]) -> MlxResult<Vec<Array>> + 'static) -> RefCell<Compiled> {
    let mut c = compile(f, true);
    RefCell::new(Box::new(move |args: &[Array]| c(args)))
}

/// Calls a compiled function; a reentrant call (impossible: the model runs
/// on one thread and these functions do not call each other) is an error,
/// not a panic.
fn call(f: &RefCell<Compiled>, args: &[Array]) -> MlxResult<Vec<Array>> {
    let mut f = f
        .try_borrow_mut()
        .map_err(|_| Exception::custom("a compiled function was called reentrantly"))?;
    f(args)
}

fn one(mut out: Vec<Array>) -> MlxResult<Array> {
    out.pop()
        .ok_or_else(|| Exception::custom("a compiled function returned nothing"))
}

fn arg(args: &[Array], i: usize) -> MlxResult<&Array> {
    args.get(i)
        .ok_or_else(|| Exception::custom("a compiled function got too few arguments"))
}

/// The compiled functions of one model.
pub(crate) struct Fused {
    rms_norm: RefCell<Compiled>,
    silu_mul: RefCell<Compiled>,
    softmax: RefCell<Compiled>,
    rope: RefCell<Compiled>,
}

impl std::fmt::Debug for Fused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fused").finish_non_exhaustive()
    }
}

impl Fused {
    /// Builds the functions for a model whose RMS norms use `eps`.
    pub(crate) fn new(eps: f32) -> Self {
        Self {
            // x * rsqrt(mean(x^2) + eps) * w, as MLX's fallback computes it:
            // in f32 whatever the input, then cast to the promoted type of
            // x and w before the weight.
            rms_norm: compiled(move |args: &[Array]| {
                let (x, w) = (arg(args, 0)?, arg(args, 1)?);
                let out = Dtype::from_promoting_types(x.dtype(), w.dtype());
                let x = x.as_dtype(Dtype::Float32)?;
                let ms = x.square()?.mean_axis(-1, true)?;
                let inv = ms.add(Array::from_f32(eps))?.rsqrt()?;
                Ok(vec![x.multiply(inv)?.as_dtype(out)?.multiply(w)?])
            }),
            // silu(g) * u with silu(g) = g / (1 + exp(-g)): one fused pass.
            // (MLX's `Sigmoid` functor has branches that keep the fused loop
            // slower than this form.)
            silu_mul: compiled(|args: &[Array]| {
                let (g, u) = (arg(args, 0)?, arg(args, 1)?);
                let one = Array::from_f32(1.0);
                let silu = g.divide(one.add(g.negative()?.exp()?)?)?;
                Ok(vec![silu.multiply(u)?])
            }),
            // softmax(scores + mask) over the last axis: the reductions stay
            // separate kernels, the exp and the normalisation fuse.
            softmax: compiled(|args: &[Array]| {
                let (s, mask) = (arg(args, 0)?, arg(args, 1)?);
                let s = s.add(mask)?;
                let m = s.max_axis(-1, true)?;
                let e = s.subtract(m)?.exp()?;
                let total = e.sum_axis(-1, true)?;
                Ok(vec![e.multiply(total.reciprocal()?)?])
            }),
            // The rotation of RoPE on the two halves (or the even and odd
            // lanes) of every head: (a, b) -> (a cos - b sin, b cos + a sin).
            rope: compiled(|args: &[Array]| {
                let (a, b) = (arg(args, 0)?, arg(args, 1)?);
                let (cos, sin) = (arg(args, 2)?, arg(args, 3)?);
                let ra = a.multiply(cos)?.subtract(b.multiply(sin)?)?;
                let rb = b.multiply(cos)?.add(a.multiply(sin)?)?;
                Ok(vec![ra, rb])
            }),
        }
    }

    /// RMS norm of `x` (`[.., hidden]`) with weight `w`.
    pub(crate) fn rms_norm(&self, x: &Array, w: &Array) -> MlxResult<Array> {
        one(call(&self.rms_norm, &[x.clone(), w.clone()])?)
    }

    /// `silu(g) * u`.
    pub(crate) fn silu_mul(&self, g: &Array, u: &Array) -> MlxResult<Array> {
        one(call(&self.silu_mul, &[g.clone(), u.clone()])?)
    }

    /// `softmax(scores + mask)` over the last axis.
    pub(crate) fn softmax(&self, scores: &Array, mask: &Array) -> MlxResult<Array> {
        one(call(&self.softmax, &[scores.clone(), mask.clone()])?)
    }

    /// Rotates the pairs `(a, b)` by the angles whose cosines and sines are
    /// given; returns the rotated `(a, b)`.
    pub(crate) fn rope(
        &self,
        a: &Array,
        b: &Array,
        cos: &Array,
        sin: &Array,
    ) -> MlxResult<(Array, Array)> {
        let mut out = call(
            &self.rope,
            &[a.clone(), b.clone(), cos.clone(), sin.clone()],
        )?
        .into_iter();
        match (out.next(), out.next()) {
            (Some(ra), Some(rb)) => Ok((ra, rb)),
            _ => Err(Exception::custom(
                "the compiled RoPE returned too few arrays",
            )),
        }
    }
}
