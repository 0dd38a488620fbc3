//! Behaviour of keel-norm's layers beyond PyTorch parity: errors for bad input, NormKind,
//! block building, batch independence, BN folding, checkpoint conversion, the decision table.
mod common;

use std::collections::HashMap;

use candle::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
use keel_norm::convert::{
    bn_to_frozen_bn, bn_to_group_norm, find_batch_norms, fold_bn_into_conv, StateDict,
};
use keel_norm::{
    conv_norm_act, group_count, group_norm, norm, recommend, Activation, FrozenBatchNorm2d,
    GroupNorm, NormKind, WsConfig, WsConv2d,
};
use keel_test_support::{assert_close, Tol};
use proptest::prelude::*;

const DEV: Device = Device::Cpu;

fn randn(shape: &[usize], seed_scale: f64) -> Tensor {
    (Tensor::randn(0f32, 1., shape, &DEV).unwrap() * seed_scale).unwrap()
}

fn err_msg<T: std::fmt::Debug>(r: candle::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

fn gn(c: usize, g: usize) -> candle::Result<GroupNorm> {
    GroupNorm::new(
        Tensor::ones(c, DType::F32, &DEV)?,
        Tensor::zeros(c, DType::F32, &DEV)?,
        c,
        g,
        1e-5,
    )
}

#[test]
fn group_count_examples() {
    assert_eq!(group_count(64, 32), 32);
    assert_eq!(group_count(32, 32), 32);
    assert_eq!(group_count(16, 32), 16);
    assert_eq!(group_count(48, 32), 24);
    assert_eq!(group_count(30, 32), 30);
    assert_eq!(group_count(96, 32), 32);
    assert_eq!(group_count(100, 32), 25);
    assert_eq!(group_count(13, 32), 13);
    assert_eq!(group_count(26, 8), 2);
    assert_eq!(group_count(7, 4), 1);
    assert_eq!(group_count(0, 32), 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn group_count_is_the_largest_divisor(c in 1usize..2048, pref in 1usize..64) {
        let g = group_count(c, pref);
        prop_assert!(g >= 1 && g <= pref.min(c));
        prop_assert_eq!(c % g, 0);
        prop_assert!(((g + 1)..=pref.min(c)).all(|h| c % h != 0));
    }
}

#[test]
fn group_norm_bad_config_errors_name_op_value_and_fix() {
    let m = err_msg(gn(48, 5));
    assert!(
        m.contains("GroupNorm")
            && m.contains("(5)")
            && m.contains("(48)")
            && m.contains("group_count(48, 32) = 24"),
        "{m}"
    );
    let m = err_msg(gn(48, 0));
    assert!(m.contains("num_groups (0)"), "{m}");
    let m = err_msg(GroupNorm::new(
        Tensor::ones(8, DType::F32, &DEV).unwrap(),
        Tensor::zeros(8, DType::F32, &DEV).unwrap(),
        8,
        4,
        -1e-5,
    ));
    assert!(m.contains("eps (-0.00001)"), "{m}");
    let m = err_msg(GroupNorm::new(
        Tensor::ones(6, DType::F32, &DEV).unwrap(),
        Tensor::zeros(8, DType::F32, &DEV).unwrap(),
        8,
        4,
        1e-5,
    ));
    assert!(m.contains("weight has shape [6], expected [8]"), "{m}");
}

#[test]
fn group_norm_bad_input_errors() -> anyhow::Result<()> {
    let layer = gn(8, 4)?;
    let m = err_msg(layer.forward(&randn(&[2, 8], 1.0)));
    assert!(m.contains("rank >= 3") && m.contains("[2, 8]"), "{m}");
    let m = err_msg(layer.forward(&randn(&[2, 6, 3, 3], 1.0)));
    assert!(m.contains("6 channels") && m.contains("built for 8"), "{m}");
    let m = err_msg(layer.forward_silu(&randn(&[2, 6, 3, 3], 1.0)));
    assert!(m.contains("6 channels"), "{m}");
    Ok(())
}

#[test]
fn group_norm_builder_validates_before_creating_variables() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &DEV);
    assert!(group_norm(5, 48, 1e-5, vb.pp("n")).is_err());
    assert!(
        vm.all_vars().is_empty(),
        "a rejected config must not create variables"
    );
}

