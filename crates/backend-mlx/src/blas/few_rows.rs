//! `C = alpha * A * W^T + beta * C` for an activation `A` of a few rows
//! and a weight `W` stored `[out, in]`: the product of every decode step.
//!
//! OpenBLAS's sgemm packs both operands into blocked buffers before it
//! multiplies. For a 576-wide weight and 8 activation rows, packing the
//! weight costs as much as the arithmetic, and the weight is read twice
//! from memory. Here each output element is a dot product of two rows that
//! are already contiguous, so nothing is packed: a block of weight rows is
//! loaded once into L1 and multiplied with every activation row (which
//! stay in L2), in register tiles of up to 4 x 4 dot products.
//!
//! Every output element is computed the same way whatever the number of
//! rows and wherever it falls in a tile: full vector chunks of `k` in
//! order, one masked chunk for the tail, then a fixed horizontal sum. So
//! in decode steps (up to `FEW_ROWS` rows, the products routed here) a
//! sequence's logits do not depend on which other sequences share its
//! step, bit for bit.

use std::{ops::Range, sync::OnceLock};

use crate::team;

/// The operands, row-major, as CBLAS describes them: `A` is `m x k` with
/// leading dimension `lda`, `W` is `n x k` with `ldw`, `C` is `m x n` with
/// `ldc`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Product {
    pub(crate) a: *const f32,
    pub(crate) lda: usize,
    pub(crate) w: *const f32,
    pub(crate) ldw: usize,
    pub(crate) c: *mut f32,
    pub(crate) ldc: usize,
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) alpha: f32,
    pub(crate) beta: f32,
}

// SAFETY: a `Product` is only built from a caller's valid matrices, and
// the threads that share it write disjoint column ranges of `C`.
unsafe impl Send for Product {}
// SAFETY: as for `Send`; nothing is written through a shared `Product`
// except those disjoint ranges.
unsafe impl Sync for Product {}

/// Which vector instructions the CPU offers, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// 16 lanes, masked tails.
    Avx512,
    /// 8 lanes with FMA.
    Avx2,
}

/// The best [`Isa`] of this CPU, or `None` (then OpenBLAS does the work).
pub(crate) fn isa() -> Option<Isa> {
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Some(Isa::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Some(Isa::Avx2);
            }
        }
        None
    })
}

/// Below this many multiply-adds a product runs on the calling thread
/// alone: handing out parts costs more than it saves.
const SPLIT_FROM: usize = 1 << 16;

/// Computes the product with `isa`, split by columns of `C` between the
/// caller and the helper threads of [`team`].
///
/// # Safety
///
/// `p` must describe valid matrices of the given shapes, `C` not
/// overlapping `A` or `W`, and the CPU must have `isa`.
pub(crate) unsafe fn multiply(p: &Product, isa: Isa) {
    let parts = if p.m * p.n * p.k >= SPLIT_FROM {
        team::parts()
    } else {
        1
    };
    if parts == 1 {
        // SAFETY: the caller's promise.
        unsafe { columns(p, 0..p.n, isa) };
        return;
    }
    // Equal shares, each a multiple of both kernels' tile widths (4 and
    // 3), so that no share ends in a narrow tile that another share could
    // have avoided.
    let tile = 12;
    let share = p.n.div_ceil(parts).div_ceil(tile) * tile;
    team::for_each_part(parts, &|part| {
        let cols = (part * share).min(p.n)..((part + 1) * share).min(p.n);
        // SAFETY: the caller's promise; the parts' columns are disjoint.
        unsafe { columns(p, cols, isa) };
    });
}

