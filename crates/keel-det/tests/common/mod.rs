//! Shared by keel-det's test files: the torchvision fixtures of
//! `tests/fixtures/gen_det_ops.py`.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle::{Device, Tensor};
use keel_test_support::{assert_close, Tol};

/// The fixtures by key (see the generator's docstring for the key scheme).
pub struct Fixtures(HashMap<String, Tensor>);

impl Fixtures {
    pub fn load() -> Result<Fixtures> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/det_ops.safetensors"
        );
        Ok(Fixtures(candle::safetensors::load(path, &Device::Cpu)?))
    }

    pub fn get(&self, key: &str) -> Result<Tensor> {
        self.0
            .get(key)
            .cloned()
            .with_context(|| format!("fixture {key} missing; rerun gen_det_ops.py"))
    }

    /// `assert_close(got, fixture[key], tol)`, with `key` in the failure message.
    pub fn check(&self, got: &Tensor, key: &str, tol: Tol) -> Result<()> {
        assert_close(key, got, &self.get(key)?, tol);
        Ok(())
    }
}
