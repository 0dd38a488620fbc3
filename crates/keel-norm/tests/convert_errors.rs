//! The BatchNorm converter under bad input (issue 11, item 2): each case fails on the old
//! code; every error leaves the state dict (or the files) unchanged.

use candle::{DType, Device, Tensor};
use keel_norm::convert::{
    bn_to_frozen_bn, bn_to_group_norm, find_batch_norms, fold_bn_into_conv, load_state_dict,
    ConvertPaths, StateDict,
};
use keel_test_support::TempDir;

const DEV: Device = Device::Cpu;

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &DEV).unwrap()
}

fn bn(sd: &mut StateDict, p: &str, c: usize) {
    let ones = vec![1f32; c];
    for k in ["weight", "bias", "running_mean", "running_var"] {
        sd.insert(format!("{p}.{k}"), t(&ones));
    }
    sd.insert(
        format!("{p}.num_batches_tracked"),
        Tensor::new(7i64, &DEV).unwrap(),
    );
}

/// A torchvision-style ResNet fragment: stem, a basic block with a downsample, fc.
fn resnet_ish() -> StateDict {
    let mut sd = StateDict::new();
    sd.insert(
        "conv1.weight".into(),
        Tensor::ones((4, 3, 1, 1), DType::F32, &DEV).unwrap(),
    );
    bn(&mut sd, "bn1", 4);
    for (conv, b) in [
        ("layer1.0.conv1", "layer1.0.bn1"),
        ("layer1.0.conv2", "layer1.0.bn2"),
    ] {
        sd.insert(
            format!("{conv}.weight"),
            Tensor::ones((4, 4, 1, 1), DType::F32, &DEV).unwrap(),
        );
        bn(&mut sd, b, 4);
    }
    sd.insert(
        "layer1.0.downsample.0.weight".into(),
        Tensor::ones((4, 4, 1, 1), DType::F32, &DEV).unwrap(),
    );
    bn(&mut sd, "layer1.0.downsample.1", 4);
    sd.insert(
        "fc.weight".into(),
        Tensor::ones((10, 4), DType::F32, &DEV).unwrap(),
    );
    sd.insert(
        "fc.bias".into(),
        Tensor::zeros(10, DType::F32, &DEV).unwrap(),
    );
    sd
}

fn keys(sd: &StateDict) -> Vec<String> {
    let mut k: Vec<_> = sd.keys().cloned().collect();
    k.sort();
    k
}