#[test]
fn missing_checkpoint_keys_are_errors_naming_the_key() {
    let mut tensors = HashMap::new();
    tensors.insert(
        "n.weight".to_string(),
        Tensor::ones(8, DType::F32, &DEV).unwrap(),
    );
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &DEV);
    let m = err_msg(group_norm(4, 8, 1e-5, vb.pp("n")));
    assert!(m.contains("n.bias"), "{m}");
    let m = err_msg(keel_norm::frozen_batch_norm2d(
        8,
        Default::default(),
        vb.pp("n"),
    ));
    assert!(m.contains("n.bias"), "{m}");
}

/// GroupNorm's output for a sample does not depend on the rest of the batch, in train mode.
#[test]
fn group_norm_is_batch_independent() -> anyhow::Result<()> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &DEV);
    let block = conv_norm_act(
        3,
        16,
        3,
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        "gn".parse()?,
        Activation::Silu,
        vb,
    )?;
    let x = randn(&[4, 3, 7, 5], 2.0);
    let full = block.forward_t(&x, true)?;
    for i in 0..4 {
        let one = block.forward_t(&x.narrow(0, i, 1)?, true)?;
        assert_close(
            &format!("sample {i}"),
            &one,
            &full.narrow(0, i, 1)?,
            Tol::new(1e-5, 1e-5),
        );
    }
    Ok(())
}

#[test]
fn norm_kind_parses_and_displays() {
    let cases = [
        ("bn", NormKind::BatchNorm),
        ("frozen-bn", NormKind::FrozenBatchNorm),
        ("gn", NormKind::GroupNorm { groups: None }),
        ("gn:16", NormKind::GroupNorm { groups: Some(16) }),
        ("ws-gn", NormKind::WsGroupNorm { groups: None }),
        ("ws-gn:8", NormKind::WsGroupNorm { groups: Some(8) }),
    ];
    for (s, kind) in cases {
        assert_eq!(s.parse::<NormKind>().unwrap(), kind);
        assert_eq!(kind.to_string(), s);
    }
    assert_eq!(
        " GN:4 ".parse::<NormKind>().unwrap(),
        NormKind::GroupNorm { groups: Some(4) }
    );
    for bad in ["layernorm", "gn:0", "gn:x", "bn:4", ""] {
        let m = err_msg(bad.parse::<NormKind>());
        assert!(m.contains(bad.trim()), "{bad}: {m}");
    }
}

#[test]
fn norm_kind_groups_for() {
    let gn = NormKind::GroupNorm { groups: None };
    assert_eq!(gn.groups_for(48).unwrap(), Some(24));
    assert_eq!(NormKind::BatchNorm.groups_for(48).unwrap(), None);
    let m = err_msg(NormKind::GroupNorm { groups: Some(16) }.groups_for(24));
    assert!(
        m.contains("16 groups do not divide a layer of 24 channels") && m.contains("8"),
        "{m}"
    );
}

/// Every kind builds a conv+norm+act block whose forward runs and whose trainable
/// parameters (and only those) receive gradients; names follow PyTorch.
#[test]
fn every_norm_kind_trains_in_a_block() -> anyhow::Result<()> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    for (kind, trainable) in [
        ("bn", vec!["conv.weight", "norm.weight", "norm.bias"]),
        ("frozen-bn", vec!["conv.weight"]),
        ("gn", vec!["conv.weight", "norm.weight", "norm.bias"]),
        ("gn:4", vec!["conv.weight", "norm.weight", "norm.bias"]),
        ("ws-gn", vec!["conv.weight", "norm.weight", "norm.bias"]),
    ] {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &DEV);
        let block = conv_norm_act(3, 8, 3, cfg, kind.parse()?, Activation::Relu, vb)?;
        let y = block.forward_t(&randn(&[2, 3, 6, 6], 1.0), true)?;
        assert_eq!(y.dims(), &[2, 8, 6, 6]);
        let grads = (y.sqr()?.sum_all()?).backward()?;
        let data = vm.data().lock().unwrap();
        let mut names: Vec<_> = data.keys().cloned().collect();
        names.sort();
        for (name, var) in data.iter() {
            let has = grads.get(var).is_some();
            assert_eq!(
                has,
                trainable.contains(&name.as_str()),
                "{kind}: gradient of {name}"
            );
        }
        if kind.ends_with("bn") {
            assert!(
                names.contains(&"norm.running_var".to_string()),
                "{kind}: {names:?}"
            );
        }
    }
    Ok(())
}

