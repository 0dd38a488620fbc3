//! Shared test helpers: fixture loading; comparisons use `keel_test_support::assert_close`.
#![allow(dead_code)] // each test binary uses a different subset of the helpers

use std::collections::HashMap;

use candle::{Device, Tensor};

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
