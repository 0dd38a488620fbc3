//! Pretrained weights into a SegNet (`load_pretrained`: BatchNorm conversion, head skipping,
//! shape and non-finite checks) and `SegNet::copy_bn_stats_to`.

use std::collections::HashMap;

use anyhow::Result;
use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use keel_models::seg::{
    init_weights, load_pretrained, non_finite_tensors, LoadReport, ModelConfig, SegNet,
};
use keel_norm::NormKind;

fn build(norm: &str, num_classes: usize, seed: u64) -> Result<(VarMap, SegNet)> {
    let cfg = ModelConfig {
        width: 4,
        fpn: 8,
        num_classes,
        norm: norm.parse()?,
    };
    let vm = VarMap::new();
    let net = SegNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    init_weights(&vm, seed)?;
    Ok((vm, net))
}

/// The variables of `vm` as a state dict (copies).
fn state_dict(vm: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = vm.data().lock().unwrap();
    Ok(data
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect::<candle::Result<_>>()?)
}

fn get(vm: &VarMap, name: &str) -> Result<Vec<f32>> {
    let data = vm.data().lock().unwrap();
    Ok(data[name].as_tensor().flatten_all()?.to_vec1()?)
}

#[test]
fn batch_norm_weights_load_into_group_norm_with_the_head_skipped() -> Result<()> {
    let (bn_vm, _) = build("bn", 5, 1)?;
    let sd = state_dict(&bn_vm)?;
    let (gn_vm, _) = build("gn", 3, 2)?;
    let total = gn_vm.all_vars().len();
    let r = load_pretrained(&gn_vm, sd, NormKind::GroupNorm { groups: None })?;
    assert!(r.converted > 0, "{r:?}");
    assert_eq!(
        r.head_skipped, 2,
        "head.weight and head.bias: 5 vs 3 classes"
    );
    assert_eq!((r.loaded + r.head_skipped, r.total), (total, total));
    assert_eq!(get(&gn_vm, "stem.0.weight")?, get(&bn_vm, "stem.0.weight")?);
    assert_ne!(
        get(&gn_vm, "head.weight")?.len(),
        get(&bn_vm, "head.weight")?.len()
    );
    assert!(r.to_string().starts_with(&format!(
        "loaded {}/{total} tensors ({} BatchNorms",
        r.loaded, r.converted
    )));
    Ok(())
}

#[test]
fn non_finite_or_misshapen_weights_are_errors_before_anything_loads() -> Result<()> {
    let (src, _) = build("gn", 5, 1)?;
    let (dst, _) = build("gn", 5, 2)?;
    let before = get(&dst, "stem.0.weight")?;
    let gn = NormKind::GroupNorm { groups: None };
    let mut sd = state_dict(&src)?;
    let nan = Tensor::full(f32::NAN, sd["stem.1.weight"].dims(), &Device::Cpu)?;
    sd.insert("stem.1.weight".into(), nan);
    // A non-finite tensor the model does not load (optimizer state) is no error.
    sd.insert(
        "opt.momentum".into(),
        Tensor::new(&[f32::INFINITY], &Device::Cpu)?,
    );
    assert_eq!(
        non_finite_tensors(&sd, |_| true)?,
        ["opt.momentum", "stem.1.weight"]
    );
    let err = load_pretrained(&dst, sd.clone(), gn)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'stem.1.weight'") && err.contains("NaN"),
        "{err}"
    );
    assert!(!err.contains("opt.momentum"), "{err}");
    assert_eq!(get(&dst, "stem.0.weight")?, before, "nothing loaded");

    let mut sd = state_dict(&src)?;
    sd.insert(
        "stem.0.weight".into(),
        Tensor::zeros((1, 1), DType::F32, &Device::Cpu)?,
    );
    let err = load_pretrained(&dst, sd, gn).unwrap_err().to_string();
    assert!(err.contains("'stem.0.weight' has shape [1, 1]"), "{err}");
    assert_eq!(get(&dst, "stem.0.weight")?, before, "nothing loaded");

    let foreign = HashMap::from([(
        "fc.weight".to_string(),
        Tensor::zeros(2, DType::F32, &Device::Cpu)?,
    )]);
    let err = load_pretrained(&dst, foreign, gn).unwrap_err().to_string();
    assert!(err.contains("no tensor name matches"), "{err}");
    let r: LoadReport = load_pretrained(&dst, state_dict(&src)?, gn)?;
    assert_eq!((r.loaded, r.converted, r.unused), (r.total, 0, 0));
    assert_eq!(get(&dst, "stem.0.weight")?, get(&src, "stem.0.weight")?);
    Ok(())
}

#[test]
fn copy_bn_stats_writes_a_copy_models_running_statistics() -> Result<()> {
    let (master_vm, _) = build("bn", 5, 1)?;
    let (copy_vm, copy) = build("bn", 5, 1)?;
    let x = Tensor::randn(0f32, 3.0, (2, 3, 32, 32), &Device::Cpu)?;
    copy.forward(&x, true)?; // updates the copy's running statistics
    let (name, bn) = &copy.batch_norms()[0];
    let key = format!("{name}.running_var");
    let want: Vec<f32> = bn.running_var().to_vec1()?;
    assert_ne!(get(&master_vm, &key)?, want);
    copy.copy_bn_stats_to(&master_vm)?;
    assert_eq!(get(&master_vm, &key)?, want);
    drop(copy_vm);
    let err = copy
        .copy_bn_stats_to(&VarMap::new())
        .unwrap_err()
        .to_string();
    let mean = format!("{name}.running_mean");
    assert!(
        err.contains("has no variable") && err.contains(&mean),
        "{err}"
    );
    Ok(())
}
