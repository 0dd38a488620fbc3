//! Shared by keel-det's test files: the torchvision fixtures of
//! `tests/fixtures/gen_det_ops.py`.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle::{Device, Tensor};

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
}
