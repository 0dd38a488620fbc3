//! SegNet: the PyTorch twin's parameter count and names, config validation and serde,
//! seeded init, and the forward against the example's composed resize ops.

use anyhow::Result;
use candle::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use keel_models::seg::{count_params, init_weights, ModelConfig, SegNet};

fn build(cfg: &ModelConfig) -> Result<(VarMap, SegNet)> {
    let vm = VarMap::new();
    let net = SegNet::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    Ok((vm, net))
}

#[test]
fn model_is_the_torch_twin() -> Result<()> {
    let cfg = ModelConfig {
        width: 64,
        fpn: 128,
        num_classes: 21,
        norm: "gn".parse()?,
    };
    assert_eq!(cfg, ModelConfig::default());
    let (vm, _net) = build(&cfg)?;
    // sum(p.numel() for p in SegNet("gn").parameters()) in torch_seg_twin.py
    assert_eq!(count_params(&vm), 11_460_277);
    let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    for n in [
        "stem.0.weight",
        "stem.1.weight",
        "stem.3.weight",
        "stem.4.bias",
        "stages.1.0.skip.0.weight",
        "stages.1.0.skip.1.weight",
        "stages.3.1.c2.weight",
        "stages.0.0.n1.bias",
        "lat.3.bias",
        "smooth.0.weight",
        "smooth.1.weight",
        "head.weight",
        "head.bias",
    ] {
        assert!(names.iter().any(|k| k == n), "missing {n}");
    }
    // BN variant: running statistics under PyTorch's keys, and the BN list names them.
    let (vm, net) = build(&ModelConfig {
        norm: "bn".parse()?,
        ..cfg
    })?;
    assert!(vm
        .data()
        .lock()
        .unwrap()
        .contains_key("stages.2.0.skip.1.running_var"));
    assert_eq!(net.batch_norms()[0].0, "stem.1");
    assert_eq!(
        net.batch_norms().last().map(|b| b.0.as_str()),
        Some("smooth.1")
    );
    Ok(())
}

#[test]
fn validate_names_the_field_and_the_value() -> Result<()> {
    let ok = ModelConfig {
        width: 8,
        fpn: 16,
        num_classes: 3,
        norm: "gn:4".parse()?,
    };
    ok.validate()?;
    let msg = |c: ModelConfig| {
        c.validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(msg(ModelConfig { width: 7, ..ok }).contains("width 7 must be an even number"));
    assert!(msg(ModelConfig { fpn: 0, ..ok }).contains("fpn must be at least 1"));
    assert!(msg(ModelConfig {
        num_classes: 1,
        ..ok
    })
    .contains("num_classes 1 must be at least 2"));
    let e = msg(ModelConfig { width: 6, ..ok });
    assert!(e.contains("norm gn:4 at layer stem.1 (3 channels)"), "{e}");
    // SegNet::new validates before creating any variable.
    let vm = VarMap::new();
    let bad = ModelConfig { width: 6, ..ok };
    assert!(SegNet::new(&bad, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).is_err());
    assert!(vm.all_vars().is_empty());
    Ok(())
}

#[test]
fn config_round_trips_through_serde_with_the_norm_as_text() -> Result<()> {
    let cfg = ModelConfig {
        width: 16,
        fpn: 32,
        num_classes: 5,
        norm: "ws-gn:8".parse()?,
    };
    let json = serde_json::to_string(&cfg)?;
    assert_eq!(
        json,
        r#"{"width":16,"fpn":32,"num_classes":5,"norm":"ws-gn:8"}"#
    );
    assert_eq!(serde_json::from_str::<ModelConfig>(&json)?, cfg);
    Ok(())
}

#[test]
fn init_is_seeded_and_follows_pytorch_rules() -> Result<()> {
    let cfg = ModelConfig {
        width: 4,
        fpn: 8,
        num_classes: 3,
        norm: "bn".parse()?,
    };
    let snapshot = |seed: u64| -> Result<Vec<(String, Vec<f32>)>> {
        let (vm, _net) = build(&cfg)?;
        init_weights(&vm, seed)?;
        let data = vm.data().lock().unwrap();
        let mut out: Vec<_> = data
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().flatten_all()?.to_vec1::<f32>()?)))
            .collect::<Result<_>>()?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    };
    let (a, b, c) = (snapshot(3)?, snapshot(3)?, snapshot(4)?);
    assert_eq!(a, b);
    assert_ne!(a, c);
    for (name, v) in &a {
        if name.ends_with("running_var") || name.ends_with("n1.weight") {
            assert!(v.iter().all(|&x| x == 1.0), "{name}");
        } else if name.ends_with("running_mean") || name.ends_with("n1.bias") {
            assert!(v.iter().all(|&x| x == 0.0), "{name}");
        }
    }
    // stem.0 is a 3x3 conv on 3 channels: |w| < 1/sqrt(27).
    let stem = &a.iter().find(|(k, _)| k == "stem.0.weight").unwrap().1;
    assert!(stem.iter().all(|w| w.abs() < 1.0 / 27f32.sqrt()));
    Ok(())
}