/// Columns `cols` of `C`, for every row.
///
/// # Safety
///
/// As for [`multiply`], with `cols` inside `0..n`.
unsafe fn columns(p: &Product, cols: Range<usize>, isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's promise, including that the CPU has `isa`.
    unsafe {
        match isa {
            Isa::Avx512 => avx512::columns(p, cols),
            Isa::Avx2 => avx2::columns(p, cols),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, cols, isa);
}

/// Writes `alpha * dot + beta * C[i][j]`; with `beta == 0`, `C` is not
/// read (CBLAS's rule: it may hold anything, NaN included).
///
/// # Safety
///
/// `c` must point at a valid element.
#[inline(always)]
unsafe fn store(c: *mut f32, dot: f32, alpha: f32, beta: f32) {
    // SAFETY: the caller's promise.
    unsafe {
        *c = if beta == 0.0 {
            alpha * dot
        } else {
            alpha * dot + beta * *c
        };
    }
}

/// Generates one ISA's kernel: `columns` walks tiles of `$cols` weight
/// rows by `$rows` activation rows and dispatches each (possibly narrower)
/// tile to `tile::<R, C, F>`, which keeps `R x C` vector accumulators in
/// registers and prefetches `F` rows of the next weight tile.
macro_rules! few_rows_kernel {
    (
        mod $name:ident, feature $feature:literal, lanes $lanes:literal,
        tile $rows:literal x $cols:literal,
        vector $vec:ident, zero $zero:ident, load $load:ident, fma $fma:ident,
        tail_load |$tp:ident, $tn:ident| $tail:expr,
        sum |$sv:ident| $sum:expr $(,)?
    ) => {
        #[cfg(target_arch = "x86_64")]
        mod $name {
            #[allow(clippy::wildcard_imports)]
            use std::arch::x86_64::*;
            use std::ops::Range;

            use super::{store, Product};

            /// Columns `cols` of `C`, for every row.
            ///
            /// # Safety
            ///
            /// As for [`super::multiply`].
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn columns(p: &Product, cols: Range<usize>) {
                let passes = p.m.div_ceil($rows);
                let mut j = cols.start;
                while j < cols.end {
                    let width = (cols.end - j).min($cols);
                    let mut i = 0;
                    while i < p.m {
                        let height = (p.m - i).min($rows);
                        let fetch = super::Fetch::for_pass(i / $rows, passes, $cols);
                        // SAFETY: the tile lies inside the caller's
                        // matrices; the arms cover every height and width
                        // up to the tile's.
                        unsafe {
                            match fetch.rows {
                                0 => dispatch::<0>(p, i, j, height, width, fetch.first),
                                1 => dispatch::<1>(p, i, j, height, width, fetch.first),
                                2 => dispatch::<2>(p, i, j, height, width, fetch.first),
                                _ => dispatch::<4>(p, i, j, height, width, fetch.first),
                            }
                        }
                        i += height;
                    }
                    j += width;
                }
            }

            /// Calls the `tile` instance for a `height x width` tile that
            /// prefetches `F` rows of the next column tile from `first`.
            #[target_feature(enable = $feature)]
            #[inline]
            unsafe fn dispatch<const F: usize>(
                p: &Product,
                i: usize,
                j: usize,
                height: usize,
                width: usize,
                first: usize,
            ) {
                tile_dispatch!(p, i, j, height, width, first, F)
            }

            /// `R x C` outputs from row `i` of `A` and row `j` of `W`,
            /// prefetching `F` weight rows of the next column tile from
            /// its row `first` (see [`super::Fetch`]).
            #[target_feature(enable = $feature)]
            #[inline]
            unsafe fn tile<const R: usize, const C: usize, const F: usize>(
                p: &Product,
                i: usize,
                j: usize,
                first: usize,
            ) {
                // SAFETY (whole body): rows i..i+R of A and j..j+C of W,
                // each `k` long, and the tile of C lie inside the caller's
                // matrices; loads past `k` are masked off.
                unsafe {
                    let a: [*const f32; R] = std::array::from_fn(|r| p.a.add((i + r) * p.lda));
                    let w: [*const f32; C] = std::array::from_fn(|c| p.w.add((j + c) * p.ldw));
                    let mut acc: [[$vec; C]; R] = [[$zero(); C]; R];
                    let mut at = 0;
                    // The next column tile starts `C` rows on, where the
                    // tile is full (a narrower one is the last). A
                    // prefetch never faults, so the addresses may lie past
                    // the matrix.
                    let ahead: [*const f32; F] = std::array::from_fn(|f| {
                        p.w.wrapping_add((j + $cols + (first + f) % $cols) * p.ldw)
                    });
                    while at + $lanes <= p.k {
                        for next in ahead {
                            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(at).cast());
                        }
                        let wv: [$vec; C] = std::array::from_fn(|c| $load(w[c].add(at)));
                        for r in 0..R {
                            let av = $load(a[r].add(at));
                            for c in 0..C {
                                acc[r][c] = $fma(av, wv[c], acc[r][c]);
                            }
                        }
                        at += $lanes;
                    }
                    if at < p.k {
                        let $tn = p.k - at;
                        let wv: [$vec; C] = std::array::from_fn(|c| {
                            let $tp = w[c].add(at);
                            $tail
                        });
                        for r in 0..R {
                            let av = {
                                let $tp = a[r].add(at);
                                $tail
                            };
                            for c in 0..C {
                                acc[r][c] = $fma(av, wv[c], acc[r][c]);
                            }
                        }
                    }
                    for r in 0..R {
                        for c in 0..C {
                            let $sv = acc[r][c];
                            let dot: f32 = $sum;
                            store(p.c.add((i + r) * p.ldc + j + c), dot, p.alpha, p.beta);
                        }
                    }
                }
            }
        }
    };
}

