//! Invalid configurations are errors whose messages name the op, the value and a fix.
mod common;

use anyhow::Result;
use candle::{DType, Device, Var};
use candle_nn::Optimizer;
use keel_optim::{
    clip_grad_norm, clip_grad_value, AdamW, AdamWConfig, Constant, Cosine, Ema, EmaConfig,
    EmaWarmup, GradAccumulator, GradScaler, GradScalerConfig, MultiStep, ParamGroup, Poly, Sgd,
    SgdConfig, Warmup,
};

/// Asserts `r` is an error whose message contains every needle.
fn expect_err<T>(r: candle::Result<T>, needles: &[&str]) {
    match r {
        Ok(_) => panic!("expected an error containing {needles:?}"),
        Err(e) => {
            let msg = e.to_string();
            for n in needles {
                assert!(msg.contains(n), "error `{msg}` lacks `{n}`");
            }
        }
    }
}

#[test]
fn schedule_errors() -> Result<()> {
    expect_err(Constant::new(-0.1), &["Constant", "-0.1", "non-negative"]);
    expect_err(
        Cosine::new(0.1, 0, 0.0),
        &["Cosine", "total_steps (0)", "at least 1"],
    );
    expect_err(Cosine::new(-1.0, 10, 0.0), &["Cosine", "base_lr (-1)"]);
    expect_err(
        Cosine::new(0.1, 10, 0.5),
        &["Cosine", "min_lr (0.5)", "base_lr (0.1)"],
    );
    expect_err(Cosine::new(f64::NAN, 10, 0.0), &["Cosine", "NaN"]);
    expect_err(Poly::new(0.1, 0, 0.9), &["Poly", "total_steps (0)"]);
    expect_err(Poly::new(0.1, 10, -0.9), &["Poly", "power (-0.9)", "0.9"]);
    expect_err(
        MultiStep::new(0.1, vec![5, 3], 0.1),
        &["MultiStep", "[5, 3]", "strictly increasing", "sort"],
    );
    expect_err(
        MultiStep::new(0.1, vec![3, 3], 0.1),
        &["MultiStep", "duplicates"],
    );
    expect_err(
        MultiStep::new(0.1, vec![3], 0.0),
        &["MultiStep", "gamma (0)"],
    );
    let c = Constant::new(0.1)?;
    expect_err(
        Warmup::linear(c, 10, 0.0),
        &["Warmup::linear", "start_factor (0)", "(0, 1]"],
    );
    expect_err(
        Warmup::linear(c, 10, 1.5),
        &["Warmup::linear", "start_factor (1.5)"],
    );
    expect_err(
        Warmup::linear(c, 0, 0.1),
        &["Warmup::linear", "warmup_steps (0)"],
    );
    expect_err(
        Warmup::constant(c, 5, -0.1),
        &["Warmup::constant", "factor (-0.1)"],
    );
    expect_err(
        Warmup::exponential(c, 5, 2.0),
        &["Warmup::exponential", "start_factor (2)"],
    );
    expect_err(
        Warmup::linear_multiplicative(c, 5, 0.0),
        &["Warmup::linear_multiplicative", "start_factor (0)"],
    );
    Ok(())
}

#[test]
fn optimizer_errors() -> Result<()> {
    let v = || Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let sgd = |cfg| Sgd::new(vec![v()], cfg);
    expect_err(
        sgd(SgdConfig {
            lr: -1.0,
            ..Default::default()
        }),
        &["Sgd", "lr (-1)"],
    );
    expect_err(
        sgd(SgdConfig {
            momentum: -0.9,
            ..Default::default()
        }),
        &["Sgd", "momentum (-0.9)", "0.9"],
    );
    expect_err(
        sgd(SgdConfig {
            weight_decay: -1e-4,
            ..Default::default()
        }),
        &["Sgd", "weight_decay (-0.0001)"],
    );
    expect_err(
        sgd(SgdConfig {
            nesterov: true,
            ..Default::default()
        }),
        &["Sgd", "nesterov", "momentum 0", "momentum 0.9"],
    );
    expect_err(
        sgd(SgdConfig {
            nesterov: true,
            momentum: 0.9,
            dampening: 0.1,
            ..Default::default()
        }),
        &["Sgd", "dampening 0.1", "dampening 0.0"],
    );
    let adamw = |cfg| AdamW::new(vec![v()], cfg);
    expect_err(
        adamw(AdamWConfig {
            beta1: 1.0,
            ..Default::default()
        }),
        &["AdamW", "beta1 (1)", "[0, 1)", "0.9"],
    );
    expect_err(
        adamw(AdamWConfig {
            beta2: -0.1,
            ..Default::default()
        }),
        &["AdamW", "beta2 (-0.1)", "0.999"],
    );
    expect_err(
        adamw(AdamWConfig {
            eps: -1e-8,
            ..Default::default()
        }),
        &["AdamW", "eps (-0.00000001)"],
    );
    expect_err(
        adamw(AdamWConfig {
            weight_decay: f64::INFINITY,
            ..Default::default()
        }),
        &["AdamW", "weight_decay (inf)"],
    );
    let groups = vec![
        ParamGroup::new(vec![v()]),
        ParamGroup::new(vec![v()]).with_lr_mult(-2.0),
    ];
    expect_err(
        AdamW::with_groups(groups, AdamWConfig::default()),
        &["AdamW", "param group 1", "lr_mult -2"],
    );
    let groups = vec![ParamGroup::new(vec![v()]).with_weight_decay(-0.1)];
    expect_err(
        Sgd::with_groups(groups, SgdConfig::default()),
        &["Sgd", "param group 0", "weight_decay -0.1"],
    );
    Ok(())
}