/// The forward's resize ops against the composed forms the example's model used
/// (index_select for nearest, two matmuls for bilinear; `keel_kernels`' `*_slow` twins):
/// nearest exactly, bilinear within f32 rounding. `kernels/tests/resize.rs` also checks the
/// example's f64-tap matrices.
#[test]
fn resize_ops_match_the_composed_forms() -> Result<()> {
    let dev = Device::Cpu;
    // The FPN's sizes for a 96x96 input: 3 -> 6 -> 12 -> 24 (nearest), 24 -> 96 (bilinear),
    // and an odd input (37x45: 2x2 -> 3x3 -> 5x6 -> 10x12, 10x12 -> 37x45).
    for ((h, w), (oh, ow)) in [
        ((3, 3), (6, 6)),
        ((2, 2), (3, 3)),
        ((3, 3), (5, 6)),
        ((5, 6), (10, 12)),
    ] {
        let x = Tensor::randn(0f32, 1.0, (2, 16, h, w), &dev)?;
        let a = keel_kernels::resize_nearest(&x, (oh, ow))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = keel_kernels::resize_nearest_slow(&x, (oh, ow))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(a, b, "nearest {h}x{w} -> {oh}x{ow}");
    }
    for ((h, w), (oh, ow)) in [((24, 24), (96, 96)), ((10, 12), (37, 45)), ((7, 5), (3, 4))] {
        let x = Tensor::randn(0f32, 1.0, (2, 21, h, w), &dev)?;
        let a = keel_kernels::resize_bilinear(&x, (oh, ow))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = keel_kernels::resize_bilinear_slow(&x, (oh, ow))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert!(
                (p - q).abs() <= (2e-6 * q.abs()).max(2e-6),
                "bilinear {h}x{w} -> {oh}x{ow} at {i}: {p} vs {q}"
            );
        }
    }
    Ok(())
}

#[test]
fn forward_and_backward_reach_every_parameter() -> Result<()> {
    let cfg = ModelConfig {
        width: 8,
        fpn: 8,
        num_classes: 4,
        norm: "gn:4".parse()?,
    };
    let (vm, net) = build(&cfg)?;
    init_weights(&vm, 1)?;
    let x = Tensor::randn(0f32, 1.0, (1, 3, 33, 40), &Device::Cpu)?;
    let y = net.forward(&x, true)?;
    assert_eq!(y.dims(), &[1, 4, 33, 40]);
    let grads = y.sqr()?.mean_all()?.backward()?;
    for (name, v) in sorted_vars(&vm) {
        assert!(grads.get(&v).is_some(), "no gradient for {name}");
    }
    Ok(())
}

/// Accumulating 4 micro-batches in f16: `for_step` casts the weights once for the whole
/// step, `forward_in` once per micro-batch, and both give the same gradients, bit for bit.
/// (GroupNorm: a BatchNorm SegNet does not train in f16 today, `Norm::forward_t` adds its
/// f32 statistics to f16 running values.)
#[test]
fn for_step_casts_once_per_step_with_the_same_result() -> Result<()> {
    let cfg = ModelConfig {
        width: 8,
        fpn: 8,
        num_classes: 3,
        norm: "gn:4".parse()?,
    };
    let dev = Device::Cpu;
    let xs = (0..4)
        .map(|i| Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev)?.affine(1.0 + i as f64, 0.0))
        .collect::<candle::Result<Vec<_>>>()?;
    let run = |once: bool| -> Result<(u64, Vec<Vec<f32>>)> {
        let (vm, master) = build(&cfg)?;
        init_weights(&vm, 3)?;
        let before = keel_models::seg::cast_copies();
        let step = once
            .then(|| master.for_step(&cfg, &vm, DType::F16, &dev))
            .transpose()?;
        let mut sums: Option<Vec<Tensor>> = None;
        let vars = sorted_vars(&vm);
        for x in &xs {
            let logits = match &step {
                Some(net) => net.forward(x, true)?,
                None => master.forward_in(&cfg, &vm, x, DType::F16, true)?,
            };
            let grads = logits.to_dtype(DType::F32)?.sqr()?.mean_all()?.backward()?;
            let g: Vec<Tensor> = vars
                .iter()
                .map(|(_, v)| {
                    grads
                        .get(v)
                        .cloned()
                        .unwrap_or(v.as_tensor().zeros_like()?)
                        .to_dtype(DType::F32)
                })
                .collect::<candle::Result<_>>()?;
            sums = Some(match sums {
                None => g,
                Some(s) => s
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a + b)
                    .collect::<candle::Result<_>>()?,
            });
        }
        let builds = keel_models::seg::cast_copies() - before;
        let mut out = Vec::new();
        for t in sums.unwrap_or_default() {
            out.push(t.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok((builds, out))
    };
    let (per_micro_builds, per_micro) = run(false)?;
    let (once_builds, once) = run(true)?;
    assert_eq!((once_builds, per_micro_builds), (1, 4));
    assert_eq!(once.len(), per_micro.len());
    for (a, b) in once.iter().zip(&per_micro) {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(a), bits(b));
    }
    Ok(())
}

/// The variables sorted by name.
fn sorted_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let mut v: Vec<(String, Var)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
