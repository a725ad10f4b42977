//! Pure-Rust numerics for innerpissa.
//!
//! No Python here: everything in this crate is testable with plain `cargo test`.
//! The pyo3 bindings in `rust/py` only translate arrays and errors.

pub mod engine;
pub mod svd;

pub use svd::{top_r_svd, top_r_svd_batch, top_r_svd_with_par, BatchError, MatrixView, Precision, SvdError, TopRSvd};