/// The `match` from a tile's height and width to its `tile` instance, for
/// tiles up to 4 x 4 (the largest either kernel uses).
macro_rules! tile_dispatch {
    ($p:ident, $i:ident, $j:ident, $h:ident, $w:ident, $first:ident, $f:ident) => {
        // SAFETY: the caller's promise.
        unsafe {
            match ($h, $w) {
                (4, 4) => tile::<4, 4, $f>($p, $i, $j, $first),
                (4, 3) => tile::<4, 3, $f>($p, $i, $j, $first),
                (4, 2) => tile::<4, 2, $f>($p, $i, $j, $first),
                (4, _) => tile::<4, 1, $f>($p, $i, $j, $first),
                (3, 4) => tile::<3, 4, $f>($p, $i, $j, $first),
                (3, 3) => tile::<3, 3, $f>($p, $i, $j, $first),
                (3, 2) => tile::<3, 2, $f>($p, $i, $j, $first),
                (3, _) => tile::<3, 1, $f>($p, $i, $j, $first),
                (2, 4) => tile::<2, 4, $f>($p, $i, $j, $first),
                (2, 3) => tile::<2, 3, $f>($p, $i, $j, $first),
                (2, 2) => tile::<2, 2, $f>($p, $i, $j, $first),
                (2, _) => tile::<2, 1, $f>($p, $i, $j, $first),
                (_, 4) => tile::<1, 4, $f>($p, $i, $j, $first),
                (_, 3) => tile::<1, 3, $f>($p, $i, $j, $first),
                (_, 2) => tile::<1, 2, $f>($p, $i, $j, $first),
                (_, _) => tile::<1, 1, $f>($p, $i, $j, $first),
            }
        }
    };
}

/// Which rows of the next column tile's weights a row pass prefetches.
///
/// The first pass over a column tile reads its weight rows from memory;
/// later passes find them in L1. Prefetching the next tile's rows while
/// this one computes hides that latency, and spreading them over the
/// passes (one row each, or a share of them when there are fewer passes
/// than rows) keeps the prefetches out of the way of the arithmetic:
/// prefetching every row in every pass halved the kernel's speed.
#[derive(Clone, Copy, Debug)]
struct Fetch {
    /// How many rows: 0, 1, 2 or 4.
    rows: usize,
    /// The first of them, counted from the next tile's first row.
    first: usize,
}

impl Fetch {
    fn for_pass(pass: usize, passes: usize, width: usize) -> Fetch {
        if passes >= width {
            // One row each for the first `width` passes.
            return Fetch {
                rows: usize::from(pass < width),
                first: pass,
            };
        }
        // Fewer passes than rows: each takes an equal share, rounded up
        // to a kernel instance (1, 2 or 4 rows).
        let share = width.div_ceil(passes);
        let rows = match share {
            1 => 1,
            2 => 2,
            _ => 4,
        };
        Fetch {
            rows,
            first: pass * share,
        }
    }
}

few_rows_kernel! {
    mod avx512, feature "avx512f", lanes 16,
    tile 4 x 4,
    vector __m512, zero _mm512_setzero_ps, load _mm512_loadu_ps, fma _mm512_fmadd_ps,
    tail_load |ptr, left| _mm512_maskz_loadu_ps(((1u32 << left) - 1) as u16, ptr),
    sum |v| _mm512_reduce_add_ps(v),
}

few_rows_kernel! {
    mod avx2, feature "avx2,fma", lanes 8,
    tile 4 x 3,
    vector __m256, zero _mm256_setzero_ps, load _mm256_loadu_ps, fma _mm256_fmadd_ps,
    tail_load |ptr, left| _mm256_maskload_ps(ptr, super::avx2_tail_mask(left)),
    sum |v| super::avx2_sum(v),
}

/// The mask that loads the first `left` (1 to 7) of 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn avx2_tail_mask(left: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::{_mm256_cmpgt_epi32, _mm256_set1_epi32, _mm256_setr_epi32};
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(left as i32), lanes)
}

