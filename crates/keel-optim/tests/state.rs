//! Save/load round trips: a run interrupted at step 3, saved to safetensors and
//! resumed in fresh objects continues bit-identically to the uninterrupted run.
mod common;

use anyhow::Result;
use candle::backprop::GradStore;
use candle::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use common::{scratch, values};
use keel_optim::StateDict;
use keel_optim::{
    AdamW, AdamWConfig, Cosine, Ema, EmaConfig, EmaWarmup, LrSchedule, ParamGroup, Sgd, SgdConfig,
    Warmup,
};
use keel_test_support::{assert_close, Tol};

fn init(dev: &Device) -> Result<Vec<Tensor>> {
    Ok(vec![
        Tensor::randn(0f32, 1.0, (5, 3), dev)?,
        Tensor::randn(0f32, 1.0, 5, dev)?,
    ])
}

fn vars(ts: &[Tensor]) -> Result<Vec<Var>> {
    Ok(ts
        .iter()
        .map(|t| Var::from_tensor(&t.copy()?))
        .collect::<candle::Result<_>>()?)
}

/// Deterministic "gradients" that depend on the params, so a wrong state shows up.
fn grads(vars: &[Var], step: usize) -> Result<GradStore> {
    let mut s = GradStore::default();
    for (i, v) in vars.iter().enumerate() {
        let g = (v.as_tensor().sin()? + (step as f64 * 0.37 + i as f64))
            .map_err(anyhow::Error::from)?;
        s.insert(v.as_tensor(), g);
    }
    Ok(s)
}

/// Runs 6 steps straight, and 3 + save/load into fresh objects + 3; compares bitwise.
fn round_trip<O: Optimizer>(
    name: &str,
    make: impl Fn(&[Var]) -> Result<O>,
    save: impl Fn(&O, &std::path::Path) -> Result<()>,
    load: impl Fn(&mut O, &std::path::Path) -> Result<()>,
) -> Result<()> {
    let dev = Device::Cpu;
    let t0 = init(&dev)?;
    let sched = Warmup::linear(Cosine::new(0.05, 10, 0.0)?, 2, 0.1)?;
    let straight = vars(&t0)?;
    let mut opt = make(&straight)?;
    for step in 0..6 {
        opt.set_learning_rate(sched.lr(step));
        opt.step(&grads(&straight, step)?)?;
    }
    let first = vars(&t0)?;
    let mut opt = make(&first)?;
    for step in 0..3 {
        opt.set_learning_rate(sched.lr(step));
        opt.step(&grads(&first, step)?)?;
    }
    let path = scratch(&format!("{name}.safetensors"));
    save(&opt, &path)?;
    let resumed: Vec<Var> = vars(
        &first
            .iter()
            .map(|v| v.as_tensor().clone())
            .collect::<Vec<_>>(),
    )?;
    let mut opt2 = make(&resumed)?;
    load(&mut opt2, &path)?;
    assert_eq!(opt2.learning_rate(), sched.lr(2), "{name}: lr not restored");
    for step in 3..6 {
        opt2.set_learning_rate(sched.lr(step));
        opt2.step(&grads(&resumed, step)?)?;
    }
    for (i, (a, b)) in straight.iter().zip(&resumed).enumerate() {
        assert_eq!(
            values(a.as_tensor())?,
            values(b.as_tensor())?,
            "{name}: param {i} differs after resume"
        );
    }
    // Without loading the state the continuation differs (the test can fail).
    let fresh = vars(
        &first
            .iter()
            .map(|v| v.as_tensor().clone())
            .collect::<Vec<_>>(),
    )?;
    let mut opt3 = make(&fresh)?;
    for step in 3..6 {
        opt3.set_learning_rate(sched.lr(step));
        opt3.step(&grads(&fresh, step)?)?;
    }
    assert_ne!(
        values(straight[0].as_tensor())?,
        values(fresh[0].as_tensor())?,
        "{name}: state had no effect"
    );
    Ok(())
}

#[test]
fn sgd_resume_is_exact() -> Result<()> {
    let cfg = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-4,
        nesterov: true,
        ..Default::default()
    };
    round_trip(
        "sgd",
        |v| Ok(Sgd::new(v.to_vec(), cfg)?),
        |o, p| Ok(o.save(p)?),
        |o, p| Ok(o.load(p)?),
    )
}

#[test]
fn adamw_with_groups_resume_is_exact() -> Result<()> {
    let cfg = AdamWConfig {
        lr: 0.05,
        weight_decay: 0.05,
        ..Default::default()
    };
    round_trip(
        "adamw",
        |v| {
            let groups = vec![
                ParamGroup::new(vec![v[0].clone()]),
                ParamGroup::new(vec![v[1].clone()])
                    .with_weight_decay(0.0)
                    .with_lr_mult(2.0),
            ];
            Ok(AdamW::with_groups(groups, cfg)?)
        },
        |o, p| Ok(o.save(p)?),
        |o, p| Ok(o.load(p)?),
    )
}

