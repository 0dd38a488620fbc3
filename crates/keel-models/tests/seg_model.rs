//! SegModel / ResNetSeg: names, shapes at odd sizes, gradients reaching the head and the
//! unfrozen stages only, the optimizer groups, loading a torchvision backbone (and refusing
//! a bad one before anything changes), and the twin unchanged behind the enum.

use anyhow::Result;
use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use keel_models::resnet::{ResNetConfig, ResNetDepth};
use keel_models::seg::{init_weights, ModelConfig, SegNet};
use keel_models::seg_model::{ResNetSegConfig, SegModel, SegModelConfig};
use keel_norm::convert::StateDict;
use keel_norm::NormKind;
use keel_optim::NoDecay;

const DEV: Device = Device::Cpu;

fn r18(backbone_norm: &str, head_norm: &str, freeze_at: usize) -> Result<SegModelConfig> {
    Ok(SegModelConfig::ResNet(ResNetSegConfig {
        depth: ResNetDepth::R18,
        backbone_norm: backbone_norm.parse()?,
        head_norm: head_norm.parse()?,
        freeze_at,
        fpn: 16,
        num_classes: 3,
    }))
}

fn build(cfg: &SegModelConfig) -> Result<(VarMap, SegModel)> {
    let vm = VarMap::new();
    let model = SegModel::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &DEV))?;
    init_weights(&vm, 3)?;
    Ok((vm, model))
}

fn names(vm: &VarMap) -> Vec<String> {
    let mut n: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    n.sort();
    n
}

/// A torchvision-layout ResNet-18 BN state dict with small positive values (a real one has
/// `num_batches_tracked` too).
fn torchvision_r18() -> Result<StateDict> {
    let mut sd: StateDict = ResNetConfig::backbone(ResNetDepth::R18, NormKind::BatchNorm)
        .state_dict_keys()
        .into_iter()
        .map(|(k, s)| {
            let t = Tensor::rand(0f32, 1.0, s.as_slice(), &DEV)?;
            // Conv weights U(-b, b) with He's bound; norm tensors in [0.5, 0.55].
            let t = match s.as_slice() {
                [_, c, kh, kw] => t.affine(
                    2.0 * (6.0 / (c * kh * kw) as f64).sqrt(),
                    -(6.0 / (c * kh * kw) as f64).sqrt(),
                )?,
                _ => t.affine(0.05, 0.5)?,
            };
            Ok((k, t))
        })
        .collect::<Result<_>>()?;
    sd.insert(
        "bn1.num_batches_tracked".into(),
        Tensor::new(&[7i64], &DEV)?.squeeze(0)?,
    );
    Ok(sd)
}

#[test]
fn resnet_seg_names_are_torchvisions_under_backbone_and_segnets_for_the_head() -> Result<()> {
    let (vm, _) = build(&r18("frozen-bn", "gn:8", 2)?)?;
    let n = names(&vm);
    for k in [
        "backbone.conv1.weight",
        "backbone.bn1.running_var",
        "backbone.layer1.0.bn1.weight",
        "backbone.layer2.0.downsample.0.weight",
        "backbone.layer4.1.conv2.weight",
        "lat.0.weight",
        "lat.3.bias",
        "smooth.0.weight",
        "smooth.1.weight",
        "head.weight",
        "head.bias",
    ] {
        assert!(n.iter().any(|x| x == k), "missing {k}");
    }
    let backbone = n.iter().filter(|k| k.starts_with("backbone.")).count();
    assert_eq!(backbone, 20 * 5, "20 convs, each with 4 FrozenBN tensors");
    assert_eq!(n.len() - backbone, 4 * 2 + 1 + 2 + 2);
    Ok(())
}

#[test]
fn logits_have_the_input_size_at_odd_sizes() -> Result<()> {
    for (bb, head) in [("frozen-bn", "gn:8"), ("gn:8", "bn"), ("ws-gn:8", "gn:4")] {
        let (_, model) = build(&r18(bb, head, 1)?)?;
        for (h, w) in [(32, 32), (45, 38), (33, 65), (7, 9)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &DEV)?;
            let y = model.forward(&x, true)?;
            assert_eq!(y.dims(), &[2, 3, h, w], "{bb}/{head} {h}x{w}");
            assert_eq!(model.forward(&x, false)?.dims(), &[2, 3, h, w]);
        }
    }
    Ok(())
}