/// The sum of 8 lanes, always in the same order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn avx2_sum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::{
        _mm256_castps256_ps128, _mm256_extractf128_ps, _mm_add_ps, _mm_add_ss, _mm_cvtss_f32,
        _mm_movehl_ps, _mm_shuffle_ps,
    };
    let q = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let q = _mm_add_ss(q, _mm_shuffle_ps::<1>(q, q));
    _mm_cvtss_f32(q)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    use proptest::prelude::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000)
            .map(|v| v as f32 / 500.0 - 1.0)
            .collect()
    }

    /// Runs the kernel over padded matrices (leading dimensions wider than
    /// `k` and `n`), returning `C`.
    fn run(isa: Isa, [m, n, k]: [usize; 3], alpha: f32, beta: f32) -> (Vec<f32>, Vec<f32>) {
        let (lda, ldw, ldc) = (k + 3, k + 1, n + 2);
        let a = values(m * lda, 1);
        let w = values(n * ldw, 2);
        let mut c = values(m * ldc, 3);
        let want: Vec<f32> = (0..m * ldc)
            .map(|at| {
                let (i, j) = (at / ldc, at % ldc);
                if j >= n {
                    return c[at];
                }
                let dot: f64 = (0..k)
                    .map(|t| f64::from(a[i * lda + t]) * f64::from(w[j * ldw + t]))
                    .sum();
                (f64::from(alpha) * dot + f64::from(beta) * f64::from(c[at])) as f32
            })
            .collect();
        let p = Product {
            a: a.as_ptr(),
            lda,
            w: w.as_ptr(),
            ldw,
            c: c.as_mut_ptr(),
            ldc,
            m,
            n,
            k,
            alpha,
            beta,
        };
        // SAFETY: the buffers hold the shapes described; `isa` is the CPU's.
        unsafe { multiply(&p, isa) };
        (c, want)
    }

    fn isas() -> Vec<Isa> {
        match isa() {
            Some(Isa::Avx512) => vec![Isa::Avx512, Isa::Avx2],
            Some(Isa::Avx2) => vec![Isa::Avx2],
            None => vec![],
        }
    }

    proptest! {
        #[test]
        fn products_match_a_double_precision_one(
            m in 1usize..11, n in 1usize..23, k in 1usize..70,
            alpha in prop::sample::select(vec![1.0f32, 0.5]),
            beta in prop::sample::select(vec![0.0f32, 1.0, -0.25]),
        ) {
            for isa in isas() {
                let (got, want) = run(isa, [m, n, k], alpha, beta);
                for (g, w) in got.iter().zip(&want) {
                    prop_assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{isa:?}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn beta_zero_never_reads_c() {
        for isa in isas() {
            let a = values(2 * 5, 1);
            let w = values(3 * 5, 2);
            let mut c = vec![f32::NAN; 2 * 3];
            let p = Product {
                a: a.as_ptr(),
                lda: 5,
                w: w.as_ptr(),
                ldw: 5,
                c: c.as_mut_ptr(),
                ldc: 3,
                m: 2,
                n: 3,
                k: 5,
                alpha: 1.0,
                beta: 0.0,
            };
            // SAFETY: the buffers hold the shapes described.
            unsafe { multiply(&p, isa) };
            assert!(c.iter().all(|v| v.is_finite()), "{isa:?}: {c:?}");
        }
    }

    /// A row's result is the same bits whether it is computed alone or
    /// among others, in any tile position, split across threads or not.
    #[test]
    fn a_rows_result_does_not_depend_on_the_other_rows() {
        for isa in isas() {
            let (n, k) = (1030, 203);
            let all = 11;
            let a = values(all * k, 7);
            let w = values(n * k, 8);
            let product = |rows: Range<usize>| {
                let m = rows.len();
                let mut c = vec![0f32; m * n];
                let p = Product {
                    a: a[rows.start * k..].as_ptr(),
                    lda: k,
                    w: w.as_ptr(),
                    ldw: k,
                    c: c.as_mut_ptr(),
                    ldc: n,
                    m,
                    n,
                    k,
                    alpha: 1.0,
                    beta: 0.0,
                };
                // SAFETY: the buffers hold the shapes described.
                unsafe { multiply(&p, isa) };
                c
            };
            let together = product(0..all);
            for row in [0, 3, 5, 10] {
                let alone = product(row..row + 1);
                assert_eq!(alone, together[row * n..(row + 1) * n], "{isa:?} row {row}");
            }
        }
    }
}
