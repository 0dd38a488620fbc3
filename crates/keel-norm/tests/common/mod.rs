//! Shared test helpers: fixture loading and tolerance checks.
#![allow(dead_code)] // each test binary uses a different subset of the helpers

use std::collections::HashMap;

use candle::{DType, Device, Tensor};

/// The PyTorch fixtures written by `tests/fixtures/gen_norm.py`.
pub fn fixtures() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/norm.safetensors"
    );
    candle::safetensors::load(path, &Device::Cpu).expect("load norm.safetensors")
}

/// One fixture tensor, `"<case>.<name>"`.
pub fn get(fx: &HashMap<String, Tensor>, case: &str, name: &str) -> Tensor {
    fx.get(&format!("{case}.{name}"))
        .unwrap_or_else(|| panic!("fixture {case}.{name} missing"))
        .clone()
}

/// Asserts `|a - e| <= max(rtol * |e|, atol)` elementwise (computed in f64) and prints the
/// worst element on failure. NaN in either side fails unless both are NaN.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, rtol: f64, atol: f64) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape mismatch");
    let a = actual
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let e = expected
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&x, &y)) in a.iter().zip(&e).enumerate() {
        if x == y || (x.is_nan() && y.is_nan()) {
            continue;
        }
        // NaN on one side only, or an infinite difference, counts as the worst possible.
        let excess = match (x - y).abs() - (rtol * y.abs()).max(atol) {
            e if e.is_nan() => f64::INFINITY,
            e => e,
        };
        if excess > 0.0 && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i} differs: got {}, expected {} (rtol {rtol}, atol {atol}, {} elements)",
            a[i],
            e[i],
            a.len()
        );
    }
}

/// The maximum absolute difference, for reporting.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}
