//! Top-r singular value decomposition of dense `f32` weight matrices.
//!
//! Used to initialise InnerPiSSA adapters: a linear layer's weight `W` has
//! shape `(d_out, d_in)` (PyTorch convention `y = x W^T`), stored row-major.
//! [`top_r_svd`] returns `U` (`d_out x r`), `S` (`r`, descending) and `V`
//! (`d_in x r`) with `W ≈ U diag(S) V^T`. By Eckart–Young this rank-r
//! truncation is the best rank-r approximation of `W` in Frobenius (and
//! spectral) norm, with `‖W - U diag(S) V^T‖_F = sqrt(Σ_{i>r} σ_i²)`.
//!
//! # Algorithm and precision
//!
//! A thin SVD is computed with `faer` (Householder bidiagonalisation + divide
//! and conquer, with a QR pre-reduction when the matrix is tall/wide by more
//! than 11/6), then the leading `r` triplets are kept. A full thin SVD followed
//! by truncation is used rather than a randomized/iterative top-r method, since
//! weight spectra are fairly flat and randomized methods lose accuracy on the
//! tail of the kept subspace (see `benches/bench_svd.py`).
//!
//! The working precision is a parameter ([`Precision`]); inputs and outputs
//! are always `f32`. The default, [`Precision::F64`], widens the input to
//! `f64` and only rounds at the very end, so outputs are accurate to `f32`
//! resolution — better than `torch.linalg.svd` in `float32` — and almost
//! independent of the thread count: faer's sequential and parallel blockings
//! differ only in the last `f64` bits, so after rounding only a handful of
//! entries can change, by one `f32` ulp. [`Precision::F32`] computes natively
//! in `f32` and is about 1.5–2x faster, but about 10x less accurate than
//! LAPACK's `sgesdd` (what `torch.linalg.svd` uses in `float32`): relative
//! singular-value error ~1e-5 (vs ~1e-6) and singular-vector entry error
//! ~1e-4 (vs ~1e-5) on SmolLM2-sized matrices. The adapter basis is computed
//! once per model, so we default to accuracy and reproducibility.
//!
//! # Signs
//!
//! Singular vectors are only defined up to a joint sign flip of `(u_j, v_j)`.
//! We make them deterministic: each pair is flipped so that the entry of
//! largest absolute value in `u_j` is positive (first such entry on ties).
//!
//! # Threads
//!
//! All parallelism goes through rayon's *global* pool, whose size honours the
//! `RAYON_NUM_THREADS` environment variable (read once, when the pool is
//! first used). To avoid nested oversubscription we never run faer's internal
//! parallelism *and* a parallel loop over matrices at the same time:
//!
//! * [`top_r_svd`] (one matrix) lets faer use the whole pool.
//! * [`top_r_svd_batch`] runs matrices in parallel with a sequential faer
//!   inside each task when there are at least as many matrices as threads;
//!   with fewer matrices than threads it loops over them one by one and lets
//!   faer parallelise each decomposition instead.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::{self as faer_svd, ComputeSvdVectors};
use faer::prelude::default;
use faer::Mat;
pub use faer::Par;
use rayon::prelude::*;
use std::fmt;

/// A borrowed row-major `f32` matrix of shape `(d_out, d_in)`.
#[derive(Debug, Clone, Copy)]
pub struct MatrixView<'a> {
    /// Row-major data, `data[i * d_in + j] = W[i, j]`; length `d_out * d_in`.
    pub data: &'a [f32],
    /// Number of rows (output features).
    pub d_out: usize,
    /// Number of columns (input features).
    pub d_in: usize,
}

impl<'a> MatrixView<'a> {
    /// Wraps a row-major slice. Shape is checked by the SVD functions.
    pub fn new(data: &'a [f32], d_out: usize, d_in: usize) -> Self {
        Self { data, d_out, d_in }
    }
}

/// Rank-r truncated SVD `W ≈ U diag(S) V^T`, all buffers row-major `f32`.
#[derive(Debug, Clone, PartialEq)]
pub struct TopRSvd {
    /// Rows of `W`.
    pub d_out: usize,
    /// Columns of `W`.
    pub d_in: usize,
    /// Number of kept singular triplets.
    pub r: usize,
    /// Left singular vectors, `d_out x r` row-major: `u[i * r + k] = U[i, k]`.
    pub u: Vec<f32>,
    /// Singular values, length `r`, non-increasing, non-negative.
    pub s: Vec<f32>,
    /// Right singular vectors, `d_in x r` row-major: `v[j * r + k] = V[j, k]`.
    pub v: Vec<f32>,
}

