//! Shared test helpers: fixture loading and scratch paths; comparisons use
//! `keel_test_support::assert_close`.
//!
//! Fixtures come from `tests/fixtures/gen_optim.py` (PyTorch 2.x, CPU); rerun it from
//! the repository root to regenerate them.
#![allow(dead_code)] // reason: each test binary uses a different subset of the helpers

use anyhow::{Context, Result};
use candle::{Device, Tensor};
use serde_json::Value;

/// Parses `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> Result<Value> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path}; run gen_optim.py"))?;
    Ok(serde_json::from_str(&text)?)
}

/// A JSON array of numbers.
pub fn f64s(v: &Value) -> Result<Vec<f64>> {
    v.as_array()
        .context("expected an array")?
        .iter()
        .map(|x| x.as_f64().context("expected a number"))
        .collect()
}

/// A JSON number.
pub fn num(v: &Value) -> Result<f64> {
    v.as_f64()
        .with_context(|| format!("expected a number, got {v}"))
}

/// A `{shape, data}` tensor written by `tl(..)` in the generator, as f32 on the CPU.
pub fn tensor(v: &Value) -> Result<Tensor> {
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .context("shape")?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize).context("dim"))
        .collect::<Result<_>>()?;
    let data: Vec<f32> = f64s(&v["data"])?.into_iter().map(|x| x as f32).collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// A tensor's values as f64.
pub fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?
        .to_dtype(candle::DType::F64)?
        .to_vec1::<f64>()?)
}

/// A fresh scratch file path for this process and `name`, removed when the value drops.
pub fn scratch(name: &str) -> keel_test_support::TempPath {
    keel_test_support::TempPath::new("keel-optim-tests", name)
}
