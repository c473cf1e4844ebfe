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
//!
//! One rule keeps shapeless compilation sound: MLX records a broadcast
//! only where the traced shapes differ, so a function traced with an axis
//! of size one on both sides of an operation (a softmax over one key) and
//! reused with that axis longer writes past its outputs. Every function is
//! therefore traced once at load, by [`Fused::warm_up`], with every axis
//! longer than one, and callers never hand the softmax a last axis of one
//! (attention spans are whole blocks). The warm-up also builds MLX's
//! kernels before the first request instead of during it.

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

/// The dimensions [`Fused::warm_up`] traces with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WarmUpShape {
    pub(crate) hidden: i32,
    pub(crate) intermediate: i32,
    pub(crate) heads: i32,
    pub(crate) kv_heads: i32,
    pub(crate) head_dim: i32,
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

    /// Traces every function once with shapes whose every axis is longer
    /// than one, in the ranks and layouts a step uses (contiguous and
    /// strided inputs), and evaluates them, so that the cached traces carry
    /// every broadcast and MLX has built the kernels.
    pub(crate) fn warm_up(&self, dtype: Dtype, shape: WarmUpShape) -> MlxResult<()> {
        let WarmUpShape {
            hidden,
            intermediate,
            heads,
            kv_heads,
            head_dim,
        } = shape;
        let ones = |dims: &[i32]| -> MlxResult<Array> {
            mlx_rs::ops::ones_dtype(dims, dtype)?.multiply(Array::from_f32(0.5))
        };
        let mut outs = Vec::new();
        outs.push(self.rms_norm(&ones(&[2, hidden])?, &ones(&[hidden])?)?);
        let gu = ones(&[2, 2 * intermediate])?;
        let parts = super::linear::split_last(&gu, &[intermediate, intermediate]);
        outs.push(self.silu_mul(&parts[0], &parts[1])?);
        outs.push(self.silu_mul(&ones(&[2, intermediate])?, &ones(&[2, intermediate])?)?);
        // Decode scores [rows, heads, span] with a [rows, 1, span] mask;
        // chunk scores [kv_heads, rep, n, span] with an [n, span] mask.
        outs.push(self.softmax(&ones(&[2, heads, 32])?, &ones(&[2, 1, 32])?)?);
        let rep = (heads / kv_heads.max(1)).max(2);
        outs.push(self.softmax(&ones(&[kv_heads.max(2), rep, 2, 32])?, &ones(&[2, 32])?)?);
        let half = head_dim / 2;
        let qk = ones(&[2, heads + kv_heads, head_dim])?;
        use mlx_rs::ops::indexing::IndexOp;
        let (a, b) = (
            qk.index((.., .., 0..half)),
            qk.index((.., .., half..head_dim)),
        );
        let (cos, sin) = (ones(&[2, 1, half])?, ones(&[2, 1, half])?);
        let (ra, rb) = self.rope(&a, &b, &cos, &sin)?;
        outs.extend([ra, rb]);
        let pairs = qk.reshape(&[2, heads + kv_heads, half, 2])?;
        let (a, b) = (pairs.index((.., .., .., 0)), pairs.index((.., .., .., 1)));
        let (ra, rb) = self.rope(&a, &b, &cos, &sin)?;
        outs.extend([ra, rb]);
        mlx_rs::transforms::eval(outs.iter())
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