/// The fused GroupNorm + SiLU path of a block equals GroupNorm followed by SiLU, in value and
/// in the gradients that reach the conv and the norm.
#[test]
fn fused_gn_silu_in_block_equals_composed() -> anyhow::Result<()> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &DEV);
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let fused = conv_norm_act(4, 12, 3, cfg, "gn".parse()?, Activation::Silu, vb.clone())?;
    let x = randn(&[2, 4, 5, 7], 1.5);
    let y_fused = fused.forward_t(&x, true)?;
    let y_comp = candle_nn::ops::silu(&fused.norm().forward_t(&fused.conv().forward(&x)?, true)?)?;
    assert_close("gn+silu", &y_fused, &y_comp, Tol::new(1e-5, 1e-5));
    let g1 = y_fused.sqr()?.sum_all()?.backward()?;
    let g2 = y_comp.sqr()?.sum_all()?.backward()?;
    for (name, var) in vm.data().lock().unwrap().iter() {
        assert_close(
            name,
            g1.get(var).unwrap(),
            g2.get(var).unwrap(),
            Tol::new(1e-4, 1e-5),
        );
    }
    Ok(())
}

#[test]
fn batch_norm_refuses_one_value_per_channel_in_training() -> anyhow::Result<()> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &DEV);
    let bn = norm(NormKind::BatchNorm, 4, vb)?;
    let m = err_msg(bn.forward_t(&randn(&[1, 4, 1, 1], 1.0), true));
    assert!(
        m.contains("more than 1 value per channel") && m.contains("gn"),
        "{m}"
    );
    // Eval uses running statistics and works at any size.
    bn.forward_t(&randn(&[1, 4, 1, 1], 1.0), false)?;
    Ok(())
}

#[test]
fn frozen_bn_statistics_never_change_and_eps_zero_works() -> anyhow::Result<()> {
    let t = |v: &[f32]| Tensor::new(v, &DEV).unwrap();
    let bn = FrozenBatchNorm2d::new(
        t(&[2., 1.]),
        t(&[1., 0.]),
        t(&[3., -1.]),
        t(&[4., 0.25]),
        0.0,
    )?;
    let x = Tensor::new(&[[[[5f32]], [[1.]]]], &DEV)?;
    // (5 - 3) / 2 * 2 + 1 = 3 ; (1 + 1) / 0.5 * 1 + 0 = 4
    assert_eq!(bn.forward(&x)?.flatten_all()?.to_vec1::<f32>()?, [3.0, 4.0]);
    let before = bn.tensors().map(|(_, t)| t.to_vec1::<f32>().unwrap());
    for _ in 0..3 {
        bn.forward(&randn(&[2, 2, 3, 3], 5.0))?;
    }
    assert_eq!(
        bn.tensors().map(|(_, t)| t.to_vec1::<f32>().unwrap()),
        before
    );
    let m = err_msg(FrozenBatchNorm2d::new(
        t(&[1.]),
        t(&[1.]),
        t(&[1., 2.]),
        t(&[1.]),
        1e-5,
    ));
    assert!(
        m.contains("running_mean has shape [2], expected [1]"),
        "{m}"
    );
    let m = err_msg(FrozenBatchNorm2d::new(
        t(&[1.]),
        t(&[1.]),
        t(&[1.]),
        t(&[1.]),
        -1.0,
    ));
    assert!(m.contains("eps (-1)"), "{m}");
    let m = err_msg(bn.forward(&randn(&[1, 3, 2, 2], 1.0)));
    assert!(m.contains("expected (N, 2, *)"), "{m}");
    Ok(())
}

