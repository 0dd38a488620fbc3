//! keel-test-support: the one way keel's tests compare numbers.
//!
//! [`Tol`] holds `rtol` and `atol` with presets per dtype ([`Tol::F32`], [`Tol::F16`],
//! [`Tol::BF16`], [`Tol::F64`], [`Tol::EXACT`]); [`assert_close`] checks, per element,
//!
//! ```text
//! |got - want| <= max(rtol * |want|, atol)
//! ```
//!
//! (the numpy/PyTorch `isclose` family, with `max` instead of a sum), fails on a shape
//! mismatch or on non-finite values that differ (NaN matches only NaN, an infinity only
//! the same infinity), prints the worst element with its multi-dimensional index, and
//! returns the maximum absolute error so tests can report what they measured.
//! [`check_close`] is the same check returning a `Result` for code that must not panic
//! (proptest bodies, tests that expect a mismatch). [`TempDir`] is a test's scratch
//! directory and [`TempPath`] a run directory the code under test creates, both removed on
//! drop; [`xorshift_data`] makes deterministic inputs.
//!
//! ```
//! use keel_test_support::{assert_close, Tol};
//! let err = assert_close("lr", &[0.1, 0.05], &[0.1, 0.05 + 1e-12], Tol::F64);
//! assert!(err < 1e-11);
//! ```

pub mod close;
pub mod data;
pub mod temp;
pub mod tol;

pub use close::{assert_close, check_close, Closeness, Mismatch, Values};
pub use data::xorshift_data;
pub use temp::{TempDir, TempPath};
pub use tol::Tol;
