//! Work of the f32 CPU path that MLX does slowly, done on the host: a
//! prefill chunk's causal softmax, the MLP's `silu(gate) * up`, the RMS
//! norms' row reductions, and decode attention read straight from the
//! block pool.
//!
//! MLX's CPU backend computes `exp` one element at a time (about 10 ns an
//! element, 2.5 ns inside a compiled function) on one thread. A chunk's
//! scores hold `heads * chunk * span` values: at a 2k-token prompt the
//! softmax took a third of prefill, more than the attention's matmuls, and
//! the SiLU's exps another tenth; a decode step gathered every row's blocks
//! into padded copies before two matmuls. Here the same arithmetic runs in
//! vector code (AVX2 where the CPU has it) with a polynomial `exp`; each
//! softmax row is normalised over only the keys its query may see (the rest
//! is written as zeros, without an exp); decode attention reads each row's
//! keys and values where they lie. The elementwise ops write into the
//! buffer of an op's output that nothing else holds, which saves a copy and
//! a fresh allocation (which on Linux means page faults).
//!
//! - `in_place`: the ops over MLX arrays (the in-place row loop, the
//!   softmax, SiLU and RMS norm);
//! - `decode`: decode attention over slices of the block pool;
//! - `kernels`: the vector kernels both use, each with a portable build and
//!   an AVX2/FMA one chosen at run time.

mod decode;
mod in_place;
mod kernels;

pub(crate) use decode::{decode_attention, DecodeRow, PoolAttention};
pub(crate) use in_place::{rms_norm, silu_mul_in_place, softmax_in_place, CausalRows};