/// conv -> FrozenBN equals the folded conv, with and without a conv bias, for candle-nn's
/// Conv2d and for raw tensors.
#[test]
fn frozen_bn_folds_into_conv() -> anyhow::Result<()> {
    let c = 6;
    let bn = FrozenBatchNorm2d::new(
        randn(&[c], 1.0),
        randn(&[c], 1.0),
        randn(&[c], 1.0),
        (randn(&[c], 1.0).abs()? + 0.1)?,
        1e-5,
    )?;
    let x = randn(&[2, 3, 7, 7], 1.0);
    let cfg = Conv2dConfig {
        padding: 1,
        stride: 2,
        ..Default::default()
    };
    for bias in [None, Some(randn(&[c], 1.0))] {
        let conv = candle_nn::Conv2d::new(randn(&[c, 3, 3, 3], 0.5), bias, cfg);
        let reference = bn.forward(&conv.forward(&x)?)?;
        let folded = bn.fold_into(&conv)?;
        assert_close(
            "folded conv",
            &folded.forward(&x)?,
            &reference,
            Tol::new(1e-4, 1e-5),
        );
    }
    let m = err_msg(bn.fold_into_conv(&randn(&[4, 3, 3, 3], 1.0), None));
    assert!(m.contains("expected 6 output channels"), "{m}");
    Ok(())
}

#[test]
fn ws_conv_standardizes_and_validates() -> anyhow::Result<()> {
    let w = (randn(&[5, 3, 3, 3], 0.2) + 0.7)?;
    for ws in [WsConfig::mmcv(), WsConfig::timm()] {
        let conv = WsConv2d::new(w.clone(), None, Default::default(), ws)?;
        let sw = conv.standardized_weight()?.reshape((5, 27))?;
        let mean = sw.mean_keepdim(1)?;
        assert_close(
            "ws mean",
            &mean,
            &Tensor::zeros((5, 1), DType::F32, &DEV)?,
            Tol::new(0.0, 1e-5),
        );
        let var = sw.sqr()?.mean_keepdim(1)?; // biased
        let expected = if ws == WsConfig::mmcv() {
            26.0 / 27.0
        } else {
            1.0
        };
        assert_close(
            "ws var",
            &var,
            &Tensor::full(expected as f32, (5, 1), &DEV)?,
            Tol::new(1e-3, 1e-3),
        );
    }
    let m = err_msg(WsConv2d::new(
        randn(&[4, 1, 1, 1], 1.0),
        None,
        Default::default(),
        WsConfig::mmcv(),
    ));
    assert!(
        m.contains("fan-in >= 2") && m.contains("WsConfig::timm()"),
        "{m}"
    );
    WsConv2d::new(
        randn(&[4, 1, 1, 1], 1.0),
        None,
        Default::default(),
        WsConfig::timm(),
    )?;
    let conv = WsConv2d::new(
        randn(&[4, 3, 5, 5], 1.0),
        None,
        Default::default(),
        WsConfig::mmcv(),
    )?;
    let m = err_msg(conv.forward(&randn(&[1, 3, 4, 4], 1.0)));
    assert!(m.contains("larger than the padded input"), "{m}");
    let m = err_msg(conv.forward(&randn(&[1, 2, 8, 8], 1.0)));
    assert!(m.contains("input has 2 channels"), "{m}");
    let m = err_msg(WsConv2d::new(
        randn(&[4, 3, 3, 3], 1.0),
        Some(randn(&[3], 1.0)),
        Default::default(),
        WsConfig::mmcv(),
    ));
    assert!(m.contains("bias has shape [3], expected [4]"), "{m}");
    Ok(())
}

