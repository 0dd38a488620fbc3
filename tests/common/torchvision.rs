//! A torchvision-layout ResNet checkpoint for the backbone tests (seg_backbone,
//! det_backbone): keel's own ResNet (BatchNorm, with `fc` and the `num_batches_tracked`
//! tensors torchvision's state dict holds), seeded, saved under torchvision's names.
#![allow(dead_code)] // reason: each test crate uses a subset

use std::collections::HashMap;
use std::path::Path;

use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use keel::models::resnet::{ResNet, ResNetConfig, ResNetDepth};
use keel::models::seg::init_weights;
use keel::norm::NormKind;

/// A torchvision-layout state dict of `depth` (BatchNorm, fc with 10 classes), seeded, with
/// BatchNorm statistics away from their init and `num_batches_tracked`.
pub fn torchvision_state_dict(depth: ResNetDepth) -> anyhow::Result<HashMap<String, Tensor>> {
    let cfg = ResNetConfig::backbone(depth, NormKind::BatchNorm);
    let vm = VarMap::new();
    ResNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    init_weights(&vm, 11)?;
    let mut sd = HashMap::new();
    for (k, v) in vm.data().lock().unwrap().iter() {
        let t = v.as_tensor();
        let t = match k.rsplit_once('.').map(|x| x.1) {
            Some("running_var") => t.affine(0.5, 0.25)?,
            Some("running_mean") => (t + 0.1)?,
            _ => t.clone(),
        };
        sd.insert(k.clone(), t);
        if let Some(bn) = k.strip_suffix(".running_mean") {
            let n = Tensor::new(&[1234i64], &Device::Cpu)?.squeeze(0)?;
            sd.insert(format!("{bn}.num_batches_tracked"), n);
        }
    }
    let c5 = cfg.out_channels()[3];
    sd.insert(
        "fc.weight".into(),
        Tensor::randn(0f32, 0.01, (10, c5), &Device::Cpu)?,
    );
    sd.insert(
        "fc.bias".into(),
        Tensor::zeros(10, DType::F32, &Device::Cpu)?,
    );
    Ok(sd)
}

pub fn save(sd: &HashMap<String, Tensor>, path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path.parent().unwrap())?;
    candle::safetensors::save(sd, path)?;
    Ok(())
}