#[test]
fn loading_into_different_params_is_an_error() -> Result<()> {
    let dev = Device::Cpu;
    let a = Var::zeros((2, 2), DType::F32, &dev)?;
    let mut opt = AdamW::new(vec![a.clone()], AdamWConfig::default())?;
    opt.step(&grads(std::slice::from_ref(&a), 0)?)?;
    let st = opt.state_dict()?;
    let b = Var::zeros((3, 2), DType::F32, &dev)?;
    let mut other = AdamW::new(vec![b], AdamWConfig::default())?;
    let err = other.load_state_dict(&st).unwrap_err().to_string();
    assert!(
        err.contains("AdamW") && err.contains("[2, 2]") && err.contains("[3, 2]"),
        "{err}"
    );
    let mut two = AdamW::new(vec![a.clone(), a.clone()], AdamWConfig::default())?;
    let err = two.load_state_dict(&st).unwrap_err().to_string();
    assert!(
        err.contains("holds 1 parameters") && err.contains("has 2"),
        "{err}"
    );
    Ok(())
}

/// Same parameters, same count, other groups (e.g. another no-decay rule): the states of
/// two same-shaped parameters would silently swap, so `group_sizes` refuses the load. A
/// state saved before `group_sizes` existed still loads (matched by position).
#[test]
fn loading_into_other_groups_is_an_error_and_old_states_still_load() -> Result<()> {
    let dev = Device::Cpu;
    let v: Vec<Var> = (0..3)
        .map(|_| Var::zeros(4, DType::F32, &dev))
        .collect::<candle::Result<_>>()?;
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    };
    let grouped = |split: usize| {
        Sgd::with_groups(
            vec![
                ParamGroup::new(v[..split].to_vec()),
                ParamGroup::new(v[split..].to_vec()).with_weight_decay(0.0),
            ],
            cfg,
        )
    };
    let mut opt = grouped(2)?;
    opt.step(&grads(&v, 0)?)?;
    let mut st = opt.state_dict()?;
    assert_eq!(values(&st["group_sizes"])?, vec![2.0, 1.0]);
    let err = grouped(1)?.load_state_dict(&st).unwrap_err().to_string();
    assert!(
        err.contains("Sgd") && err.contains("[2.0, 1.0]") && err.contains("[1.0, 2.0]"),
        "{err}"
    );
    grouped(2)?.load_state_dict(&st)?;
    st.remove("group_sizes");
    grouped(1)?.load_state_dict(&st)?;
    Ok(())
}

#[test]
fn ema_warmup_update_and_resume() -> Result<()> {
    let dev = Device::Cpu;
    let w = Var::new(&[0f32, 10.0], &dev)?;
    let cfg = EmaConfig {
        decay: 0.9,
        warmup: EmaWarmup::Tf,
    };
    let mut ema = Ema::new(vec![w.clone()], cfg)?;
    // Reference in f64: decay_n = min(0.9, (1 + n) / (10 + n)).
    let mut shadow = [0f64, 10.0];
    let targets = [
        [1.0, 2.0],
        [3.0, -1.0],
        [0.5, 0.5],
        [2.0, 2.0],
        [4.0, 0.0],
        [1.0, 1.0],
    ];
    let path = scratch("ema.safetensors");
    for (n, t) in targets.iter().enumerate() {
        if n == 3 {
            ema.save(&path)?;
            let mut resumed = Ema::new(vec![w.clone()], cfg)?;
            resumed.load(&path)?;
            assert_eq!(resumed.updates(), 3);
            assert_eq!(values(&resumed.shadow()[0])?, values(&ema.shadow()[0])?);
            ema = resumed;
        }
        let d = 0.9f64.min((1.0 + n as f64) / (10.0 + n as f64));
        assert_eq!(ema.current_decay(), d);
        w.set(&Tensor::new(&[t[0] as f32, t[1] as f32], &dev)?)?;
        ema.update()?;
        for (s, x) in shadow.iter_mut().zip(t) {
            *s = d * *s + (1.0 - d) * x;
        }
        assert_close(
            &format!("ema update {n}"),
            &values(&ema.shadow()[0])?,
            &shadow,
            Tol::new(1e-6, 1e-6),
        );
    }
    let exp = Ema::new(
        vec![w.clone()],
        EmaConfig {
            decay: 0.999,
            warmup: EmaWarmup::Exponential { tau: 100.0 },
        },
    )?;
    assert_eq!(exp.current_decay(), 0.0);
    ema.copy_to_vars()?;
    assert_eq!(values(w.as_tensor())?, values(&ema.shadow()[0])?);
    Ok(())
}
