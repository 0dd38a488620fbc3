//! The object-safe [`DynOptimizer`]: boxed SGD and AdamW step bit-identically to the
//! concrete types, bad learning rates are errors that leave the optimizer unchanged, and
//! [`GradScaler::step`] drives a `Box<dyn DynOptimizer>`.
mod common;

use anyhow::Result;
use candle::backprop::GradStore;
use candle::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use common::values;
use keel_optim::{
    AdamW, AdamWConfig, DynOptimizer, GradScaler, GradScalerConfig, ParamGroup, Sgd, SgdConfig,
    StateDict,
};

/// Two f32 params (one 4x3, one 4) with fixed values.
fn params() -> Result<Vec<Var>> {
    let a = (Tensor::arange(0f32, 12.0, &Device::Cpu)?
        .affine(0.37, -1.9)?
        .sin()?
        * 1.7)?;
    let b = Tensor::arange(0f32, 4.0, &Device::Cpu)?
        .affine(0.5, 0.1)?
        .cos()?;
    Ok(vec![
        Var::from_tensor(&a.reshape((4, 3))?)?,
        Var::from_tensor(&b)?,
    ])
}

/// Gradients that depend on the params and the step; the second param gets none at step 2.
fn grads(vars: &[Var], step: usize) -> Result<GradStore> {
    let mut loss = Tensor::new(0f32, &Device::Cpu)?;
    for (i, v) in vars.iter().enumerate() {
        if step == 2 && i == 1 {
            continue;
        }
        let term = (v.as_tensor().sin()? * (1.0 + 0.25 * step as f64))?.sqr()?;
        loss = (loss + term.sum_all()?)?;
    }
    Ok(loss.backward()?)
}

fn bits(vars: &[Var]) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for v in vars {
        out.extend(
            v.as_tensor()
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|x| x.to_bits()),
        );
    }
    Ok(out)
}

/// Runs 5 steps (with a changing LR) through the concrete type and through a
/// `Box<dyn DynOptimizer>` built the same way, and compares every weight bit per step.
fn boxed_matches_concrete<O: Optimizer + StateDict + 'static>(
    make: impl Fn(Vec<Var>) -> candle::Result<O>,
) -> Result<()> {
    let (va, vb) = (params()?, params()?);
    let mut concrete = make(va.clone())?;
    let mut boxed: Box<dyn DynOptimizer> = Box::new(make(vb.clone())?);
    for step in 0..5 {
        let lr = 0.05 / (1.0 + step as f64);
        concrete.set_learning_rate(lr);
        boxed.set_learning_rate(lr)?;
        assert_eq!(boxed.learning_rate(), concrete.learning_rate());
        concrete.step(&grads(&va, step)?)?;
        boxed.step(&grads(&vb, step)?)?;
        assert_eq!(bits(&va)?, bits(&vb)?, "step {step}");
    }
    assert_ne!(bits(&va)?, bits(&params()?)?, "the weights must have moved");
    let (sa, sb) = (concrete.state_dict()?, boxed.state_dict()?);
    let mut keys: Vec<_> = sa.keys().collect();
    keys.sort();
    let mut keys_b: Vec<_> = sb.keys().collect();
    keys_b.sort();
    assert_eq!(keys, keys_b);
    for k in keys {
        assert_eq!(values(&sa[k])?, values(&sb[k])?, "state entry {k}");
    }
    Ok(())
}

#[test]
fn boxed_sgd_steps_bit_identically() -> Result<()> {
    let cfg = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-3,
        nesterov: true,
        ..Default::default()
    };
    boxed_matches_concrete(|v| {
        let groups = vec![
            ParamGroup::new(vec![v[0].clone()]),
            ParamGroup::new(vec![v[1].clone()])
                .with_lr_mult(0.5)
                .with_weight_decay(0.0),
        ];
        Sgd::with_groups(groups, cfg)
    })
}

#[test]
fn boxed_adamw_steps_bit_identically() -> Result<()> {
    let cfg = AdamWConfig {
        lr: 0.05,
        weight_decay: 0.05,
        ..Default::default()
    };
    boxed_matches_concrete(|v| AdamW::new(v, cfg))
}

