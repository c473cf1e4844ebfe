//! The `cblas_sgemm` that MLX's CPU backend calls, routing the products of
//! a decode step (a few activation rows times a weight) to our own kernel.
//!
//! MLX sends every f32 matmul to `cblas_sgemm`, which libmlx resolves at
//! load time to whatever the process offers first (the server links
//! OpenBLAS ahead of the wheel's reference BLAS). OpenBLAS's sgemm packs
//! the weight matrix into a buffer on every call before it multiplies,
//! which for the few rows of a decode step costs as much as the arithmetic
//! (measured on the default model: 28 to 67 GFLOP/s at 8 rows, against 160
//! to 200 for a kernel that packs nothing). So the binaries of this project
//! define `cblas_sgemm` themselves (exported by their build scripts, so
//! that libmlx binds to it). A row-major `A * W^T` with at most
//! [`FEW_ROWS`] rows goes to `few_rows` (on a CPU with AVX2 or AVX-512);
//! other single-row products become one `cblas_sgemv`; every other call
//! (a prefill chunk's products, where OpenBLAS runs near the machine's
//! peak) goes on to OpenBLAS's own sgemm, found with `dlsym(RTLD_NEXT)`.
//!
//! For A/B measurements, `MLX_BATCH_FEW_ROWS=0` turns the first route off
//! and `MLX_BATCH_SGEMV=0` the second (or [`set_routes`], in one process).

mod few_rows;

use std::{
    ffi::c_int,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        OnceLock,
    },
};

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

type Sgemv = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

/// The process's `cblas_sgemv` (OpenBLAS's, where the binary links it),
/// looked up at run time: a binary that links this crate without OpenBLAS
/// (a test harness) still links, and then routes nothing.
fn sgemv() -> Option<Sgemv> {
    static SGEMV: OnceLock<Option<Sgemv>> = OnceLock::new();
    *SGEMV.get_or_init(|| {
        // SAFETY: as in `next_sgemm`, for the CBLAS sgemv signature.
        unsafe {
            let f = libc::dlsym(libc::RTLD_DEFAULT, c"cblas_sgemv".as_ptr());
            (!f.is_null()).then(|| std::mem::transmute::<*mut libc::c_void, Sgemv>(f))
        }
    })
}

/// Products with at most this many rows go to `few_rows`: every decode
/// step up to twice the default batch of 32 (measured faster than OpenBLAS
/// at 1, 8 and 32 rows), while prefill chunks, hundreds of rows, stay with
/// OpenBLAS.
pub const FEW_ROWS: usize = 64;

/// Products sent to `few_rows` or sgemv, for tests and measurements.
static ROUTED: AtomicU64 = AtomicU64::new(0);
/// Calls passed on to the next sgemm.
static PASSED: AtomicU64 = AtomicU64::new(0);

/// How many products went to our kernel or sgemv, and how many to sgemm,
/// so far.
pub fn routed_and_passed() -> (u64, u64) {
    (
        ROUTED.load(Ordering::Relaxed),
        PASSED.load(Ordering::Relaxed),
    )
}

/// Whether the environment variable `name` leaves a route on (anything but
/// `0`, or unset).
fn route_on(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v != "0")
}

/// Which of the two routes are on; every product not routed goes to
/// OpenBLAS's sgemm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routes {
    /// Products with at most [`FEW_ROWS`] rows to `few_rows` (where the
    /// CPU has AVX2 or AVX-512).
    pub few_rows: bool,
    /// Other single-row products to sgemv.
    pub sgemv: bool,
}

/// The routes as bits of one atomic (bit 0 few rows, bit 1 sgemv), with
/// bit 7 set once they are read from the environment.
static ROUTES: AtomicU8 = AtomicU8::new(0);
const ROUTES_SET: u8 = 1 << 7;

