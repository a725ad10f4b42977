//! `innerpissa._rust`: thin pyo3 bindings over `innerpissa-core`.
//!
//! Only array/argument translation and error mapping live here; the numerics
//! (and their tests) are in `rust/core`. Computations run with the GIL
//! released.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use innerpissa_core::engine::{ControlVector, Engine, EngineError, LowRankAdapter, Steer, WeightMode};
use innerpissa_core::svd::{self, BatchError, MatrixView, Precision, SvdError, TopRSvd};
use numpy::ndarray::{Array2, Array4};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArray4, PyReadonlyArray1, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Run the body of a Python entry point with panics caught: a panic (a bug: every input error is meant to be a
/// `Result`) becomes a `RuntimeError` instead of pyo3's `PanicException`, which derives from `BaseException` and
/// so escapes `except Exception`. Rayon re-raises worker-thread panics on the calling thread, so those are
/// caught here too.
fn guard<T>(body: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        Err(PyRuntimeError::new_err(format!("innerpissa engine internal error: {msg}; please report")))
    })
}

type SvdTuple<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray1<f32>>, Bound<'py, PyArray2<f32>>);

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
    let array: PyReadonlyArrayDyn<'py, f32> = obj
        .extract()
        .map_err(|_| PyTypeError::new_err(format!("{what}: expected a numpy float32 array, got {}", describe(obj))))?;
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
    let copy = if array.is_c_contiguous() { None } else { Some(array.as_array().iter().copied().collect()) };
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
    usize::try_from(r)
        .map_err(|_| PyValueError::new_err(format!("r must satisfy 1 <= r <= min(d_out, d_in), got r={r}")))
}

