//! TrainState: snapshot -> restore continues bit for bit, f16 with the loss scaler,
//! gradient accumulation, and a skipped step on a NaN loss.
use candle::{DType, Device, Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder, VarMap};
use keel_optim::{split_no_decay, EmaConfig, LrSchedule, OptimizerKind, Precision};
use keel_train::{named_vars, Alarm, CheckpointManager, OptimRecipe, TrainConfig, TrainState};

const STEPS: usize = 20;

fn data(dev: &Device) -> candle::Result<(Tensor, Tensor)> {
    let x = (Tensor::arange(0f32, 96.0, dev)?.reshape((16, 6))? / 7.0)?.sin()?;
    let y = (x.sum_keepdim(1)? * 0.5)?;
    Ok((x, y))
}

struct Setup {
    vm: VarMap,
    model: Linear,
    state: TrainState,
    schedule: Box<dyn LrSchedule + Send + Sync>,
}

fn setup(kind: OptimizerKind, cfg: &TrainConfig) -> candle::Result<Setup> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let model = linear(6, 1, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    // A fixed init (candle's is unseeded): every run of the test sees the same trajectory.
    set_weights(&vm, &[0.3, -0.2, 0.1, -0.3, 0.2, -0.1], 0.05)?;
    let recipe = OptimRecipe {
        lr: if kind == OptimizerKind::Sgd {
            0.05
        } else {
            0.01
        },
        ..OptimRecipe::new(kind, STEPS)
    }
    .with_warmup(3);
    let state = TrainState::new(named_vars(&vm), recipe.optimizer(split_no_decay(&vm))?, cfg)?;
    Ok(Setup {
        vm,
        model,
        state,
        schedule: recipe.schedule()?,
    })
}

/// Sets the linear layer's weight (6 values) and bias.
fn set_weights(vm: &VarMap, w: &[f32; 6], b: f32) -> candle::Result<()> {
    let data = vm.data().lock().unwrap();
    data["weight"].set(&Tensor::new(&[*w], &Device::Cpu)?)?;
    data["bias"].set(&Tensor::new(&[b], &Device::Cpu)?)
}

/// Mean squared error of micro-batch `i` of `k` equal slices of the data.
fn mse(model: &Linear, x: &Tensor, y: &Tensor, i: usize, k: usize) -> candle::Result<Tensor> {
    let n = x.dim(0)? / k;
    let (xs, ys) = (x.narrow(0, i * n, n)?, y.narrow(0, i * n, n)?);
    (model.forward(&xs)? - ys)?.sqr()?.mean_all()
}

fn weights(vm: &VarMap) -> candle::Result<Vec<Vec<f32>>> {
    named_vars(vm)
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all()?.to_vec1::<f32>())
        .collect()
}