/// The routes now in force: from the environment at first use, unless
/// [`set_routes`] chose others.
pub fn routes() -> Routes {
    let mut bits = ROUTES.load(Ordering::Relaxed);
    if bits & ROUTES_SET == 0 {
        let from_env = Routes {
            few_rows: route_on("MLX_BATCH_FEW_ROWS"),
            sgemv: route_on("MLX_BATCH_SGEMV"),
        };
        bits = encode(from_env);
        // A concurrent `set_routes` wins over the environment.
        if let Err(now) = ROUTES.compare_exchange(0, bits, Ordering::Relaxed, Ordering::Relaxed) {
            bits = now;
        }
    }
    Routes {
        few_rows: bits & 1 != 0,
        sgemv: bits & 2 != 0,
    }
}

/// Chooses the routes for every later product (benches compare them in
/// one process this way).
pub fn set_routes(routes: Routes) {
    ROUTES.store(encode(routes), Ordering::Relaxed);
}

fn encode(routes: Routes) -> u8 {
    ROUTES_SET | u8::from(routes.few_rows) | (u8::from(routes.sgemv) << 1)
}

/// Whether products of a few rows go to our kernel now: the CPU has AVX2
/// or AVX-512 and the route is on.
pub fn few_rows_active() -> bool {
    few_rows_isa().is_some()
}

/// `few_rows`'s instruction set, when the CPU has one and the route is on.
fn few_rows_isa() -> Option<few_rows::Isa> {
    few_rows::isa().filter(|_| routes().few_rows)
}

/// The sgemm this definition shadows (OpenBLAS's, or the wheel's
/// reference one).
fn next_sgemm() -> Option<Sgemm> {
    static NEXT: OnceLock<Option<Sgemm>> = OnceLock::new();
    *NEXT.get_or_init(|| {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name only looks
        // a symbol up; a non-null result is the address of a function with
        // the standard CBLAS sgemm signature.
        unsafe {
            let f = libc::dlsym(libc::RTLD_NEXT, c"cblas_sgemm".as_ptr());
            (!f.is_null()).then(|| std::mem::transmute::<*mut libc::c_void, Sgemm>(f))
        }
    })
}

