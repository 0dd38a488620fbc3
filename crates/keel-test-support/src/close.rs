//! The check itself: per element `|got - want| <= max(rtol * |want|, atol)`, one core for
//! tensors and slices ([`Values`]), a panicking form ([`assert_close`]) and a `Result`
//! form ([`check_close`]).

use std::fmt;

use candle::{DType, Tensor};

use crate::Tol;

/// Something a test compares: a tensor of any dtype, or a slice, array or `Vec` of
/// numbers.
pub trait Values {
    /// The row-major shape of the values; a slice is one-dimensional.
    fn shape(&self) -> Vec<usize>;
    /// The values in row-major order as f64 (exact for f64, f32, f16, bf16 and the
    /// integer dtypes keel compares).
    fn values(&self) -> candle::Result<Vec<f64>>;
}

impl Values for Tensor {
    fn shape(&self) -> Vec<usize> {
        self.dims().to_vec()
    }

    fn values(&self) -> candle::Result<Vec<f64>> {
        self.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
    }
}

impl<T: Copy + Into<f64>> Values for [T] {
    fn shape(&self) -> Vec<usize> {
        vec![self.len()]
    }

    fn values(&self) -> candle::Result<Vec<f64>> {
        Ok(self.iter().map(|&x| x.into()).collect())
    }
}

impl<T: Copy + Into<f64>, const N: usize> Values for [T; N] {
    fn shape(&self) -> Vec<usize> {
        self.as_slice().shape()
    }

    fn values(&self) -> candle::Result<Vec<f64>> {
        self.as_slice().values()
    }
}

impl<T: Copy + Into<f64>> Values for Vec<T> {
    fn shape(&self) -> Vec<usize> {
        self.as_slice().shape()
    }

    fn values(&self) -> candle::Result<Vec<f64>> {
        self.as_slice().values()
    }
}

/// What a passing comparison measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Closeness {
    /// Number of elements compared.
    pub len: usize,
    /// Largest `|got - want|` (0 for matching non-finite pairs).
    pub max_abs: f64,
    /// Largest `|got - want| / |want|` over the elements with `want != 0`.
    pub max_rel: f64,
}

/// Why a comparison failed; its `Display` is the assertion message.
#[derive(Clone, Debug, PartialEq)]
pub enum Mismatch {
    /// The shapes differ.
    Shape {
        /// What was compared.
        what: String,
        /// Shape of the value under test.
        got: Vec<usize>,
        /// Shape of the reference.
        want: Vec<usize>,
    },
    /// A tensor could not be read back as f64.
    Read {
        /// What was compared.
        what: String,
        /// candle's error.
        error: String,
    },
    /// At least one element is outside the tolerance.
    Values {
        /// What was compared.
        what: String,
        /// The tolerance checked.
        tol: Tol,
        /// Number of elements outside the tolerance.
        failures: usize,
        /// Number of elements compared.
        len: usize,
        /// Multi-dimensional index of the worst element (largest error / limit).
        index: Vec<usize>,
        /// The worst element's value under test.
        got: f64,
        /// The worst element's reference value.
        want: f64,
        /// Largest `|got - want|` over all elements (infinite for a non-finite mismatch).
        max_abs: f64,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Shape { what, got, want } => {
                write!(f, "{what}: shape {got:?} != expected {want:?}")
            }
            Mismatch::Read { what, error } => write!(f, "{what}: reading the values: {error}"),
            Mismatch::Values {
                what,
                tol,
                failures,
                len,
                index,
                got,
                want,
                max_abs,
            } => write!(
                f,
                "{what}: {failures} of {len} elements outside |got - want| <= max(rtol * |want|, atol) \
                 ({tol}); worst at {index:?}: got {got:e}, want {want:e}, |got - want| {:e} \
                 (limit {:e}); max abs error {max_abs:e}",
                (got - want).abs(),
                tol.limit(*want),
            ),
        }
    }
}

impl std::error::Error for Mismatch {}

/// Asserts `|got - want| <= max(tol.rtol * |want|, tol.atol)` for every element and
/// returns the maximum absolute error, for tests that report what they measured.
///
/// Non-finite values must match exactly (NaN matches NaN, an infinity the same
/// infinity); the shapes must be equal.
///
/// # Panics
/// On any [`Mismatch`], with a message naming `what`, the worst element's
/// multi-dimensional index, both values, the tolerance and the max abs error.
#[track_caller]
pub fn assert_close<G, W>(what: &str, got: &G, want: &W, tol: Tol) -> f64
where
    G: Values + ?Sized,
    W: Values + ?Sized,
{
    match check_close(what, got, want, tol) {
        Ok(c) => c.max_abs,
        Err(e) => panic!("{e}"),
    }
}

/// [`assert_close`] returning the outcome instead of panicking: for proptest bodies and
/// for tests that expect a mismatch.
pub fn check_close<G, W>(what: &str, got: &G, want: &W, tol: Tol) -> Result<Closeness, Mismatch>
where
    G: Values + ?Sized,
    W: Values + ?Sized,
{
    let (got_shape, want_shape) = (got.shape(), want.shape());
    if got_shape != want_shape {
        return Err(Mismatch::Shape {
            what: what.to_string(),
            got: got_shape,
            want: want_shape,
        });
    }
    let (g, w) = match (got.values(), want.values()) {
        (Ok(g), Ok(w)) => (g, w),
        (Err(e), _) | (_, Err(e)) => {
            return Err(Mismatch::Read {
                what: what.to_string(),
                error: e.to_string(),
            })
        }
    };
    let mut c = Closeness {
        len: g.len(),
        max_abs: 0.0,
        max_rel: 0.0,
    };
    let (mut failures, mut worst) = (0usize, None::<(usize, f64)>);
    for (i, (&x, &y)) in g.iter().zip(&w).enumerate() {
        let err = abs_error(x, y);
        c.max_abs = c.max_abs.max(err);
        if y != 0.0 && y.is_finite() {
            c.max_rel = c.max_rel.max(err / y.abs());
        }
        // A non-finite reference allows no error: only the same value matches it.
        let limit = if y.is_finite() { tol.limit(y) } else { 0.0 };
        if err <= limit {
            continue;
        }
        failures += 1;
        let ratio = if limit > 0.0 {
            err / limit
        } else {
            f64::INFINITY
        };
        if worst.is_none_or(|(_, r)| ratio > r) {
            worst = Some((i, ratio));
        }
    }
    match worst {
        None => Ok(c),
        Some((i, _)) => Err(Mismatch::Values {
            what: what.to_string(),
            tol,
            failures,
            len: c.len,
            index: unravel(i, &got_shape),
            got: g[i],
            want: w[i],
            max_abs: c.max_abs,
        }),
    }
}

/// `|x - y|`, with non-finite values compared exactly: 0 when both are NaN or the same
/// infinity, infinite for any other pair with a non-finite side.
fn abs_error(x: f64, y: f64) -> f64 {
    if x.is_finite() && y.is_finite() {
        (x - y).abs()
    } else if x == y || (x.is_nan() && y.is_nan()) {
        0.0
    } else {
        f64::INFINITY
    }
}

/// The row-major multi-dimensional index of flat index `i` in `shape`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (k, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            index[k] = i % d;
            i /= d;
        }
    }
    index
}