#[test]
fn gradients_reach_the_head_and_the_unfrozen_stages_only() -> Result<()> {
    for (bb, freeze_at) in [("frozen-bn", 2), ("gn:8", 3), ("bn", 1), ("gn:8", 0)] {
        let (vm, model) = build(&r18(bb, "gn:8", freeze_at)?)?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 40, 36), &DEV)?;
        let loss = model.forward(&x, true)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        let groups = model.param_groups(&vm, 0.1, NoDecay::Rank)?;
        let in_groups: Vec<_> = groups.iter().flat_map(|g| g.vars.iter()).collect();
        let data = vm.data().lock().unwrap();
        let stage = |k: &str| {
            let k = k.strip_prefix("backbone.")?;
            Some(match k.split('.').next()? {
                "conv1" | "bn1" => 1,
                l => l.strip_prefix("layer")?.parse::<usize>().ok()? + 1,
            })
        };
        let stats = |k: &str| k.ends_with("running_mean") || k.ends_with("running_var");
        let norm_tensor = |k: &str| k.contains(".bn") || k.contains("downsample.1.");
        for (k, v) in data.iter() {
            let has_grad = grads.get(v.as_tensor()).is_some();
            let in_optim = in_groups
                .iter()
                .any(|g| g.as_tensor().id() == v.as_tensor().id());
            let want = !stats(k)
                && match stage(k) {
                    None => true,
                    Some(s) => s > freeze_at && !(bb == "frozen-bn" && norm_tensor(k)),
                };
            assert_eq!(
                has_grad, want,
                "{bb} freeze_at {freeze_at}: gradient of {k}"
            );
            if !stats(k) {
                assert_eq!(
                    in_optim, want,
                    "{bb} freeze_at {freeze_at}: {k} in the optimizer"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn param_groups_split_head_and_backbone_with_the_multiplier() -> Result<()> {
    let (vm, model) = build(&r18("frozen-bn", "gn:8", 2)?)?;
    let g = model.param_groups(&vm, 0.25, NoDecay::Rank)?;
    let summary: Vec<_> = g
        .iter()
        .map(|g| (g.vars.len(), g.lr_mult, g.weight_decay))
        .collect();
    // head: lat x4 + smooth.0 + head weights decay; 4 + 1 biases + smooth.1 weight/bias not.
    // backbone (layer2-4, FrozenBN): 3 stages x (4 convs + 1 downsample) conv weights.
    assert_eq!(
        summary,
        [
            (6, 1.0, None),
            (7, 1.0, Some(0.0)),
            (15, 0.25, None),
            (0, 0.25, Some(0.0))
        ]
    );
    let e = model
        .param_groups(&vm, f64::NAN, NoDecay::Rank)
        .unwrap_err()
        .to_string();
    assert!(e.contains("backbone_lr_mult NaN"), "{e}");
    Ok(())
}

#[test]
fn a_torchvision_checkpoint_loads_into_the_backbone_and_keeps_the_head() -> Result<()> {
    let cfg = r18("frozen-bn", "gn:8", 2)?;
    let (vm, model) = build(&cfg)?;
    let SegModel::ResNet(m) = &model else {
        unreachable!()
    };
    let head_before = vm.data().lock().unwrap()["head.weight"]
        .flatten_all()?
        .to_vec1::<f32>()?;
    let sd = torchvision_r18()?;
    let want = sd["layer3.1.bn2.running_var"].to_vec1::<f32>()?;
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &DEV);
    let report = m.load_backbone(sd, &vm, vb)?;
    assert_eq!(report.loaded, 100);
    assert_eq!(report.converted.len(), 20);
    assert_eq!(report.dropped_num_batches_tracked, 1);
    let data = vm.data().lock().unwrap();
    assert_eq!(
        data["backbone.layer3.1.bn2.running_var"].to_vec1::<f32>()?,
        want
    );
    assert_eq!(
        data["head.weight"].flatten_all()?.to_vec1::<f32>()?,
        head_before
    );
    drop(data);
    let x = Tensor::randn(0f32, 1.0, (1, 3, 32, 32), &DEV)?;
    assert!(model
        .forward(&x, false)?
        .sum_all()?
        .to_scalar::<f32>()?
        .is_finite());
    Ok(())
}

#[test]
fn bad_checkpoints_name_the_first_bad_key_and_change_nothing() -> Result<()> {
    let (vm, model) = build(&r18("frozen-bn", "gn:8", 2)?)?;
    let SegModel::ResNet(m) = &model else {
        unreachable!()
    };
    let before = vm.data().lock().unwrap()["backbone.conv1.weight"]
        .flatten_all()?
        .to_vec1::<f32>()?;
    let vb = || VarBuilder::from_varmap(&vm, DType::F32, &DEV);
    let mut missing = torchvision_r18()?;
    missing.remove("layer2.0.downsample.1.running_mean");
    let e = m.load_backbone(missing, &vm, vb()).unwrap_err().to_string();
    assert!(
        e.contains("lacks layer2.0.downsample.1.running_mean"),
        "{e}"
    );
    let mut missing = torchvision_r18()?;
    missing.remove("layer2.0.downsample.0.weight");
    let e = m.load_backbone(missing, &vm, vb()).unwrap_err().to_string();
    assert!(
        e.contains("lacks 'layer2.0.downsample.0.weight' (shape [128, 64, 1, 1])"),
        "{e}"
    );
    let mut shape = torchvision_r18()?;
    shape.insert(
        "layer1.0.conv1.weight".into(),
        Tensor::zeros((64, 64, 1, 1), DType::F32, &DEV)?,
    );
    let e = m.load_backbone(shape, &vm, vb()).unwrap_err().to_string();
    assert!(
        e.contains("'layer1.0.conv1.weight' has shape [64, 64, 1, 1]"),
        "{e}"
    );
    assert!(e.contains("expects [64, 64, 3, 3]"), "{e}");
    let after = vm.data().lock().unwrap()["backbone.conv1.weight"]
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(before, after);
    Ok(())
}

/// A small twin (width 8, fpn 8, 3 classes, GN with 4 groups).
fn small_twin() -> Result<ModelConfig> {
    Ok(ModelConfig {
        width: 8,
        fpn: 8,
        num_classes: 3,
        norm: "gn:4".parse()?,
    })
}

#[test]
fn the_twin_behind_the_enum_is_segnet() -> Result<()> {
    let c = small_twin()?;
    let (vm, model) = build(&SegModelConfig::Twin(c))?;
    let vm2 = VarMap::new();
    let net = SegNet::new(&c, VarBuilder::from_varmap(&vm2, DType::F32, &DEV))?;
    init_weights(&vm2, 3)?;
    let x = Tensor::randn(0f32, 1.0, (1, 3, 33, 35), &DEV)?;
    let a = model.forward(&x, true)?.flatten_all()?.to_vec1::<f32>()?;
    let b = net.forward(&x, true)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a, b);
    assert_eq!(model.param_groups(&vm, 0.1, NoDecay::Rank)?.len(), 2);
    Ok(())
}

/// The twin names its norms by position (`stages.0.0.n1`, `skip.1`): NoDecay::Rank exempts
/// every one of them (and every bias) from weight decay and decays every conv weight;
/// the legacy name rule decays the norm weights, which is why runs record their rule.
#[test]
fn twin_norms_get_no_weight_decay_under_the_rank_rule() -> Result<()> {
    let c = small_twin()?;
    let (vm, model) = build(&SegModelConfig::Twin(c))?;
    let names: std::collections::HashMap<_, _> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (v.as_tensor().id(), (n.clone(), v.rank())))
        .collect();
    let split = |rule| -> Result<[Vec<(String, usize)>; 2]> {
        let g = model.param_groups(&vm, 1.0, rule)?;
        assert_eq!(g.len(), 2);
        assert_eq!(g[1].weight_decay, Some(0.0));
        assert_eq!(g[0].weight_decay, None);
        let of = |i: usize| {
            g[i].vars
                .iter()
                .map(|v| names[&v.as_tensor().id()].clone())
                .collect()
        };
        Ok([of(0), of(1)])
    };
    let [decay, no_decay] = split(NoDecay::Rank)?;
    assert!(decay.iter().all(|(_, r)| *r == 4), "{decay:?}");
    assert!(no_decay.iter().all(|(_, r)| *r == 1), "{no_decay:?}");
    assert!(
        no_decay.iter().any(|(n, _)| n.ends_with(".n1.weight")),
        "{no_decay:?}"
    );
    assert_eq!(decay.len() + no_decay.len(), names.len());
    let [legacy_decay, _] = split(NoDecay::Names)?;
    let norm_weight = |(n, r): &(String, usize)| *r == 1 && n.ends_with(".n1.weight");
    assert!(legacy_decay.iter().any(norm_weight), "{legacy_decay:?}");
    Ok(())
}