/// `C = alpha * op(A) * op(B) + beta * C`, as CBLAS defines it.
///
/// # Safety
///
/// The pointers and leading dimensions must describe matrices of the given
/// shapes, as for any CBLAS `sgemm` (MLX is the caller).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cblas_sgemm(
    order: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
) {
    let a_times_w_t = order == ROW_MAJOR && trans_a == NO_TRANS && trans_b == TRANS;
    if let Some(isa) = few_rows_isa() {
        let few = usize::try_from(m).is_ok_and(|m| (1..=FEW_ROWS).contains(&m));
        // Leading dimensions CBLAS would refuse go on to OpenBLAS, which
        // reports them.
        let valid = n > 0 && k > 0 && lda >= k && ldb >= k && ldc >= n;
        if a_times_w_t && few && valid {
            ROUTED.fetch_add(1, Ordering::Relaxed);
            // Every dimension is positive here (checked above).
            let dim = |v: c_int| v as usize;
            let product = few_rows::Product {
                a,
                lda: dim(lda),
                w: b,
                ldw: dim(ldb),
                c,
                ldc: dim(ldc),
                m: dim(m),
                n: dim(n),
                k: dim(k),
                alpha,
                beta,
            };
            // SAFETY: the caller's matrices, as CBLAS describes them; the
            // CPU has `isa`.
            unsafe { few_rows::multiply(&product, isa) };
            return;
        }
    }
    let single_row = order == ROW_MAJOR && m == 1 && n > 0 && k > 0;
    let next = next_sgemm();
    let by_rows = match next {
        // A single row goes to sgemv, unless routing is off.
        Some(_) => sgemv().filter(|_| single_row && routes().sgemv),
        // No other sgemm in the process (never the case with libmlx, which
        // needs one): one sgemv per output row is slower but right.
        None => sgemv(),
    };
    if let Some(cblas_sgemv) = by_rows {
        if single_row {
            ROUTED.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's arguments.
        unsafe {
            rows_by_sgemv(
                cblas_sgemv,
                order,
                [trans_a, trans_b],
                [m, n, k],
                alpha,
                a,
                lda,
                b,
                ldb,
                beta,
                c,
                ldc,
            );
        }
        return;
    }
    PASSED.fetch_add(1, Ordering::Relaxed);
    // OpenBLAS's threads need the cores that the team's helpers spin on.
    crate::team::rest();
    if let Some(sgemm) = next {
        // SAFETY: the caller's arguments, passed on unchanged.
        unsafe {
            sgemm(
                order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
            );
        }
    }
}

/// The product as one sgemv per row of the output (row-major only): row
/// `i` of op(A) is contiguous, or a column of a K x M matrix; op(B) is B^T
/// for a row-major N x K matrix B, or B for a K x N one.
///
/// # Safety
///
/// As for [`cblas_sgemm`].
#[allow(clippy::too_many_arguments)]
unsafe fn rows_by_sgemv(
    cblas_sgemv: Sgemv,
    order: c_int,
    [trans_a, trans_b]: [c_int; 2],
    [m, n, k]: [c_int; 3],
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
) {
    if order != ROW_MAJOR {
        return;
    }
    for row in 0..m as isize {
        // SAFETY: row `row` of op(A) and of C, within the caller's matrices.
        unsafe {
            let (x, incx) = if trans_a == NO_TRANS {
                (a.offset(row * lda as isize), 1)
            } else {
                (a.offset(row), lda)
            };
            let y = c.offset(row * ldc as isize);
            if trans_b == NO_TRANS {
                cblas_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, x, incx, beta, y, 1);
            } else {
                cblas_sgemv(
                    ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, x, incx, beta, y, 1,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `op(A) * op(B)` computed plainly, row-major.
    fn naive(ta: bool, tb: bool, a: &[f32], b: &[f32], [m, n, k]: [usize; 3]) -> Vec<f32> {
        let at = |i: usize, p: usize| if ta { a[p * m + i] } else { a[i * k + p] };
        let bt = |p: usize, j: usize| if tb { b[j * k + p] } else { b[p * n + j] };
        (0..m * n)
            .map(|ij| (0..k).map(|p| at(ij / n, p) * bt(p, ij % n)).sum())
            .collect()
    }

    #[test]
    fn the_row_by_row_fallback_matches_the_definition() {
        let (m, n, k) = (3usize, 4usize, 6usize);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 5) as f32 - 2.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.5).collect();
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let want = naive(ta, tb, &a, &b, [m, n, k]);
            let mut c = vec![0.0f32; m * n];
            let code = |t: bool| if t { TRANS } else { NO_TRANS };
            // SAFETY: the buffers hold the shapes described.
            unsafe {
                rows_by_sgemv(
                    sgemv().unwrap(),
                    ROW_MAJOR,
                    [code(ta), code(tb)],
                    [m as c_int, n as c_int, k as c_int],
                    1.0,
                    a.as_ptr(),
                    if ta { m } else { k } as c_int,
                    b.as_ptr(),
                    if tb { k } else { n } as c_int,
                    0.0,
                    c.as_mut_ptr(),
                    n as c_int,
                );
            }
            assert_eq!(c, want, "ta={ta} tb={tb}");
        }
    }

    #[test]
    fn single_row_products_match_the_definition_in_every_layout() {
        let (m, n, k) = (1usize, 7usize, 5usize);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 1.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 11) as f32 * 0.25).collect();
        for ta in [false, true] {
            for tb in [false, true] {
                let want = naive(ta, tb, &a, &b, [m, n, k]);
                let mut c = vec![1.0f32; m * n];
                let lda = if ta { m } else { k } as c_int;
                let ldb = if tb { k } else { n } as c_int;
                let code = |t: bool| if t { TRANS } else { NO_TRANS };
                // SAFETY: the buffers hold the shapes described.
                unsafe {
                    cblas_sgemm(
                        ROW_MAJOR,
                        code(ta),
                        code(tb),
                        m as c_int,
                        n as c_int,
                        k as c_int,
                        2.0,
                        a.as_ptr(),
                        lda,
                        b.as_ptr(),
                        ldb,
                        0.5,
                        c.as_mut_ptr(),
                        n as c_int,
                    );
                }
                for (got, want) in c.iter().zip(&want) {
                    assert!((got - (2.0 * want + 0.5)).abs() < 1e-4, "ta={ta} tb={tb}");
                }
            }
        }
    }
}