/// Working precision of the decomposition (inputs and outputs are `f32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Compute natively in `f32`: faster, singular vectors accurate to ~1e-4.
    F32,
    /// Widen to `f64`, round the results to `f32` at the end (default).
    #[default]
    F64,
}

/// Why a decomposition was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvdError {
    /// `r` must satisfy `1 <= r <= min(d_out, d_in)`.
    InvalidRank { r: usize, d_out: usize, d_in: usize },
    /// `data.len() != d_out * d_in`.
    ShapeMismatch { len: usize, d_out: usize, d_in: usize },
    /// The matrix contains NaN or ±inf.
    NonFinite,
    /// faer's iterative solver did not converge.
    NoConvergence,
}

impl fmt::Display for SvdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SvdError::InvalidRank { r, d_out, d_in } => write!(
                f,
                "r must satisfy 1 <= r <= min(d_out, d_in) = {}, got r={} for a {}x{} matrix",
                d_out.min(d_in),
                r,
                d_out,
                d_in
            ),
            SvdError::ShapeMismatch { len, d_out, d_in } => {
                write!(f, "buffer of length {len} does not hold a {d_out}x{d_in} matrix ({} elements)", d_out * d_in)
            }
            SvdError::NonFinite => write!(f, "matrix contains NaN or infinite values"),
            SvdError::NoConvergence => write!(f, "SVD did not converge"),
        }
    }
}

impl std::error::Error for SvdError {}

/// An error in [`top_r_svd_batch`], tagged with the index of the matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    /// Position of the offending matrix in the input slice.
    pub index: usize,
    /// What went wrong with it.
    pub error: SvdError,
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "matrix {}: {}", self.index, self.error)
    }
}

impl std::error::Error for BatchError {}

fn validate(w: &MatrixView<'_>, r: usize) -> Result<(), SvdError> {
    let MatrixView { data, d_out, d_in } = *w;
    if d_out.checked_mul(d_in) != Some(data.len()) {
        return Err(SvdError::ShapeMismatch { len: data.len(), d_out, d_in });
    }
    if r == 0 || r > d_out.min(d_in) {
        return Err(SvdError::InvalidRank { r, d_out, d_in });
    }
    if !data.iter().all(|x| x.is_finite()) {
        return Err(SvdError::NonFinite);
    }
    Ok(())
}

/// Top-r SVD of one matrix, letting faer use the whole rayon pool.
///
/// Returns `U` (`d_out x r`), `S` (`r`), `V` (`d_in x r`) with
/// `W ≈ U diag(S) V^T`; see the module docs for precision, sign convention
/// and threading.
pub fn top_r_svd(w: MatrixView<'_>, r: usize, precision: Precision) -> Result<TopRSvd, SvdError> {
    top_r_svd_with_par(w, r, pool_par(), precision)
}

/// Like [`top_r_svd`], with an explicit faer parallelism setting.
pub fn top_r_svd_with_par(w: MatrixView<'_>, r: usize, par: Par, precision: Precision) -> Result<TopRSvd, SvdError> {
    validate(&w, r)?;
    compute(w, r, par, precision)
}

/// Top-r SVD of many matrices (shapes may differ), in parallel.
///
/// All inputs are validated before any work starts; the first invalid one is
/// reported with its index. Output order matches input order, and each result
/// is identical to what [`top_r_svd`] returns for that matrix up to the last
/// bits of floating point (faer's blocking can differ between sequential and
/// parallel runs).
pub fn top_r_svd_batch(ws: &[MatrixView<'_>], r: usize, precision: Precision) -> Result<Vec<TopRSvd>, BatchError> {
    for (index, w) in ws.iter().enumerate() {
        validate(w, r).map_err(|error| BatchError { index, error })?;
    }
    let threads = rayon::current_num_threads();
    let tag = |index: usize| move |error: SvdError| BatchError { index, error };
    if threads > 1 && ws.len() >= threads {
        // Outer parallelism only: one sequential faer SVD per rayon task.
        ws.par_iter().enumerate().map(|(i, w)| compute(*w, r, Par::Seq, precision).map_err(tag(i))).collect()
    } else {
        // Few matrices: parallelise inside each decomposition instead.
        let par = pool_par();
        ws.iter().enumerate().map(|(i, w)| compute(*w, r, par, precision).map_err(tag(i))).collect()
    }
}

fn pool_par() -> Par {
    match rayon::current_num_threads() {
        0 | 1 => Par::Seq,
        n => Par::rayon(n),
    }
}

/// The two working precisions, as faer scalars.
trait Work: faer::traits::RealField + Copy {
    fn from_f32(x: f32) -> Self;
    fn to_f64(self) -> f64;
}
impl Work for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}
impl Work for f64 {
    fn from_f32(x: f32) -> Self {
        x as f64
    }
    fn to_f64(self) -> f64 {
        self
    }
}