#[test]
fn snapshot_restore_continues_bit_for_bit() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (x, y) = data(&dev)?;
    for kind in [OptimizerKind::Sgd, OptimizerKind::AdamW] {
        let cfg = TrainConfig {
            accum_steps: 2,
            ema: Some(EmaConfig {
                decay: 0.9,
                ..Default::default()
            }),
            ..Default::default()
        };
        let dir =
            std::env::temp_dir().join(format!("keel-train-state-{}-{kind}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut a = setup(kind, &cfg)?;
        let mut mgr = CheckpointManager::new(&dir, 1)?;
        let mut losses = Vec::new();
        while a.state.step < STEPS {
            let lr = a.schedule.lr(a.state.step);
            let out = a
                .state
                .step(lr, Some(0.5), |i| mse(&a.model, &x, &y, i, 2))?;
            losses.push(out.loss);
            if a.state.step == 8 {
                mgr.save(&a.state.snapshot(&("meta", 8))?, None)?;
            }
        }
        assert!(losses[STEPS - 1] < losses[0] * 0.8, "{kind}: {losses:?}");
        let mut b = setup(kind, &cfg)?;
        set_weights(&b.vm, &[-1.0, 1.0, -1.0, 1.0, -1.0, 1.0], -0.5)?; // other weights
        let found = mgr.load_latest(&dev)?.expect("a checkpoint");
        assert!(found.skipped.is_empty());
        let meta: (String, usize) = b.state.restore(&found.checkpoint)?;
        assert_eq!(meta, ("meta".to_string(), 8));
        assert_eq!(b.state.step, 8);
        while b.state.step < STEPS {
            let (i, lr) = (b.state.step, b.schedule.lr(b.state.step));
            let out = b
                .state
                .step(lr, Some(0.5), |k| mse(&b.model, &x, &y, k, 2))?;
            assert_eq!(out.loss.to_bits(), losses[i].to_bits(), "{kind} step {i}");
        }
        assert_eq!(weights(&a.vm)?, weights(&b.vm)?, "{kind}: final weights");
        let (ea, eb) = (a.state.ema.as_ref().unwrap(), b.state.ema.as_ref().unwrap());
        assert_eq!(ea.updates(), eb.updates());
        for (p, q) in ea.shadow().iter().zip(eb.shadow()) {
            assert_eq!(
                p.flatten_all()?.to_vec1::<f32>()?,
                q.flatten_all()?.to_vec1::<f32>()?
            );
        }
        assert_eq!(
            serde_json::to_string(&a.state.monitor)?,
            serde_json::to_string(&b.state.monitor)?
        );
        // A state of another precision refuses the checkpoint, naming both.
        let f16 = TrainConfig {
            precision: Precision::F16,
            ..cfg.clone()
        };
        let mut c = setup(kind, &f16)?;
        let err = c
            .state
            .restore::<(String, usize)>(&found.checkpoint)
            .unwrap_err()
            .to_string();
        assert!(err.contains("f32") && err.contains("f16"), "{err}");
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

#[test]
fn f16_with_the_scaler_skips_overflows_and_backs_off() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (x, y) = data(&dev)?;
    let cfg = TrainConfig {
        precision: Precision::F16,
        ..Default::default()
    };
    let mut s = setup(OptimizerKind::Sgd, &cfg)?;
    let vars = named_vars(&s.vm);
    // The forward in f16 (weights cast from the f32 masters), the loss in f32; a huge
    // target makes the scaled f16 gradients overflow at the initial scale of 65536.
    let big = (y.clone() * 1000.0)?.to_dtype(DType::F16)?;
    let forward = |target: &Tensor| -> candle::Result<Tensor> {
        let w = vars[1].1.as_tensor().to_dtype(DType::F16)?;
        let b = vars[0].1.as_tensor().to_dtype(DType::F16)?;
        let pred = x.to_dtype(DType::F16)?.matmul(&w.t()?)?.broadcast_add(&b)?;
        (pred - target)?.to_dtype(DType::F32)?.sqr()?.mean_all()
    };
    assert_eq!(vars[1].0, "weight");
    let before = weights(&s.vm)?;
    let out = s.state.step(0.01, None, |_| forward(&big))?;
    assert!(out.skipped, "an f16 overflow must skip the step: {out:?}");
    assert_eq!(out.loss_scale, Some(32768.0), "the scale backs off by half");
    assert!(
        out.alarms
            .iter()
            .any(|a| matches!(a, Alarm::SkippedStep { .. })),
        "{:?}",
        out.alarms
    );
    assert_eq!(weights(&s.vm)?, before, "a skipped step leaves the weights");
    // A normal target: the scale keeps halving on overflow until the step goes through
    // (PyTorch's GradScaler does the same in its first iterations), weights untouched.
    let small = y.to_dtype(DType::F16)?;
    let mut scale = 32768.0;
    let out = loop {
        let out = s.state.step(0.01, None, |_| forward(&small))?;
        if !out.skipped {
            assert_eq!(
                out.loss_scale,
                Some(scale),
                "no growth before 2000 clean steps"
            );
            break out;
        }
        scale /= 2.0;
        assert_eq!(out.loss_scale, Some(scale), "{out:?}");
        assert_eq!(weights(&s.vm)?, before);
        assert!(scale >= 64.0, "the scaler never recovered: {out:?}");
    };
    assert_ne!(weights(&s.vm)?, before);
    // The unscaled gradient norm matches the f32 computation (f16 rounding).
    let mut f32_run = setup(OptimizerKind::Sgd, &TrainConfig::default())?;
    for ((_, v), w) in named_vars(&f32_run.vm).iter().zip(&before) {
        v.set(&Tensor::new(w.as_slice(), &dev)?.reshape(v.dims())?)?;
    }
    let r = f32_run.state.step(0.01, None, |_| {
        (f32_run.model.forward(&x)? - &y)?.sqr()?.mean_all()
    })?;
    let rel = (r.grad_norm - out.grad_norm).abs() / r.grad_norm;
    assert!(
        rel < 2e-2,
        "f16 grad norm {} vs f32 {}",
        out.grad_norm,
        r.grad_norm
    );
    Ok(())
}

#[test]
fn accumulation_equals_one_big_batch() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (x, y) = data(&dev)?;
    let mut one = setup(OptimizerKind::Sgd, &TrainConfig::default())?;
    let mut four = setup(
        OptimizerKind::Sgd,
        &TrainConfig {
            accum_steps: 4,
            ..Default::default()
        },
    )?;
    // Same start.
    for ((_, a), (_, b)) in named_vars(&one.vm).iter().zip(named_vars(&four.vm)) {
        b.set(a.as_tensor())?;
    }
    for step in 0..5 {
        let lr = one.schedule.lr(step);
        let a = one
            .state
            .step(lr, Some(0.5), |i| mse(&one.model, &x, &y, i, 1))?;
        let b = four
            .state
            .step(lr, Some(0.5), |i| mse(&four.model, &x, &y, i, 4))?;
        assert!(
            (a.loss - b.loss).abs() <= 1e-6 * a.loss,
            "step {step}: {a:?} vs {b:?}"
        );
        assert!(
            (a.grad_norm - b.grad_norm).abs() <= 1e-5 * a.grad_norm,
            "step {step}"
        );
    }
    for (p, q) in weights(&one.vm)?.iter().zip(&weights(&four.vm)?) {
        for (u, v) in p.iter().zip(q) {
            assert!((u - v).abs() <= 1e-6, "{p:?} vs {q:?}");
        }
    }
    assert_eq!(four.state.accumulator.pending(), 0);
    Ok(())
}

#[test]
fn a_nan_loss_skips_the_step_and_raises_an_alarm() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (x, y) = data(&dev)?;
    let mut s = setup(OptimizerKind::Sgd, &TrainConfig::default())?;
    for step in 0..6 {
        let before = weights(&s.vm)?;
        let out = s.state.step(0.05, Some(1.0), |i| {
            let l = mse(&s.model, &x, &y, i, 1)?;
            if step == 4 {
                l * f64::NAN
            } else {
                Ok(l)
            }
        })?;
        assert_eq!(out.step, step);
        assert_eq!(out.skipped, step == 4, "{out:?}");
        if step == 4 {
            assert!(out.loss.is_nan());
            assert_eq!(
                weights(&s.vm)?,
                before,
                "the NaN step must not move the weights"
            );
            assert!(
                out.alarms
                    .iter()
                    .any(|a| matches!(a, Alarm::NonFinite { .. })),
                "{:?}",
                out.alarms
            );
        } else {
            assert_ne!(weights(&s.vm)?, before);
        }
    }
    assert_eq!(s.state.step, 6);
    // An error inside a micro-batch leaves no partial accumulation behind.
    let mut acc = setup(
        OptimizerKind::Sgd,
        &TrainConfig {
            accum_steps: 2,
            ..Default::default()
        },
    )?;
    let err = acc
        .state
        .step(0.05, None, |i| match i {
            0 => mse(&acc.model, &x, &y, 0, 2),
            _ => candle::bail!("the loader failed"),
        })
        .unwrap_err();
    assert!(err.to_string().contains("the loader failed"));
    assert_eq!(acc.state.accumulator.pending(), 0);
    assert_eq!(acc.state.step, 0);
    Ok(())
}

