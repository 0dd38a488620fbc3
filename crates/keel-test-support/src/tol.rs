//! Tolerances: `|got - want| <= max(rtol * |want|, atol)`, with presets per dtype.

use candle::DType;

/// A per-element tolerance: `|got - want| <= max(rtol * |want|, atol)`.
///
/// `rtol` covers large values, `atol` the values near zero where a relative bound is
/// meaningless. The presets suit a kernel compared with a float64 or f32-composed
/// reference in that dtype; tests with longer reductions loosen them explicitly
/// ([`Tol::scale_atol`]) and say why.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tol {
    /// Relative tolerance, a fraction of `|want|`.
    pub rtol: f64,
    /// Absolute tolerance, the floor of the limit.
    pub atol: f64,
}

impl Tol {
    /// Bit-for-bit equality (of the values read as f64).
    pub const EXACT: Tol = Tol::new(0.0, 0.0);
    /// f64 maths against PyTorch's f64 (LR schedules): `rtol 1e-10, atol 1e-15`.
    pub const F64: Tol = Tol::new(1e-10, 1e-15);
    /// f32 kernels against a float64 or f32 reference: `rtol 1e-4, atol 1e-4`.
    pub const F32: Tol = Tol::new(1e-4, 1e-4);
    /// f16 kernels (f32 accumulation, one rounding of the output): `rtol 4e-3, atol 4e-3`.
    pub const F16: Tol = Tol::new(4e-3, 4e-3);
    /// bf16 kernels (f32 accumulation, one rounding of the output): `rtol 2e-2, atol 2e-2`.
    pub const BF16: Tol = Tol::new(2e-2, 2e-2);

    /// A tolerance from its two parts.
    pub const fn new(rtol: f64, atol: f64) -> Tol {
        Tol { rtol, atol }
    }

    /// The preset for a dtype: [`Tol::F64`], [`Tol::F32`], [`Tol::F16`], [`Tol::BF16`];
    /// integer dtypes compare exactly.
    ///
    /// # Panics
    /// For the sub-16-bit floats (F8E4M3, F6*, F4), which have no preset: a test of
    /// them states its tolerance with [`Tol::new`].
    pub fn for_dtype(dtype: DType) -> Tol {
        match dtype {
            DType::F64 => Tol::F64,
            DType::F32 => Tol::F32,
            DType::F16 => Tol::F16,
            DType::BF16 => Tol::BF16,
            d if d.is_int() => Tol::EXACT,
            d => panic!("Tol::for_dtype: no preset for {d:?}; state the tolerance with Tol::new(rtol, atol)"),
        }
    }

    /// The same `rtol` with `atol * factor`: for sums over many terms (a weight gradient
    /// sums N*H*W products) or for values scaled by `max |want|`.
    pub fn scale_atol(self, factor: f64) -> Tol {
        Tol::new(self.rtol, self.atol * factor)
    }

    /// The same `rtol` with another `atol`.
    pub fn with_atol(self, atol: f64) -> Tol {
        Tol::new(self.rtol, atol)
    }

    /// The limit for one expected value: `max(rtol * |want|, atol)`.
    pub fn limit(&self, want: f64) -> f64 {
        (self.rtol * want.abs()).max(self.atol)
    }
}

impl std::fmt::Display for Tol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rtol {:e}, atol {:e}", self.rtol, self.atol)
    }
}
