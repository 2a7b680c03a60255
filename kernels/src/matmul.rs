//! Matrix products on the `gemm` crate (pure-Rust, runtime-dispatched AVX2/AVX-512/NEON
//! micro-kernels; chosen over `matrixmultiply` by the rates recorded in `docs/benchmarks.md`).
//!
//! This is the FFI boundary of the crate: `gemm::gemm` takes raw pointers and strides, so the
//! safe wrappers here prove that every access stays inside the borrowed slices.
#![allow(unsafe_code)]

use crate::{check_len, Result};

/// A read-only row-major matrix: `rows × cols` values, row `i` starting at `i * ld`.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl<'a> View<'a> {
    /// A dense `rows × cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        Self::strided(data, rows, cols, cols)
    }

    /// A matrix whose rows are `ld` values apart (`ld >= cols`), as in BLAS.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Result<Self> {
        if ld < cols {
            return Err(crate::Error::Param {
                op: "view",
                detail: format!("row stride {ld} is smaller than the row length {cols}"),
            });
        }
        check_len("view", "matrix", data.len(), extent(rows, cols, ld))?;
        Ok(Self { data, rows, cols, ld })
    }
}

fn extent(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * ld + cols
    }
}

/// `out[m, n] (+)= a[m, k] · b` where `b` is `[k, n]`, or `[n, k]` used transposed when
/// `transpose_b` (the PyTorch `Linear` layout). `out` rows are `out_ld` apart.
pub fn matmul(
    a: View<'_>,
    b: View<'_>,
    transpose_b: bool,
    out: &mut [f32],
    out_ld: usize,
    accumulate: bool,
) -> Result<()> {
    let (m, k) = (a.rows, a.cols);
    let (bk, n) = if transpose_b { (b.cols, b.rows) } else { (b.rows, b.cols) };
    if bk != k {
        return Err(crate::Error::Shape {
            op: "matmul",
            detail: format!("inner dimensions differ: a is [{m}, {k}], b gives {bk}"),
        });
    }
    if out_ld < n {
        return Err(crate::Error::Param {
            op: "matmul",
            detail: format!("output row stride {out_ld} is smaller than its {n} columns"),
        });
    }
    check_len("matmul", "output", out.len(), extent(m, n, out_ld))?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for row in out.chunks_mut(out_ld).take(m) {
                row[..n].fill(0.0);
            }
        }
        return Ok(());
    }
    // (column stride, row stride) of b as a [k, n] matrix.
    let (b_cs, b_rs) = if transpose_b { (b.ld, 1) } else { (1, b.ld) };
    // Threads pay off only once the product is large, and only when the caller is not
    // already one of the pool's tasks (the grouped expert FFN parallelises over experts).
    let parallelism = if m * n * k >= 1 << 21 && crate::pool::may_split() {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `View::strided` checked that a and b hold `extent(rows, cols, ld)` values and
    // the check above covers `out`; with these strides gemm reads a[i*a.ld + p],
    // b[p*b_rs + j*b_cs] and writes out[i*out_ld + j] for i < m, p < k, j < n only.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_ld as isize,
            accumulate,
            a.data.as_ptr(),
            1,
            a.ld as isize,
            b.data.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// `y[m, n] = x[m, k] · wᵀ` for a weight `w[n, k]` (PyTorch `Linear` without bias).
pub fn linear(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, y: &mut [f32]) -> Result<()> {
    matmul(View::new(x, m, k)?, View::new(w, n, k)?, true, y, n, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rel_err;
    use crate::rng::Rng;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, tb: bool) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| {
                        let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                        a[i * k + p] as f64 * bv as f64
                    })
                    .sum();
            }
        }
        out
    }

    #[test]
    fn matches_f64_reference_both_layouts_and_sizes() {
        let mut rng = Rng::new(7);
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (17, 64, 33), (130, 257, 129)] {
            let a = rng.vec(m * k);
            let b = rng.vec(k * n);
            for tb in [false, true] {
                let mut out = vec![0f32; m * n];
                let bv = if tb { View::new(&b, n, k) } else { View::new(&b, k, n) }.unwrap();
                matmul(View::new(&a, m, k).unwrap(), bv, tb, &mut out, n, false).unwrap();
                assert!(rel_err(&out, &naive(&a, &b, m, k, n, tb)) < 1e-6, "{m}x{k}x{n}");
            }
        }
    }

    #[test]
    fn strided_views_and_accumulation() {
        let mut rng = Rng::new(3);
        // a: 4 rows of 3 taken from rows of 5; out rows 10 apart, accumulated twice.
        let a_full = rng.vec(4 * 5);
        let b = rng.vec(3 * 2);
        let a: Vec<f32> = a_full.chunks(5).flat_map(|r| r[..3].to_vec()).collect();
        let mut out = vec![0f32; 3 * 10 + 2];
        for _ in 0..2 {
            let av = View::strided(&a_full, 4, 3, 5).unwrap();
            matmul(av, View::new(&b, 3, 2).unwrap(), false, &mut out, 10, true).unwrap();
        }
        let want = naive(&a, &b, 4, 3, 2, false);
        for i in 0..4 {
            for j in 0..2 {
                assert!((out[i * 10 + j] as f64 - 2.0 * want[i * 2 + j]).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn short_slices_are_refused() {
        let a = vec![0f32; 5];
        assert!(View::new(&a, 2, 3).is_err());
        let b = vec![0f32; 6];
        let mut out = vec![0f32; 3];
        let err = linear(&b, &b, 2, 3, 2, &mut out).unwrap_err();
        assert!(err.to_string().contains("output"), "{err}");
    }
}