#[test]
fn scaler_clip_accumulate_ema_errors() -> Result<()> {
    let d = GradScalerConfig::default();
    expect_err(
        GradScaler::new(GradScalerConfig {
            init_scale: 0.0,
            ..d
        }),
        &["GradScaler", "init_scale (0)", "65536"],
    );
    expect_err(
        GradScaler::new(GradScalerConfig {
            init_scale: 1e39,
            ..d
        }),
        &["GradScaler", "init_scale", "f32"],
    );
    expect_err(
        GradScaler::new(GradScalerConfig {
            growth_factor: 1.0,
            ..d
        }),
        &["GradScaler", "growth_factor (1)", "2.0"],
    );
    expect_err(
        GradScaler::new(GradScalerConfig {
            backoff_factor: 1.0,
            ..d
        }),
        &["GradScaler", "backoff_factor (1)", "0.5"],
    );
    expect_err(
        GradScaler::new(GradScalerConfig {
            growth_interval: 0,
            ..d
        }),
        &["GradScaler", "growth_interval (0)", "2000"],
    );
    let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    let mut g = w.as_tensor().sum_all()?.backward()?;
    expect_err(
        clip_grad_norm(&mut g, std::slice::from_ref(&w), 0.0),
        &["clip_grad_norm", "max_norm (0)"],
    );
    expect_err(
        clip_grad_norm(&mut g, std::slice::from_ref(&w), f64::NAN),
        &["clip_grad_norm", "max_norm (NaN)"],
    );
    expect_err(
        clip_grad_value(&mut g, std::slice::from_ref(&w), -1.0),
        &["clip_grad_value", "clip_value (-1)"],
    );
    expect_err(
        GradAccumulator::new(0),
        &["GradAccumulator", "k (0)", "micro-batches"],
    );
    expect_err(
        Ema::new(
            vec![w.clone()],
            EmaConfig {
                decay: 1.5,
                warmup: EmaWarmup::None,
            },
        ),
        &["Ema", "decay (1.5)"],
    );
    expect_err(
        Ema::new(
            vec![w.clone()],
            EmaConfig {
                decay: 0.99,
                warmup: EmaWarmup::Exponential { tau: 0.0 },
            },
        ),
        &["Ema", "tau (0)", "2000"],
    );
    Ok(())
}

#[test]
fn config_lr_must_be_finite_in_f32_and_non_negative() -> Result<()> {
    let v = || Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
    for (lr, shown) in [(f64::NAN, "NaN"), (-1.0, "-1"), (1e39, "1000000000000")] {
        let needles = |op| [op, format!("lr ({shown}"), "f32".into(), "e.g. 0.05".into()];
        let sgd = Sgd::new(
            vec![v()],
            SgdConfig {
                lr,
                ..Default::default()
            },
        );
        let n = needles("Sgd".to_string());
        expect_err(sgd, &n.each_ref().map(String::as_str));
        let groups = vec![ParamGroup::new(vec![v()])];
        let adamw = AdamW::with_groups(
            groups,
            AdamWConfig {
                lr,
                ..Default::default()
            },
        );
        let n = needles("AdamW".to_string());
        expect_err(adamw, &n.each_ref().map(String::as_str));
    }
    // The bounds themselves are valid.
    Sgd::new(
        vec![v()],
        SgdConfig {
            lr: 0.0,
            ..Default::default()
        },
    )?;
    AdamW::new(
        vec![v()],
        AdamWConfig {
            lr: f32::MAX as f64,
            ..Default::default()
        },
    )?;
    Ok(())
}

/// candle's `Optimizer::set_learning_rate` has no error path: a bad LR set through it is
/// refused by the next step, before any weight changes (issue 11 item 8).
#[test]
fn a_bad_lr_set_through_candles_trait_is_refused_by_the_next_step() -> Result<()> {
    let w = Var::new(&[1f32, -1.0], &Device::Cpu)?;
    let loss = || w.as_tensor().sqr().unwrap().sum_all().unwrap();
    for lr in [f64::NAN, -1.0, 1e39] {
        let mut sgd = Sgd::new(vec![w.clone()], SgdConfig::default())?;
        Optimizer::set_learning_rate(&mut sgd, lr);
        expect_err(sgd.backward_step(&loss()), &["Sgd::step", "lr ("]);
        let mut adamw = AdamW::new(vec![w.clone()], AdamWConfig::default())?;
        Optimizer::set_learning_rate(&mut adamw, lr);
        expect_err(adamw.backward_step(&loss()), &["AdamW::step", "lr ("]);
        assert_eq!(
            w.to_vec1::<f32>()?,
            vec![1.0, -1.0],
            "lr {lr} changed the weights"
        );
    }
    // A good LR set the same way steps.
    let mut sgd = Sgd::new(vec![w.clone()], SgdConfig::default())?;
    Optimizer::set_learning_rate(&mut sgd, 0.25);
    sgd.backward_step(&loss())?;
    assert_ne!(w.to_vec1::<f32>()?, vec![1.0, -1.0]);
    Ok(())
}