/// A toy ResNet-style state dict: conv1/bn1, layer1.0.{conv1,bn1}, fc.
fn toy_state() -> StateDict {
    let mut sd = StateDict::new();
    for (conv, bn, c_in, c) in [
        ("conv1", "bn1", 3, 8),
        ("layer1.0.conv1", "layer1.0.bn1", 8, 8),
    ] {
        sd.insert(format!("{conv}.weight"), randn(&[c, c_in, 3, 3], 0.3));
        sd.insert(format!("{bn}.weight"), randn(&[c], 1.0));
        sd.insert(format!("{bn}.bias"), randn(&[c], 1.0));
        sd.insert(format!("{bn}.running_mean"), randn(&[c], 1.0));
        sd.insert(
            format!("{bn}.running_var"),
            (randn(&[c], 1.0).abs().unwrap() + 0.2).unwrap(),
        );
        sd.insert(
            format!("{bn}.num_batches_tracked"),
            Tensor::new(&[100i64], &DEV).unwrap().squeeze(0).unwrap(),
        );
    }
    sd.insert("fc.weight".into(), randn(&[10, 8], 1.0));
    sd
}

#[test]
fn convert_bn_to_frozen_and_group_norm() -> anyhow::Result<()> {
    let sd = toy_state();
    assert_eq!(find_batch_norms(&sd), ["bn1", "layer1.0.bn1"]);

    let mut frozen = sd.clone();
    assert_eq!(bn_to_frozen_bn(&mut frozen, None)?, ["bn1", "layer1.0.bn1"]);
    assert_eq!(frozen.len(), sd.len() - 2);
    assert!(
        frozen.contains_key("bn1.running_var") && !frozen.contains_key("bn1.num_batches_tracked")
    );
    // The converted dict loads into FrozenBatchNorm2d through a VarBuilder unchanged.
    let vb = VarBuilder::from_tensors(frozen, DType::F32, &DEV);
    let fbn = keel_norm::frozen_batch_norm2d(8, Default::default(), vb.pp("bn1"))?;
    assert_close(
        "loaded running_var",
        fbn.tensors()[3].1,
        &sd["bn1.running_var"],
        Tol::EXACT,
    );

    let mut gn = sd.clone();
    assert_eq!(
        bn_to_group_norm(&mut gn, Some(&["bn1".to_string()]))?,
        ["bn1"]
    );
    assert!(gn.contains_key("bn1.weight") && gn.contains_key("bn1.bias"));
    assert!(
        !gn.contains_key("bn1.running_mean")
            && !gn.contains_key("bn1.running_var")
            && !gn.contains_key("bn1.num_batches_tracked")
    );
    assert!(
        gn.contains_key("layer1.0.bn1.running_var"),
        "only the listed prefix is converted"
    );
    let vb = VarBuilder::from_tensors(gn, DType::F32, &DEV);
    group_norm(group_count(8, 32), 8, 1e-5, vb.pp("bn1"))?;
    Ok(())
}

#[test]
fn convert_errors_leave_the_state_unchanged() {
    let mut sd = toy_state();
    sd.remove("layer1.0.bn1.running_var");
    let before: Vec<_> = {
        let mut k: Vec<_> = sd.keys().cloned().collect();
        k.sort();
        k
    };
    let prefixes = ["bn1".to_string(), "layer1.0.bn1".to_string()];
    let m = err_msg(bn_to_group_norm(&mut sd, Some(&prefixes)));
    assert!(m.contains("layer1.0.bn1.running_var"), "{m}");
    let m = err_msg(bn_to_frozen_bn(&mut sd, Some(&prefixes)));
    assert!(m.contains("layer1.0.bn1.running_var"), "{m}");
    let mut after: Vec<_> = sd.keys().cloned().collect();
    after.sort();
    assert_eq!(before, after);
    let mut empty = StateDict::new();
    assert!(err_msg(bn_to_frozen_bn(&mut empty, None)).contains("no BatchNorm found"));
}

