//! Gradient accumulation: k micro-batches of 1 give the gradient (and the step) of one
//! batch of k, for a conv net without batch statistics. Parameter-group split by name.
mod common;

use anyhow::Result;
use candle::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2dConfig, Optimizer, VarBuilder, VarMap};
use common::values;
use keel_optim::{split_no_decay, GradAccumulator, Sgd, SgdConfig};
use keel_test_support::{assert_close, check_close, Tol};

fn net_loss(vb: VarBuilder, x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let conv = candle_nn::conv2d(
        2,
        4,
        3,
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        vb.pp("conv"),
    )?;
    let fc = candle_nn::linear(4 * 5 * 5, 3, vb.pp("fc"))?;
    let h = conv.forward(x)?.relu()?.flatten_from(1)?;
    let y = fc.forward(&h)?;
    Ok((y - t)?.sqr()?.mean(D::Minus1)?.mean_all()?)
}

#[test]
fn k_micro_batches_of_one_equal_one_batch_of_k() -> Result<()> {
    let dev = Device::Cpu;
    let k = 4;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    // Deterministic inputs (candle's CPU randn cannot be seeded), so a failure reproduces.
    let wave = |n: usize, f: f64| -> candle::Result<Tensor> {
        (Tensor::arange(0u32, n as u32, &dev)?.to_dtype(DType::F32)? * f)?.sin()
    };
    let x = wave(k * 2 * 5 * 5, 0.37)?.reshape((k, 2, 5, 5))?;
    let t = wave(k * 3, 1.13)?.reshape((k, 3))?;
    let full = net_loss(vb.clone(), &x, &t)?.backward()?;

    let mut acc = GradAccumulator::new(k)?;
    let mut total = None;
    for i in 0..k {
        let l = net_loss(vb.clone(), &x.narrow(0, i, 1)?, &t.narrow(0, i, 1)?)?;
        let out = acc.accumulate(acc.scale_loss(&l)?.backward()?)?;
        assert_eq!(out.is_some(), i == k - 1);
        total = out;
    }
    let total = total.expect("k-th micro-batch returns the sum");
    assert_eq!(acc.pending(), 0);
    let vars = vm.all_vars();
    for v in &vars {
        let (a, b) = (total.get(v).unwrap(), full.get(v).unwrap());
        // f32 sums in another order: the error scales with the summands, so atol 1e-6.
        assert_close("accumulated grad", a, b, Tol::new(1e-5, 1e-6));
        // Without scale_loss the sum would be k times too large: the check can fail.
        let unscaled = (a * k as f64)?;
        assert!(check_close("k-times grad", &unscaled, b, Tol::new(1e-5, 1e-7)).is_err());
    }
    // One step on each gives the same weights.
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 1e-3,
        ..Default::default()
    };
    let snapshot: Vec<Tensor> = vars
        .iter()
        .map(|v| v.as_tensor().copy())
        .collect::<candle::Result<_>>()?;
    Sgd::new(vars.clone(), cfg)?.step(&full)?;
    let after_full: Vec<Tensor> = vars
        .iter()
        .map(|v| v.as_tensor().copy())
        .collect::<candle::Result<_>>()?;
    for (v, s) in vars.iter().zip(&snapshot) {
        v.set(s)?;
    }
    Sgd::new(vars.clone(), cfg)?.step(&total)?;
    for (v, f) in vars.iter().zip(&after_full) {
        assert_close("weights after step", v.as_tensor(), f, Tol::new(1e-6, 1e-6));
    }
    Ok(())
}

#[test]
fn no_decay_split_by_varmap_name() -> Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let _c = candle_nn::conv2d(3, 4, 3, Default::default(), vb.pp("backbone.conv1"))?;
    let _g = candle_nn::group_norm(2, 4, 1e-5, vb.pp("backbone.gn1"))?;
    let _l = candle_nn::layer_norm(4, 1e-5, vb.pp("head.norm"))?;
    let _f = candle_nn::linear(4, 2, vb.pp("head.fc"))?;
    let groups = split_no_decay(&vm);
    let names = |g: usize| -> Vec<String> {
        let data = vm.data().lock().unwrap();
        let mut out: Vec<String> = groups[g]
            .vars
            .iter()
            .map(|v| {
                data.iter()
                    .find(|(_, w)| w.as_tensor().id() == v.as_tensor().id())
                    .unwrap()
                    .0
                    .clone()
            })
            .collect();
        out.sort();
        out
    };
    assert_eq!(names(0), ["backbone.conv1.weight", "head.fc.weight"]);
    assert_eq!(
        names(1),
        [
            "backbone.conv1.bias",
            "backbone.gn1.bias",
            "backbone.gn1.weight",
            "head.fc.bias",
            "head.norm.bias",
            "head.norm.weight"
        ]
    );
    assert_eq!(groups[0].weight_decay, None);
    assert_eq!(groups[1].weight_decay, Some(0.0));
    // In an optimizer, the no-decay group really gets no decay: zero grads, wd 0.5.
    let mut opt = Sgd::with_groups(
        groups.clone(),
        SgdConfig {
            lr: 1.0,
            weight_decay: 0.5,
            ..Default::default()
        },
    )?;
    let mut grads = candle::backprop::GradStore::default();
    for g in &groups {
        for v in &g.vars {
            grads.insert(v.as_tensor(), v.as_tensor().zeros_like()?);
        }
    }
    let before: Vec<Vec<f64>> = groups
        .iter()
        .flat_map(|g| g.vars.iter().map(|v| values(v.as_tensor()).unwrap()))
        .collect();
    opt.step(&grads)?;
    let after: Vec<Vec<f64>> = groups
        .iter()
        .flat_map(|g| g.vars.iter().map(|v| values(v.as_tensor()).unwrap()))
        .collect();
    let n0 = groups[0].vars.len();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let want: Vec<f64> = b
            .iter()
            .map(|x| if i < n0 { x * 0.5 } else { *x })
            .collect();
        assert_close(&format!("param {i}"), a, &want, Tol::new(1e-6, 1e-7));
    }
    Ok(())
}