#[test]
fn a_restore_whose_ema_state_fails_leaves_the_optimizer_and_weights_as_they_were(
) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (x, y) = data(&dev)?;
    let cfg = TrainConfig {
        ema: Some(EmaConfig {
            decay: 0.9,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut a = setup(OptimizerKind::Sgd, &cfg)?;
    for _ in 0..3 {
        let lr = a.schedule.lr(a.state.step);
        a.state.step(lr, None, |i| mse(&a.model, &x, &y, i, 1))?;
    }
    let mut ck = a.state.snapshot(&())?;
    // Break the EMA part only: the optimizer part alone would load.
    ck.tensors.retain(|k, _| !k.starts_with("ema."));
    let mut b = setup(OptimizerKind::Sgd, &cfg)?;
    let lr = b.schedule.lr(0);
    b.state.step(lr, None, |i| mse(&b.model, &x, &y, i, 1))?;
    let (optim_before, weights_before) = (b.state.optimizer.state_dict()?, weights(&b.vm)?);
    let err = b.state.restore::<()>(&ck).unwrap_err().to_string();
    assert!(err.contains("Ema"), "{err}");
    let optim_after = b.state.optimizer.state_dict()?;
    let mut keys: Vec<_> = optim_before.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), optim_after.len());
    for k in keys {
        assert_eq!(
            optim_before[k].flatten_all()?.to_vec1::<f64>().ok(),
            optim_after[k].flatten_all()?.to_vec1::<f64>().ok(),
            "{k}"
        );
        assert_eq!(
            optim_before[k]
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?,
            optim_after[k]
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?,
            "{k}"
        );
    }
    assert_eq!(weights_before, weights(&b.vm)?);
    assert_eq!(b.state.step, 1);
    Ok(())
}