#[test]
fn convert_folds_bn_into_conv() -> anyhow::Result<()> {
    let sd = toy_state();
    let x = randn(&[1, 3, 9, 9], 1.0);
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let conv = candle_nn::Conv2d::new(sd["conv1.weight"].clone(), None, cfg);
    let bn = FrozenBatchNorm2d::new(
        sd["bn1.weight"].clone(),
        sd["bn1.bias"].clone(),
        sd["bn1.running_mean"].clone(),
        sd["bn1.running_var"].clone(),
        1e-5,
    )?;
    let reference = bn.forward(&conv.forward(&x)?)?;
    let mut folded = sd.clone();
    fold_bn_into_conv(&mut folded, &[("conv1".into(), "bn1".into())], 1e-5)?;
    assert!(!folded.keys().any(|k| k.starts_with("bn1.")));
    let conv = candle_nn::Conv2d::new(
        folded["conv1.weight"].clone(),
        Some(folded["conv1.bias"].clone()),
        cfg,
    );
    assert_close(
        "folded",
        &conv.forward(&x)?,
        &reference,
        Tol::new(1e-4, 1e-5),
    );
    let m = err_msg(fold_bn_into_conv(
        &mut folded,
        &[("nope".into(), "layer1.0.bn1".into())],
        1e-5,
    ));
    assert!(m.contains("nope.weight"), "{m}");
    assert!(
        folded.contains_key("layer1.0.bn1.running_var"),
        "failed fold leaves the state unchanged"
    );
    Ok(())
}

#[test]
fn recommend_follows_the_decision_table() {
    for b in [0, 1, 2, 3, 4, 8, 15] {
        assert_eq!(
            recommend(b, false),
            NormKind::GroupNorm { groups: None },
            "batch {b}"
        );
        assert_eq!(recommend(b, true), NormKind::FrozenBatchNorm, "batch {b}");
    }
    for b in [16, 32, 256] {
        assert_eq!(recommend(b, false), NormKind::BatchNorm);
        assert_eq!(recommend(b, true), NormKind::BatchNorm);
    }
    // Never trainable BN at small batch.
    for b in 0..16 {
        for p in [false, true] {
            assert_ne!(recommend(b, p), NormKind::BatchNorm);
        }
    }
}

#[test]
fn var_grads_reach_raw_ws_weight() -> anyhow::Result<()> {
    let w = Var::from_tensor(&randn(&[4, 3, 3, 3], 0.3))?;
    let conv = WsConv2d::new(
        w.as_tensor().clone(),
        None,
        Default::default(),
        WsConfig::mmcv(),
    )?;
    let grads = conv
        .forward(&randn(&[1, 3, 5, 5], 1.0))?
        .sqr()?
        .sum_all()?
        .backward()?;
    let g = grads.get(&w).expect("raw weight gets a gradient");
    // Standardization removes the per-filter mean, so each filter's gradient sums to ~0.
    let sums = g.reshape((4, 27))?.sum(1)?;
    assert_close(
        "grad sums",
        &sums,
        &Tensor::zeros(4, DType::F32, &DEV)?,
        Tol::new(0.0, 1e-3),
    );
    Ok(())
}

/// candle 0.11.1's conv2d backward fails for stride > 1 when rows and columns leave different
/// remainders (7x8 at stride 2); keel's conv layers route around it.
#[test]
fn strided_conv_on_non_square_input_backpropagates() -> anyhow::Result<()> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride: 2,
        ..Default::default()
    };
    let x = Var::from_tensor(&randn(&[2, 3, 7, 8], 1.0))?;
    // Plain candle fails here (the bug this guards against).
    let w = randn(&[4, 3, 3, 3], 0.5);
    let plain = x.as_tensor().conv2d(&w, 1, 2, 1, 1)?.sum_all()?.backward();
    assert!(
        plain.is_err(),
        "candle fixed its conv2d backward: drop keel-norm's workaround"
    );
    for kind in ["gn", "ws-gn", "bn"] {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &DEV);
        let block = conv_norm_act(3, 4, 3, cfg, kind.parse()?, Activation::Silu, vb)?;
        let y = block.forward_t(x.as_tensor(), true)?;
        assert_eq!(y.dims(), &[2, 4, 4, 4]);
        let grads = y.sqr()?.sum_all()?.backward()?;
        assert_eq!(grads.get(&x).unwrap().dims(), &[2, 3, 7, 8], "{kind}");
    }
    // The cropped path computes the same forward as candle's padded conv.
    let conv = candle_nn::Conv2d::new(w.clone(), None, cfg);
    let ours = keel_norm::Conv::Plain(conv).forward(x.as_tensor())?;
    assert_close(
        "cropped conv",
        &ours,
        &x.as_tensor().conv2d(&w, 1, 2, 1, 1)?,
        Tol::new(1e-6, 1e-6),
    );
    Ok(())
}