#[test]
fn mixed_precision_refuses_trainable_batch_norm_and_runs_otherwise() -> Result<()> {
    let bn = r18("bn", "gn:8", 2)?;
    let e = bn.check_dtype(DType::F16).unwrap_err().to_string();
    assert!(e.contains("trains in f32 only"), "{e}");
    assert!(bn.check_dtype(DType::F32).is_ok());
    let cfg = r18("frozen-bn", "gn:8", 2)?;
    let (vm, model) = build(&cfg)?;
    let x = Tensor::randn(0f32, 1.0, (1, 3, 32, 32), &DEV)?;
    let y = model.forward_in(&cfg, &vm, &x, DType::F16, true)?;
    assert_eq!((y.dims(), y.dtype()), (&[1, 3, 32, 32][..], DType::F16));
    let grads = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
    let data = vm.data().lock().unwrap();
    assert!(grads.get(data["head.weight"].as_tensor()).is_some());
    assert!(grads
        .get(data["backbone.layer3.0.conv1.weight"].as_tensor())
        .is_some());
    assert!(grads
        .get(data["backbone.layer1.0.conv1.weight"].as_tensor())
        .is_none());
    Ok(())
}

#[test]
fn configs_are_validated() -> Result<()> {
    let SegModelConfig::ResNet(c) = r18("frozen-bn", "gn:8", 2)? else {
        unreachable!()
    };
    let e = ResNetSegConfig { fpn: 0, ..c }
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("fpn must be at least 1"), "{e}");
    let e = ResNetSegConfig {
        head_norm: "gn:5".parse()?,
        ..c
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("head_norm gn:5 at smooth.1 (16 channels)"),
        "{e}"
    );
    let e = ResNetSegConfig { freeze_at: 7, ..c }
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("freeze_at 7"), "{e}");
    let json = serde_json::to_string(&SegModelConfig::ResNet(c))?;
    assert_eq!(
        serde_json::from_str::<SegModelConfig>(&json)?,
        SegModelConfig::ResNet(c)
    );
    Ok(())
}