/// `with_ema_weights` evaluates the averaged weights and puts the training weights back,
/// also when the evaluation fails; without an EMA it does not call the closure.
#[test]
fn with_ema_weights_swaps_and_restores() -> anyhow::Result<()> {
    let cfg = TrainConfig {
        ema: Some(EmaConfig {
            decay: 0.5,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut s = setup(OptimizerKind::Sgd, &cfg)?;
    let (x, y) = data(&Device::Cpu)?;
    for _ in 0..5 {
        let lr = s.schedule.lr(s.state.step);
        s.state.step(lr, None, |i| mse(&s.model, &x, &y, i, 1))?;
    }
    let trained = weights(&s.vm)?;
    let inside = s.state.with_ema_weights(|| weights(&s.vm))?;
    let inside = inside.expect("an EMA");
    assert_ne!(
        inside, trained,
        "the EMA weights differ from the last step's"
    );
    assert_eq!(weights(&s.vm)?, trained, "restored");
    let failed = s
        .state
        .with_ema_weights(|| -> candle::Result<()> { candle::bail!("evaluation failed") });
    assert!(failed
        .unwrap_err()
        .to_string()
        .starts_with("evaluation failed"));
    assert_eq!(weights(&s.vm)?, trained, "restored after an error");
    assert!(s.state.weights_finite()?);
    s.vm.all_vars()[0].set(&s.vm.all_vars()[0].as_tensor().affine(0.0, f64::NAN)?)?;
    assert!(!s.state.weights_finite()?);

    let plain = setup(OptimizerKind::Sgd, &TrainConfig::default())?;
    let mut called = false;
    let none = plain.state.with_ema_weights(|| {
        called = true;
        Ok(())
    })?;
    assert!(none.is_none() && !called);
    Ok(())
}