fn err<T: std::fmt::Debug>(r: candle::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn frozen_bn_without_fold_converts_every_batch_norm() -> anyhow::Result<()> {
    let mut sd = resnet_ish();
    let n = sd.len();
    let bns = bn_to_frozen_bn(&mut sd, None)?;
    assert_eq!(
        bns,
        [
            "bn1",
            "layer1.0.bn1",
            "layer1.0.bn2",
            "layer1.0.downsample.1"
        ]
    );
    // The CLI's path: no --fold means no pairs, which must fold nothing (it said "no
    // BatchNorm found").
    fold_bn_into_conv(&mut sd, &[], 1e-5)?;
    assert_eq!(sd.len(), n - 4);
    assert!(!sd.keys().any(|k| k.ends_with("num_batches_tracked")));
    // Only a few BatchNorms: one BN among plain layers, converted by prefix too.
    let mut few = StateDict::new();
    few.insert("fc.weight".into(), t(&[1.0, 2.0]));
    bn(&mut few, "head.norm", 2);
    let mut by_prefix = few.clone();
    assert_eq!(bn_to_frozen_bn(&mut few, None)?, ["head.norm"]);
    fold_bn_into_conv(&mut few, &[], 1e-5)?;
    assert_eq!(
        bn_to_frozen_bn(&mut by_prefix, Some(&["head.norm".into()]))?,
        ["head.norm"]
    );
    assert_eq!(keys(&few), keys(&by_prefix));
    Ok(())
}

#[test]
fn incomplete_batch_norm_is_an_error_naming_prefix_and_keys() {
    let mut sd = resnet_ish();
    sd.remove("layer1.0.bn2.running_var");
    sd.remove("layer1.0.downsample.1.bias");
    assert!(find_batch_norms(&sd).contains(&"layer1.0.bn2".to_string()));
    let before = keys(&sd);
    for m in [
        err(bn_to_frozen_bn(&mut sd, None)),
        err(bn_to_group_norm(&mut sd, None)),
    ] {
        assert!(
            m.contains("'layer1.0.bn2' lacks layer1.0.bn2.running_var"),
            "{m}"
        );
        assert!(
            m.contains("'layer1.0.downsample.1' lacks layer1.0.downsample.1.bias"),
            "{m}"
        );
    }
    assert_eq!(keys(&sd), before, "state unchanged");
}

#[test]
fn fold_refuses_negative_or_non_finite_values() {
    for (key, v, shows) in [
        ("bn1.running_var", -1.0, "bn1.running_var[2] = -1"),
        ("bn1.running_var", f32::NAN, "bn1.running_var[2] = NaN"),
        ("bn1.weight", f32::INFINITY, "bn1.weight[2] = inf"),
        ("bn1.running_mean", f32::NAN, "bn1.running_mean[2] = NaN"),
    ] {
        let mut sd = resnet_ish();
        sd.insert(key.into(), t(&[1.0, 1.0, v, 1.0]));
        let before = sd.clone();
        let m = err(fold_bn_into_conv(
            &mut sd,
            &[("conv1".into(), "bn1".into())],
            1e-5,
        ));
        assert!(m.contains(shows), "{key}={v}: {m}");
        assert_eq!(keys(&sd), keys(&before));
        assert!(err(bn_to_frozen_bn(&mut sd, None)).contains(shows));
    }
    let mut sd = resnet_ish();
    sd.insert(
        "conv1.weight".into(),
        (Tensor::ones((4, 3, 1, 1), DType::F32, &DEV).unwrap() * f64::NAN).unwrap(),
    );
    let m = err(fold_bn_into_conv(
        &mut sd,
        &[("conv1".into(), "bn1".into())],
        1e-5,
    ));
    assert!(m.contains("conv1.weight[0] = NaN"), "{m}");
    // running_var 0 with eps 0: the folded weight would be infinite.
    let mut sd = resnet_ish();
    sd.insert("bn1.running_var".into(), t(&[0.0; 4]));
    let m = err(fold_bn_into_conv(
        &mut sd,
        &[("conv1".into(), "bn1".into())],
        0.0,
    ));
    assert!(
        m.contains("conv1.weight folded with 'bn1'") && m.contains("eps > 0"),
        "{m}"
    );
    assert!(sd.contains_key("bn1.running_var"));
    // GroupNorm drops the statistics, so only weight and bias must be finite.
    let mut sd = resnet_ish();
    sd.insert("bn1.running_var".into(), t(&[-1.0; 4]));
    bn_to_group_norm(&mut sd, None).unwrap();
}

#[test]
fn paths_compare_files_not_strings() -> anyhow::Result<()> {
    let d = TempDir::new("same");
    let input = d.0.join("in.safetensors");
    candle::safetensors::save(&resnet_ish(), &input)?;
    std::fs::create_dir(d.0.join("sub"))?;
    std::os::unix::fs::symlink(&input, d.0.join("link.safetensors"))?;
    std::fs::hard_link(&input, d.0.join("hard.safetensors"))?;
    for out in [
        "./in.safetensors",
        "sub/../in.safetensors",
        "link.safetensors",
        "hard.safetensors",
    ] {
        let out = d.0.join(out);
        let m = err(ConvertPaths::new(&input, &out));
        assert!(
            m.contains("is the same file as IN"),
            "{}: {m}",
            out.display()
        );
    }
    let m = err(ConvertPaths::new(&input, d.0.join("sub")));
    assert!(m.contains("is a directory"), "{m}");
    let m = err(ConvertPaths::new(&input, d.0.join("nope/out.safetensors")));
    assert!(m.contains("does not exist; create it first"), "{m}");
    Ok(())
}

#[test]
fn save_removes_its_temp_file_on_failure() -> anyhow::Result<()> {
    let d = TempDir::new("tmp");
    let input = d.0.join("in.safetensors");
    candle::safetensors::save(&resnet_ish(), &input)?;
    let paths = ConvertPaths::new(&input, d.0.join("out.safetensors"))?;
    // OUT becomes a (non-empty) directory after the check: the rename fails.
    std::fs::create_dir_all(d.0.join("out.safetensors/x"))?;
    let m = err(paths.save(&resnet_ish()));
    assert!(m.contains("cannot move"), "{m}");
    assert_eq!(d.names(), ["in.safetensors", "out.safetensors"]);
    std::fs::remove_dir_all(d.0.join("out.safetensors"))?;
    paths.save(&resnet_ish())?;
    assert_eq!(
        keys(&load_state_dict(paths.output(), &DEV)?),
        keys(&resnet_ish())
    );
    Ok(())
}

#[test]
fn a_file_that_is_not_safetensors_is_named_as_such() -> anyhow::Result<()> {
    let d = TempDir::new("text");
    for (name, bytes, found) in [
        (
            "notes.txt",
            &b"hello world, this is text\n"[..],
            "text starting \"hello wo",
        ),
        (
            "model.pth",
            &b"PK\x03\x04\x14\x00\x00\x00\x08\x00\x00\x00\x00\x00"[..],
            "a zip archive",
        ),
        ("tiny.safetensors", &b"abc"[..], "it has 3 bytes"),
    ] {
        let p = d.0.join(name);
        std::fs::write(&p, bytes)?;
        let m = err(load_state_dict(&p, &DEV));
        assert!(
            m.contains(&format!("{} is not a safetensors file", p.display())),
            "{m}"
        );
        assert!(
            m.contains(found) && m.contains("save_file(model.state_dict()"),
            "{m}"
        );
    }
    Ok(())
}
