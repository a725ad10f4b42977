//! `innerpissa._rust`: thin pyo3 bindings over `innerpissa-core`.
//!
//! Only array/argument translation and error mapping live here; the numerics
//! (and their tests) are in `rust/core`. Computations run with the GIL
//! released.

use innerpissa_core::svd::{self, BatchError, MatrixView, Precision, SvdError, TopRSvd};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

type SvdTuple<'py> = (
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray2<f32>>,
);

/// A 2-D float32 input, borrowed when C-contiguous, copied otherwise.
struct Input<'py> {
    array: PyReadonlyArrayDyn<'py, f32>,
    copy: Option<Vec<f32>>,
}

impl Input<'_> {
    fn view(&self) -> MatrixView<'_> {
        let data = match &self.copy {
            Some(v) => v.as_slice(),
            None => self.array.as_slice().expect("checked C-contiguous"),
        };
        MatrixView::new(data, self.array.shape()[0], self.array.shape()[1])
    }
}

fn input<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Input<'py>> {
    let array: PyReadonlyArrayDyn<'py, f32> = obj.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what}: expected a numpy float32 array, got {}",
            describe(obj)
        ))
    })?;
    if array.ndim() != 2 {
        return Err(PyValueError::new_err(format!(
            "{what}: expected a 2-D array, got {} dimension(s) with shape {:?}",
            array.ndim(),
            array.shape()
        )));
    }
    // The core wants row-major data. `as_slice` also accepts Fortran order,
    // so test C-contiguity explicitly; anything else is copied in logical
    // (row-major) order.
    let copy = if array.is_c_contiguous() {
        None
    } else {
        Some(array.as_array().iter().copied().collect())
    };
    Ok(Input { array, copy })
}

fn describe(obj: &Bound<'_, PyAny>) -> String {
    match obj.getattr("dtype") {
        Ok(dtype) => format!("{} with dtype {}", obj.get_type(), dtype),
        Err(_) => obj.get_type().to_string(),
    }
}

/// Negative ranks are refused here (they do not fit a `usize`); zero and
/// too-large ranks are refused by the core, whose message names the shape.
fn rank(r: i64) -> PyResult<usize> {
    usize::try_from(r).map_err(|_| {
        PyValueError::new_err(format!(
            "r must satisfy 1 <= r <= min(d_out, d_in), got r={r}"
        ))
    })
}

fn precision(name: &str) -> PyResult<Precision> {
    match name {
        "float64" | "f64" => Ok(Precision::F64),
        "float32" | "f32" => Ok(Precision::F32),
        _ => Err(PyValueError::new_err(format!(
            "precision must be 'float64' or 'float32', got {name:?}"
        ))),
    }
}

fn svd_err(prefix: &str, e: &SvdError) -> PyErr {
    let msg = format!("{prefix}{e}");
    match e {
        SvdError::NoConvergence => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

fn to_numpy<'py>(py: Python<'py>, d: TopRSvd) -> SvdTuple<'py> {
    let u = Array2::from_shape_vec((d.d_out, d.r), d.u).expect("core returns d_out*r");
    let v = Array2::from_shape_vec((d.d_in, d.r), d.v).expect("core returns d_in*r");
    (u.into_pyarray(py), d.s.into_pyarray(py), v.into_pyarray(py))
}

/// top_r_svd(w, r, *, precision="float64") -> (U, S, V)
///
/// Top-r SVD of one float32 matrix `w` of shape (d_out, d_in):
/// U (d_out, r), S (r,) descending, V (d_in, r), all float32, with
/// w ≈ U @ diag(S) @ V.T. The largest-|.| entry of each U column is positive.
/// Raises ValueError for non-2-D input or r outside [1, min(d_out, d_in)],
/// TypeError for non-float32 input.
#[pyfunction]
#[pyo3(signature = (w, r, *, precision = "float64"))]
fn top_r_svd<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    r: i64,
    precision: &str,
) -> PyResult<SvdTuple<'py>> {
    let (r, p) = (rank(r)?, self::precision(precision)?);
    let x = input(w, "w")?;
    let view = x.view();
    let out = py
        .detach(|| svd::top_r_svd(view, r, p))
        .map_err(|e| svd_err("", &e))?;
    Ok(to_numpy(py, out))
}

/// top_r_svd_batch(ws, r, *, precision="float64") -> list[(U, S, V)]
///
/// `top_r_svd` for every float32 2-D array in `ws` (shapes may differ),
/// computed in parallel on the rayon pool (RAYON_NUM_THREADS). Every input is
/// validated before any work starts; errors name the offending index.
#[pyfunction]
#[pyo3(signature = (ws, r, *, precision = "float64"))]
fn top_r_svd_batch<'py>(
    py: Python<'py>,
    ws: Vec<Bound<'py, PyAny>>,
    r: i64,
    precision: &str,
) -> PyResult<Vec<SvdTuple<'py>>> {
    let (r, p) = (rank(r)?, self::precision(precision)?);
    let inputs = ws
        .iter()
        .enumerate()
        .map(|(i, w)| input(w, &format!("ws[{i}]")))
        .collect::<PyResult<Vec<_>>>()?;
    let views: Vec<MatrixView<'_>> = inputs.iter().map(Input::view).collect();
    let out = py
        .detach(|| svd::top_r_svd_batch(&views, r, p))
        .map_err(|BatchError { index, error }| svd_err(&format!("ws[{index}]: "), &error))?;
    Ok(out.into_iter().map(|d| to_numpy(py, d)).collect())
}

/// Native extension of innerpissa (Rust, via pyo3).
#[pymodule]
fn _rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(top_r_svd, m)?)?;
    m.add_function(wrap_pyfunction!(top_r_svd_batch, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