/// Asserts `r` is an error naming `needles`.
fn expect_err(r: candle::Result<()>, needles: &[&str]) {
    let msg = r.expect_err("expected an error").to_string();
    for n in needles {
        assert!(msg.contains(n), "error `{msg}` lacks `{n}`");
    }
}

#[test]
fn set_learning_rate_rejects_nan_negative_and_f32_overflow() -> Result<()> {
    let w = Var::new(&[1f32, -1.0], &Device::Cpu)?;
    let mut opts: Vec<(&str, Box<dyn DynOptimizer>)> = vec![
        (
            "Sgd",
            Box::new(Sgd::new(vec![w.clone()], SgdConfig::default())?),
        ),
        (
            "AdamW",
            Box::new(AdamW::new(vec![w.clone()], AdamWConfig::default())?),
        ),
    ];
    for (name, opt) in opts.iter_mut() {
        opt.set_learning_rate(0.02)?;
        for (bad, shown) in [(f64::NAN, "NaN"), (-1.0, "-1"), (1e39, "1000000000000")] {
            expect_err(
                opt.set_learning_rate(bad),
                &[name, &format!("lr ({shown}"), "f32", "pass"],
            );
            assert_eq!(
                opt.learning_rate(),
                0.02,
                "{name}: a refused lr must not stick"
            );
        }
        // The largest f32 and 0 are valid learning rates.
        opt.set_learning_rate(f32::MAX as f64)?;
        opt.set_learning_rate(0.0)?;
    }
    Ok(())
}

#[test]
fn grad_scaler_steps_a_boxed_optimizer_and_skips_on_overflow() -> Result<()> {
    let dev = Device::Cpu;
    let p = Var::new(&[1f32, 2.0], &dev)?;
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.5,
        ..Default::default()
    };
    let mut opt: Box<dyn DynOptimizer> = Box::new(Sgd::new(vec![p.clone()], cfg)?);
    let mut scaler = GradScaler::new(GradScalerConfig {
        init_scale: 1024.0,
        ..Default::default()
    })?;
    let vars = std::slice::from_ref(&p);
    // A clean f16 step: grad 2p, unscaled exactly, p -= 0.1 * 2p.
    let loss = p
        .as_tensor()
        .to_dtype(DType::F16)?
        .sqr()?
        .sum_all()?
        .to_dtype(DType::F32)?;
    let mut grads = scaler.scale(&loss)?.backward()?;
    let stepped = scaler.step(opt.as_mut(), &mut grads, vars)?;
    scaler.update(!stepped);
    assert!(stepped);
    assert_eq!(p.to_vec1::<f32>()?, vec![0.8, 1.6]);
    let state = opt.state_dict()?;
    // An overflowing step: skipped, weights and momentum buffer untouched, scale halved.
    let loss = (p.as_tensor() * 1e38)?.sum_all()?;
    let mut grads = scaler.scale(&loss)?.backward()?;
    let stepped = scaler.step(opt.as_mut(), &mut grads, vars)?;
    scaler.update(!stepped);
    assert!(!stepped);
    assert_eq!(p.to_vec1::<f32>()?, vec![0.8, 1.6]);
    assert_eq!(scaler.current_scale(), 512.0);
    let after = opt.state_dict()?;
    let key = "state.0.momentum_buffer";
    assert_eq!(values(&after[key])?, values(&state[key])?);
    assert_eq!(values(&after[key])?, vec![2.0, 4.0]);
    Ok(())
}

#[test]
fn errors_name_the_optimizer_not_its_generic_type() -> Result<()> {
    let w = Var::new(&[1f32], &Device::Cpu)?;
    let mut sgd: Box<dyn DynOptimizer> = Box::new(Sgd::new(vec![w.clone()], SgdConfig::default())?);
    let mut adamw: Box<dyn DynOptimizer> =
        Box::new(AdamW::new(vec![w.clone()], AdamWConfig::default())?);
    for (opt, name) in [(&mut sgd, "Sgd: lr (NaN)"), (&mut adamw, "AdamW: lr (NaN)")] {
        let e = opt.set_learning_rate(f64::NAN).unwrap_err().to_string();
        assert!(e.starts_with(name) && !e.contains("Grouped"), "{e}");
        assert_eq!(opt.name(), name.split(':').next().unwrap());
    }
    Ok(())
}