fn precision(name: &str) -> PyResult<Precision> {
    match name {
        "float64" | "f64" => Ok(Precision::F64),
        "float32" | "f32" => Ok(Precision::F32),
        _ => Err(PyValueError::new_err(format!("precision must be 'float64' or 'float32', got {name:?}"))),
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
fn top_r_svd<'py>(py: Python<'py>, w: &Bound<'py, PyAny>, r: i64, precision: &str) -> PyResult<SvdTuple<'py>> {
    guard(|| {
        let (r, p) = (rank(r)?, self::precision(precision)?);
        let x = input(w, "w")?;
        let view = x.view();
        let out = py.detach(|| svd::top_r_svd(view, r, p)).map_err(|e| svd_err("", &e))?;
        Ok(to_numpy(py, out))
    })
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
    guard(|| {
        let (r, p) = (rank(r)?, self::precision(precision)?);
        let inputs = ws.iter().enumerate().map(|(i, w)| input(w, &format!("ws[{i}]"))).collect::<PyResult<Vec<_>>>()?;
        let views: Vec<MatrixView<'_>> = inputs.iter().map(Input::view).collect();
        let out = py
            .detach(|| svd::top_r_svd_batch(&views, r, p))
            .map_err(|BatchError { index, error }| svd_err(&format!("ws[{index}]: "), &error))?;
        Ok(out.into_iter().map(|d| to_numpy(py, d)).collect())
    })
}

fn engine_err(e: EngineError) -> PyErr {
    match e {
        EngineError::Io(s) => PyFileNotFoundError::new_err(s),
        EngineError::Format(s) | EngineError::Input(s) => PyValueError::new_err(s),
        EngineError::Candle(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

/// Branch.base(), Branch.adapter(c), Branch.vector(c, index)
///
/// What one set of rows of a pass runs: the unsteered model, the loaded adapter at steering coefficient c, or
/// control vector `index` (from add_control_vector) added as c·v. Immutable, comparable and hashable.
#[pyclass(name = "Branch", frozen, eq, hash)]
#[derive(Clone, PartialEq)]
struct PyBranch {
    inner: Steer,
}

impl std::hash::Hash for PyBranch {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        match self.inner {
            Steer::Base => 0u8.hash(h),
            Steer::Adapter(c) => (1u8, c.to_bits()).hash(h),
            Steer::Vector { index, coeff } => (2u8, index, coeff.to_bits()).hash(h),
        }
    }
}

#[pymethods]
impl PyBranch {
    /// The unsteered model.
    #[staticmethod]
    fn base() -> Self {
        Self { inner: Steer::Base }
    }

    /// The loaded adapter at steering coefficient `c` (c = 0 is the base model exactly).
    #[staticmethod]
    fn adapter(c: f64) -> PyResult<Self> {
        if !c.is_finite() {
            return Err(PyValueError::new_err(format!("Branch.adapter: the coefficient must be finite, got {c}")));
        }
        Ok(Self { inner: Steer::Adapter(c) })
    }

    /// Control vector `index` (from Engine.add_control_vector) added to block outputs as c·v.
    #[staticmethod]
    fn vector(c: f32, index: usize) -> PyResult<Self> {
        if !c.is_finite() {
            return Err(PyValueError::new_err(format!("Branch.vector: the coefficient must be finite, got {c}")));
        }
        Ok(Self { inner: Steer::Vector { index, coeff: c } })
    }

    fn __repr__(&self) -> String {
        match self.inner {
            Steer::Base => "Branch.base()".into(),
            Steer::Adapter(c) => format!("Branch.adapter({c})"),
            Steer::Vector { index, coeff } => format!("Branch.vector({coeff}, {index})"),
        }
    }
}

/// A branch from Python: a [`PyBranch`], or the tuple form ("base",), ("adapter", c), ("vector", c, index).
fn steer(spec: &Bound<'_, PyAny>) -> PyResult<Steer> {
    if let Ok(b) = spec.extract::<PyRef<'_, PyBranch>>() {
        return Ok(b.inner);
    }
    let t: Vec<Bound<'_, PyAny>> = spec
        .extract()
        .map_err(|_| PyTypeError::new_err("a branch is a Branch (Branch.base(), .adapter(c), .vector(c, index))"))?;
    let kind: String = t.first().ok_or_else(|| PyValueError::new_err("empty branch tuple"))?.extract()?;
    match (kind.as_str(), t.len()) {
        ("base", 1) => Ok(Steer::Base),
        ("adapter", 2) => Ok(Steer::Adapter(t[1].extract::<f64>()?)),
        ("vector", 3) => Ok(Steer::Vector { coeff: t[1].extract::<f32>()?, index: t[2].extract::<usize>()? }),
        _ => Err(PyValueError::new_err(format!(
            "bad branch {kind:?} with {} fields: use ('base',), ('adapter', c) or ('vector', c, index)",
            t.len()
        ))),
    }
}

/// Two float64 matrices of the same shape (yes_no's scores and mass).
type ArrayPair<'py> = (Bound<'py, PyArray2<f64>>, Bound<'py, PyArray2<f64>>);

fn steers(branches: &[Bound<'_, PyAny>]) -> PyResult<Vec<Steer>> {
    branches.iter().map(steer).collect()
}

/// Engine(path, weights="f32", device="cpu")
///
/// A GGUF decoder (Llama family or Gemma 3) for coefficient sweeps. `weights`: "f32" (de-quantized at load:
/// the same weights transformers uses), "native" (the file's quantized blocks) or "q8_0" (re-quantized to int8
/// blocks). Sequences are lists of token ids (no special tokens are added). Branches are Branch objects
/// (or the tuples ("base",), ("adapter", c), ("vector", c, index)). All work runs with the GIL released on the rayon pool
/// (RAYON_NUM_THREADS / CANDLE_NUM_THREADS).
#[pyclass(name = "Engine")]
struct PyEngine {
    inner: Engine,
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (path, weights = "f32", device = "cpu"))]
    fn new(py: Python<'_>, path: PathBuf, weights: &str, device: &str) -> PyResult<Self> {
        guard(|| {
            let mode = WeightMode::parse(weights).map_err(engine_err)?;
            let inner = py.detach(|| Engine::load(&path, mode, device)).map_err(engine_err)?;
            Ok(Self { inner })
        })
    }

    /// Model hyper-parameters as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        guard(|| {
            let c = &self.inner.model.cfg;
            let d = PyDict::new(py);
            d.set_item("arch", format!("{:?}", c.arch).to_lowercase())?;
            d.set_item("n_layer", c.n_layer)?;
            d.set_item("d_model", c.d_model)?;
            d.set_item("n_head", c.n_head)?;
            d.set_item("n_kv_head", c.n_kv_head)?;
            d.set_item("head_dim", c.head_dim)?;
            d.set_item("d_ff", c.d_ff)?;
            d.set_item("vocab", c.vocab)?;
            d.set_item("weights", format!("{:?}", self.inner.model.weights).to_lowercase())?;
            Ok(d)
        })
    }

    /// load_adapter(directory) -> list of target module names. Reads adapter_config.json and
    /// adapter_model.safetensors (U, S, V, theta, delta); raises FileNotFoundError / ValueError naming the field.
    fn load_adapter(&mut self, py: Python<'_>, directory: PathBuf) -> PyResult<Vec<String>> {
        guard(|| {
            let a = py.detach(|| LowRankAdapter::load(&directory)).map_err(engine_err)?;
            let names = a.layers.iter().map(|l| l.name.clone()).collect();
            self.inner.set_adapter(a).map_err(engine_err)?;
            Ok(names)
        })
    }

    /// steer_matrix(name, c) -> M(c) (r, r) float64 of the loaded adapter's layer `name`.
    fn steer_matrix<'py>(&self, py: Python<'py>, name: &str, c: f64) -> PyResult<Bound<'py, PyArray2<f64>>> {
        guard(|| {
            let a = self.inner.adapter().ok_or_else(|| PyValueError::new_err("no adapter loaded"))?;
            let l = a
                .layers
                .iter()
                .find(|l| l.name == name)
                .ok_or_else(|| PyValueError::new_err(format!("adapter has no layer {name:?}")))?;
            let m = l.steer_matrix(c, a.multiplicative, a.rotation);
            Ok(Array2::from_shape_vec((l.r, l.r), m).expect("r*r").into_pyarray(py))
        })
    }

    /// add_control_vector({block: direction (d,) float32}) -> index for ("vector", c, index) branches.
    fn add_control_vector(&mut self, directions: HashMap<usize, PyReadonlyArray1<'_, f32>>) -> PyResult<usize> {
        guard(|| {
            let mut dirs: Vec<(usize, Vec<f32>)> =
                directions.into_iter().map(|(l, v)| (l, v.as_array().iter().copied().collect())).collect();
            dirs.sort_by_key(|d| d.0);
            self.inner.add_control_vector(ControlVector { directions: dirs }).map_err(engine_err)
        })
    }

    fn clear_control_vectors(&mut self) -> PyResult<()> {
        guard(|| {
            self.inner.clear_control_vectors();
            Ok(())
        })
    }

    /// yes_no(seqs, branches, pos_ids, neg_ids, batch=64) -> (scores, mass), each (len(branches), len(seqs))
    /// float64: log-odds logsumexp(log p[pos]) − logsumexp(log p[neg]) in nats at each sequence's last
    /// position, and the probability mass p(pos) + p(neg).
    #[pyo3(signature = (seqs, branches, pos_ids, neg_ids, batch = 64))]
    fn yes_no<'py>(
        &self,
        py: Python<'py>,
        seqs: Vec<Vec<u32>>,
        branches: Vec<Bound<'py, PyAny>>,
        pos_ids: Vec<u32>,
        neg_ids: Vec<u32>,
        batch: usize,
    ) -> PyResult<ArrayPair<'py>> {
        guard(|| {
            let br = steers(&branches)?;
            let (s, m) = py.detach(|| self.inner.yes_no(&seqs, &br, &pos_ids, &neg_ids, batch)).map_err(engine_err)?;
            let shape = (br.len(), seqs.len());
            Ok((
                Array2::from_shape_vec(shape, s).expect("b*n").into_pyarray(py),
                Array2::from_shape_vec(shape, m).expect("b*n").into_pyarray(py),
            ))
        })
    }

    /// token_logprobs(seqs, starts, branches, batch=16) -> list (branch-major, len(branches)·len(seqs)) of
    /// float32 arrays: log p(token t+1 | tokens ≤ t) for t in starts[i] .. len(seq)−2, nats.
    #[pyo3(signature = (seqs, starts, branches, batch = 16))]
    fn token_logprobs<'py>(
        &self,
        py: Python<'py>,
        seqs: Vec<Vec<u32>>,
        starts: Vec<usize>,
        branches: Vec<Bound<'py, PyAny>>,
        batch: usize,
    ) -> PyResult<Vec<Bound<'py, PyArray1<f32>>>> {
        guard(|| {
            let br = steers(&branches)?;
            let out = py.detach(|| self.inner.token_logprobs(&seqs, &starts, &br, batch)).map_err(engine_err)?;
            Ok(out.into_iter().map(|v| v.into_pyarray(py)).collect())
        })
    }

    /// token_stats(seqs, starts, branches, batch=16, ref_seqs=None, ref_starts=None) -> (logprobs, kls)
    ///
    /// Per-token log-probabilities and the per-token KL divergence from the unsteered model, for coherence.
    /// Both are lists (branch-major: branch b, sequence i at b·len(seqs) + i) of float32 arrays of
    /// len(seq) − 1 − starts[i] entries (0 when starts[i] ≥ len(seq) − 1), one per predicting position
    /// t = starts[i] + j (j = 0, 1, …):
    ///
    /// - logprobs: log p_b(seq[t+1] | seq[:t+1]) in nats, equal to `token_logprobs(seqs, starts, branches, batch)`;
    /// - kls: KL(p_ref ‖ p_b) = Σ_v p_ref(v) (log p_ref(v) − log p_b(v)) in nats, p_b the next-token distribution
    ///   of branch b on seqs[i] at position starts[i] + j, p_ref that of the unsteered model (no adapter, no
    ///   vector) on ref_seqs[i] at position ref_starts[i] + j. ref_seqs / ref_starts default to seqs / starts
    ///   (then the ("base",) branch has KL 0); pass them to compare against another prompt head, e.g. a steering
    ///   system prompt in seqs and the plain prompt in ref_seqs, with the same body.
    ///
    /// Raises ValueError if ref_seqs / ref_starts have another length than seqs, if sequence i and
    /// ref_seqs[i] have different numbers of positions to read (len − start), for an empty sequence, a token id
    /// out of range or a bad branch.
    #[pyo3(signature = (seqs, starts, branches, batch = 16, ref_seqs = None, ref_starts = None))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn token_stats<'py>(
        &self,
        py: Python<'py>,
        seqs: Vec<Vec<u32>>,
        starts: Vec<usize>,
        branches: Vec<Bound<'py, PyAny>>,
        batch: usize,
        ref_seqs: Option<Vec<Vec<u32>>>,
        ref_starts: Option<Vec<usize>>,
    ) -> PyResult<(Vec<Bound<'py, PyArray1<f32>>>, Vec<Bound<'py, PyArray1<f32>>>)> {
        guard(|| {
            let br = steers(&branches)?;
            let refs = (ref_seqs.as_deref().unwrap_or(&seqs), ref_starts.as_deref().unwrap_or(&starts));
            let (lp, kl) =
                py.detach(|| self.inner.token_stats(&seqs, &starts, &br, batch, Some(refs))).map_err(engine_err)?;
            let arrays = |v: Vec<Vec<f32>>| v.into_iter().map(|a| a.into_pyarray(py)).collect();
            Ok((arrays(lp), arrays(kl)))
        })
    }

    /// hidden(seqs, layers, branches, batch=64, positions=None) -> (len(layers), len(branches), len(seqs), d)
    /// float32: decoder-block outputs (the residual stream after block ℓ) at positions[i] of sequence i (0-based
    /// token index), or at each sequence's last token when positions is None.
    #[pyo3(signature = (seqs, layers, branches, batch = 64, positions = None))]
    fn hidden<'py>(
        &self,
        py: Python<'py>,
        seqs: Vec<Vec<u32>>,
        layers: Vec<usize>,
        branches: Vec<Bound<'py, PyAny>>,
        batch: usize,
        positions: Option<Vec<usize>>,
    ) -> PyResult<Bound<'py, PyArray4<f32>>> {
        guard(|| {
            let br = steers(&branches)?;
            let d = self.inner.model.cfg.d_model;
            let out = py
                .detach(|| self.inner.hidden(&seqs, &layers, &br, batch, positions.as_deref()))
                .map_err(engine_err)?;
            Ok(Array4::from_shape_vec((layers.len(), br.len(), seqs.len(), d), out).expect("l*b*n*d").into_pyarray(py))
        })
    }
}

/// num_threads() -> the size of the rayon pool the engine and the SVD run on.
#[pyfunction]
fn num_threads() -> PyResult<usize> {
    guard(|| Ok(rayon::current_num_threads()))
}

/// Native extension of innerpissa (Rust, via pyo3).
#[pymodule]
fn _rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    guard(|| init(m))
}

fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // CANDLE_NUM_THREADS sizes the pool when RAYON_NUM_THREADS is unset; candle's own kernels read the latter.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        if let Ok(n) = std::env::var("CANDLE_NUM_THREADS") {
            if n.parse::<usize>().is_ok_and(|n| n > 0) {
                std::env::set_var("RAYON_NUM_THREADS", &n);
            }
        }
    }
    if std::env::var_os("IPISSA_PROFILE").is_some() {
        // One subscriber per process; a second import (or another library's subscriber) keeps the first.
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::DEBUG)
            .with_writer(std::io::stderr)
            .try_init();
    }
    m.add_function(wrap_pyfunction!(top_r_svd, m)?)?;
    m.add_function(wrap_pyfunction!(top_r_svd_batch, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_class::<PyEngine>()?;
    m.add_class::<PyBranch>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