/// Assumes `validate` passed.
fn compute(w: MatrixView<'_>, r: usize, par: Par, precision: Precision) -> Result<TopRSvd, SvdError> {
    match precision {
        Precision::F32 => compute_in::<f32>(w, r, par),
        Precision::F64 => compute_in::<f64>(w, r, par),
    }
}

fn compute_in<T: Work>(w: MatrixView<'_>, r: usize, par: Par) -> Result<TopRSvd, SvdError> {
    let MatrixView { data, d_out, d_in } = w;
    // A row-major W (d_out x d_in) is, byte for byte, a column-major W^T
    // (d_in x d_out). faer prefers column-major, so we decompose
    // A = W^T = P diag(S) Q^T and read off U = Q, V = P. The copy into `a`
    // walks `data` sequentially (and widens it when T = f64).
    let a = Mat::<T>::from_fn(d_in, d_out, |i, j| T::from_f32(data[j * d_in + i]));
    let k = d_out.min(d_in);
    let mut s = faer::diag::Diag::<T>::zeros(k);
    let mut p = Mat::<T>::zeros(d_in, k); // left vectors of W^T = V of W
    let mut q = Mat::<T>::zeros(d_out, k); // right vectors of W^T = U of W
    let req = faer_svd::svd_scratch::<T>(d_in, d_out, ComputeSvdVectors::Thin, ComputeSvdVectors::Thin, par, default());
    let mut buf = MemBuffer::new(req);
    faer_svd::svd(a.as_ref(), s.as_mut(), Some(p.as_mut()), Some(q.as_mut()), par, MemStack::new(&mut buf), default())
        .map_err(|_| SvdError::NoConvergence)?;
    drop(buf);

    let s: Vec<f64> = s.column_vector().iter().map(|x| x.to_f64()).collect();
    // faer documents non-increasing order; sort defensively (stable, so ties
    // keep faer's order) in case a future version changes that.
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&x, &y| s[y].total_cmp(&s[x]));
    let order = &order[..r];

    let mut u_out = vec![0f32; d_out * r];
    let mut v_out = vec![0f32; d_in * r];
    let mut s_out = Vec::with_capacity(r);
    for (c, &src) in order.iter().enumerate() {
        let qc = q.col(src);
        let pc = p.col(src);
        // Sign convention: largest-|.| entry of u_c is positive (first on ties).
        let mut arg = 0;
        let mut best = -1.0f64;
        for (i, x) in qc.iter().enumerate() {
            let x = x.to_f64().abs();
            if x > best {
                best = x;
                arg = i;
            }
        }
        let sign = if qc[arg].to_f64() < 0.0 { -1.0 } else { 1.0 };
        for (i, x) in qc.iter().enumerate() {
            u_out[i * r + c] = (sign * x.to_f64()) as f32;
        }
        for (j, x) in pc.iter().enumerate() {
            v_out[j * r + c] = (sign * x.to_f64()) as f32;
        }
        s_out.push(s[src].max(0.0) as f32);
    }
    Ok(TopRSvd { d_out, d_in, r, u: u_out, s: s_out, v: v_out })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic PRNG (xorshift64*), mapped to roughly N(0, 1) by
    /// summing uniforms; good enough for test matrices.
    struct Rng(u64);
    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            (0..12).map(|_| self.uniform()).sum::<f64>() - 6.0
        }
    }

    fn random(d_out: usize, d_in: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        (0..d_out * d_in).map(|_| rng.normal() as f32).collect()
    }

    /// Matrix with a prescribed, decaying spectrum: U0 diag(s) V0^T built from
    /// products of random matrices is overkill; instead scale random columns.
    fn decaying(d_out: usize, d_in: usize, seed: u64) -> Vec<f32> {
        let mut w = random(d_out, d_in, seed);
        for i in 0..d_out {
            for j in 0..d_in {
                w[i * d_in + j] *= 1.0 / (1.0 + j as f32).sqrt();
            }
        }
        w
    }

    fn frob(x: &[f32]) -> f64 {
        x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt()
    }

    /// `W - U diag(S) V^T` in f64, returned as f32 for `frob`.
    fn residual(w: &[f32], d: &TopRSvd) -> Vec<f32> {
        let (m, n, r) = (d.d_out, d.d_in, d.r);
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0f64;
                for k in 0..r {
                    acc += d.u[i * r + k] as f64 * d.s[k] as f64 * d.v[j * r + k] as f64;
                }
                out[i * n + j] = (w[i * n + j] as f64 - acc) as f32;
            }
        }
        out
    }

    /// max |X^T X - I| for a row-major rows x r matrix.
    fn orthonormality_defect(x: &[f32], rows: usize, r: usize) -> f64 {
        let mut worst = 0f64;
        for a in 0..r {
            for b in 0..r {
                let dot: f64 = (0..rows).map(|i| x[i * r + a] as f64 * x[i * r + b] as f64).sum();
                let target = if a == b { 1.0 } else { 0.0 };
                worst = worst.max((dot - target).abs());
            }
        }
        worst
    }

    const SHAPES: &[(usize, usize)] = &[(40, 40), (64, 24), (24, 64), (150, 7), (7, 150), (1, 9), (9, 1), (130, 140)];
    const PRECISIONS: [Precision; 2] = [Precision::F64, Precision::F32];

    /// Tolerance relative to ‖W‖ (or to 1 for orthonormality).
    fn tol(p: Precision) -> f64 {
        match p {
            Precision::F64 => 1e-6,
            Precision::F32 => 2e-5,
        }
    }

    fn svd(w: &[f32], m: usize, n: usize, r: usize, p: Precision) -> TopRSvd {
        top_r_svd(MatrixView::new(w, m, n), r, p).unwrap()
    }

    #[test]
    fn full_rank_reconstructs_exactly() {
        for p in PRECISIONS {
            for (seed, &(m, n)) in SHAPES.iter().enumerate() {
                let w = random(m, n, seed as u64);
                let d = svd(&w, m, n, m.min(n), p);
                let rel = frob(&residual(&w, &d)) / frob(&w);
                assert!(rel < tol(p), "{p:?} {m}x{n}: relative reconstruction error {rel}");
            }
        }
    }

    #[test]
    fn columns_are_orthonormal() {
        for p in PRECISIONS {
            for (seed, &(m, n)) in SHAPES.iter().enumerate() {
                let w = random(m, n, 100 + seed as u64);
                for r in [1, m.min(n).div_ceil(2), m.min(n)] {
                    let d = svd(&w, m, n, r, p);
                    assert_eq!((d.u.len(), d.s.len(), d.v.len()), (m * r, r, n * r));
                    // f32 outputs: even exact vectors are rounded to ~6e-8.
                    assert!(orthonormality_defect(&d.u, m, r) < 10.0 * tol(p), "{p:?} U {m}x{n} r={r}");
                    assert!(orthonormality_defect(&d.v, n, r) < 10.0 * tol(p), "{p:?} V {m}x{n} r={r}");
                }
            }
        }
    }

    #[test]
    fn singular_values_descending_and_nonnegative() {
        for p in PRECISIONS {
            for (seed, &(m, n)) in SHAPES.iter().enumerate() {
                let w = decaying(m, n, 200 + seed as u64);
                let d = svd(&w, m, n, m.min(n), p);
                assert!(d.s.windows(2).all(|q| q[0] >= q[1]), "{:?}", d.s);
                assert!(d.s.iter().all(|&x| x >= 0.0));
            }
        }
    }

    #[test]
    fn truncation_error_is_eckart_young() {
        for p in PRECISIONS {
            for (seed, &(m, n)) in SHAPES.iter().enumerate() {
                let k = m.min(n);
                let w = decaying(m, n, 300 + seed as u64);
                let full = svd(&w, m, n, k, p);
                for r in [1, 2, k / 3, k / 2, k - 1, k].into_iter().filter(|&r| r >= 1 && r <= k) {
                    let d = svd(&w, m, n, r, p);
                    let err = frob(&residual(&w, &d));
                    let tail: f64 = full.s[r..].iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
                    assert!(
                        (err - tail).abs() <= 10.0 * tol(p) * frob(&w),
                        "{p:?} {m}x{n} r={r}: err {err} vs tail {tail}"
                    );
                    assert_eq!(&d.s[..], &full.s[..r]);
                }
            }
        }
    }

    #[test]
    fn precisions_agree() {
        for (seed, &(m, n)) in SHAPES.iter().enumerate() {
            let w = decaying(m, n, 600 + seed as u64);
            let r = m.min(n).div_ceil(3);
            let a = svd(&w, m, n, r, Precision::F64);
            let b = svd(&w, m, n, r, Precision::F32);
            for (x, y) in a.s.iter().zip(&b.s) {
                assert!(((x - y) / a.s[0]).abs() < 1e-5, "{m}x{n}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn known_spectrum() {
        // diag(3, 2, 1) padded to 3x5 with a negative entry to exercise signs.
        let w = [
            0.0, -3.0, 0.0, 0.0, 0.0, //
            2.0, 0.0, 0.0, 0.0, 0.0, //
            0.0, 0.0, 0.0, 0.0, 1.0,
        ];
        for p in PRECISIONS {
            let d = svd(&w, 3, 5, 3, p);
            assert_eq!(d.s, vec![3.0, 2.0, 1.0]);
            // u_0 = e_0 with positive sign, so v_0 = -e_1.
            assert!((d.u[0] - 1.0).abs() < 1e-7 && (d.v[3] + 1.0).abs() < 1e-7, "{d:?}");
        }
    }

    #[test]
    fn sign_convention() {
        for p in PRECISIONS {
            for (seed, &(m, n)) in SHAPES.iter().enumerate() {
                let w = random(m, n, 400 + seed as u64);
                let r = m.min(n);
                let d = svd(&w, m, n, r, p);
                for c in 0..r {
                    let col: Vec<f32> = (0..m).map(|i| d.u[i * r + c]).collect();
                    let big = col.iter().copied().fold(0f32, |acc, x| if x.abs() > acc.abs() { x } else { acc });
                    assert!(big > 0.0, "{p:?} {m}x{n} column {c}: {col:?}");
                }
            }
        }
    }

    #[test]
    fn batch_matches_single() {
        let shapes = [(30, 20), (20, 30), (25, 25), (40, 10), (12, 12)];
        let data: Vec<Vec<f32>> = shapes.iter().enumerate().map(|(s, &(m, n))| random(m, n, 500 + s as u64)).collect();
        let views: Vec<MatrixView<'_>> = data.iter().zip(shapes).map(|(d, (m, n))| MatrixView::new(d, m, n)).collect();
        let r = 5;
        for p in PRECISIONS {
            let batch = top_r_svd_batch(&views, r, p).unwrap();
            assert_eq!(batch.len(), views.len());
            for (b, v) in batch.iter().zip(&views) {
                let single = top_r_svd_with_par(*v, r, Par::Seq, p).unwrap();
                assert_eq!((b.d_out, b.d_in, b.r), (v.d_out, v.d_in, r));
                for (x, y) in b.s.iter().zip(&single.s) {
                    assert!((((x - y) / single.s[0]).abs() as f64) <= tol(p));
                }
                for (x, y) in b.u.iter().chain(&b.v).zip(single.u.iter().chain(&single.v)) {
                    assert!(((x - y).abs() as f64) < 10.0 * tol(p));
                }
            }
            assert!(top_r_svd_batch(&[], 3, p).unwrap().is_empty());
        }
    }

    #[test]
    fn errors() {
        let w = random(4, 6, 7);
        for r in [0, 5, 100] {
            assert_eq!(
                top_r_svd(MatrixView::new(&w, 4, 6), r, Precision::F64),
                Err(SvdError::InvalidRank { r, d_out: 4, d_in: 6 })
            );
        }
        assert_eq!(
            top_r_svd(MatrixView::new(&w, 5, 6), 2, Precision::F64),
            Err(SvdError::ShapeMismatch { len: 24, d_out: 5, d_in: 6 })
        );
        let mut bad = w.clone();
        bad[3] = f32::NAN;
        assert_eq!(top_r_svd(MatrixView::new(&bad, 4, 6), 2, Precision::F64), Err(SvdError::NonFinite));
        let views = [MatrixView::new(&w, 4, 6), MatrixView::new(&bad, 4, 6)];
        let e = top_r_svd_batch(&views, 2, Precision::F64).unwrap_err();
        assert_eq!(e, BatchError { index: 1, error: SvdError::NonFinite });
        assert!(e.to_string().starts_with("matrix 1:"));
        assert!(top_r_svd(MatrixView::new(&[], 0, 3), 1, Precision::F64).is_err());
    }
}
