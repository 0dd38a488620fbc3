//! The windowed step (`TrainState::launch` / `flush`, `Guard::flush`): host reads counted
//! per step, and the same per-step outcomes, monitor and weights as the step that reads at
//! once, bit for bit on the CPU, through a NaN step skipped on the device, an f16 run with
//! its GradScaler and a rollback by the guard.
use candle::{DType, Device, Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder, VarMap};
use keel_optim::{split_no_decay, OptimizerKind, Precision, Sgd, SgdConfig};
use keel_train::{
    host_read, named_vars, Guard, GuardAction, GuardConfig, GuardPolicy, Intervention, OptimRecipe,
    StepOutcome, TrainConfig, TrainState,
};

/// Micro-batches per step in these tests.
const K: usize = 2;

struct Run {
    vm: VarMap,
    model: Linear,
    state: TrainState,
    guard: Option<Guard>,
}

/// The optimizer of a run: the SGD recipe (momentum 0.9, weight decay), AdamW, or plain SGD
/// (no momentum, no weight decay: no optimizer state that a zero gradient moves).
#[derive(Clone, Copy, Debug)]
enum Opt {
    Recipe(OptimizerKind),
    PlainSgd,
}

fn build(opt: Opt, cfg: &TrainConfig, guard: Option<GuardConfig>) -> candle::Result<Run> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let model = linear(6, 1, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    {
        let data = vm.data().lock().unwrap();
        let w = [0.3f32, -0.2, 0.1, -0.3, 0.2, -0.1];
        data["weight"].set(&Tensor::new(&[w], &dev)?)?;
        data["bias"].set(&Tensor::new(&[0.05f32], &dev)?)?;
    }
    let optimizer: Box<dyn keel_optim::DynOptimizer> = match opt {
        Opt::Recipe(kind) => OptimRecipe::new(kind, 100).optimizer(split_no_decay(&vm))?,
        Opt::PlainSgd => Box::new(<Sgd as candle_nn::Optimizer>::new(
            vm.all_vars(),
            SgdConfig {
                lr: 0.05,
                momentum: 0.0,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?),
    };
    let mut state = TrainState::new(named_vars(&vm), optimizer, cfg)?;
    let guard = guard.map(|g| Guard::new(g, &mut state)).transpose()?;
    Ok(Run {
        vm,
        model,
        state,
        guard,
    })
}

/// The loss of micro-batch `i` of step `step`: the data depends on the step (as a loader's
/// batches depend on their position), NaN at the steps in `nan_at`.
fn loss(model: &Linear, step: usize, i: usize, nan_at: &[usize]) -> candle::Result<Tensor> {
    let dev = Device::Cpu;
    let x = ((Tensor::arange(0f32, 48.0, &dev)? + (7 * step + 3 * i) as f64)? / 7.0)?
        .sin()?
        .reshape((8, 6))?;
    let y = (x.sum_keepdim(1)? * 0.5)?;
    let l = (model.forward(&x)? - y)?.sqr()?.mean_all()?;
    if nan_at.contains(&step) {
        l * f64::NAN
    } else {
        Ok(l)
    }
}

/// How a test drives a run.
struct Drive<'a> {
    steps: usize,
    lr: &'a dyn Fn(usize) -> f64,
    clip: Option<f64>,
    nan_at: &'a [usize],
}

/// Per-step loop: `TrainState::step` and `Guard::after_step`.
fn per_step(run: &mut Run, d: &Drive) -> candle::Result<Vec<StepOutcome>> {
    let mut outs = Vec::new();
    while run.state.step < d.steps {
        let s = run.state.step;
        let lr = run.guard.as_ref().map_or((d.lr)(s), |g| g.lr((d.lr)(s)));
        let model = &run.model;
        let out = run
            .state
            .step(lr, d.clip, |i| loss(model, s, i, d.nan_at))?;
        let action = match run.guard.as_mut() {
            Some(g) => g.after_step(&mut run.state, &out)?,
            None => GuardAction::Continue,
        };
        outs.push(out);
        if matches!(action, GuardAction::Stop(_)) {
            break;
        }
    }
    Ok(outs)
}

/// Windowed loop: `TrainState::launch`, then `Guard::flush` (or `TrainState::flush`) when a
/// window is full and at the end.
fn windowed(run: &mut Run, d: &Drive) -> candle::Result<Vec<StepOutcome>> {
    let mut outs = Vec::new();
    while run.state.step < d.steps {
        let s = run.state.step;
        let lr = run.guard.as_ref().map_or((d.lr)(s), |g| g.lr((d.lr)(s)));
        let model = &run.model;
        let full = run
            .state
            .launch(lr, d.clip, |i| loss(model, s, i, d.nan_at))?;
        if !(full || run.state.step == d.steps) {
            continue;
        }
        match run.guard.as_mut() {
            Some(g) => {
                let f = g.flush(&mut run.state)?;
                outs.extend(f.outcomes);
                if matches!(f.action, GuardAction::Stop(_)) {
                    break;
                }
            }
            None => outs.extend(run.state.flush()?),
        }
    }
    assert_eq!(run.state.pending(), 0);
    Ok(outs)
}

fn weights(vm: &VarMap) -> candle::Result<Vec<Vec<u32>>> {
    named_vars(vm)
        .iter()
        .map(|(_, v)| {
            let w = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            Ok(w.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

/// The two runs agree bit for bit: every outcome (loss, grad norm, skip, alarms), the
/// monitor, the weights, the guard's interventions.
fn assert_same(a: &Run, oa: &[StepOutcome], b: &Run, ob: &[StepOutcome]) -> anyhow::Result<()> {
    assert_eq!(oa.len(), ob.len());
    for (x, y) in oa.iter().zip(ob) {
        let key = |o: &StepOutcome| {
            (
                o.step,
                o.loss.to_bits(),
                o.grad_norm.to_bits(),
                o.lr.to_bits(),
                o.loss_scale,
                o.skipped,
                format!("{:?}", o.alarms), // NaN != NaN: compare the text
            )
        };
        assert_eq!(key(x), key(y), "step {}", x.step);
    }
    assert_eq!(weights(&a.vm)?, weights(&b.vm)?, "final weights");
    assert_eq!(
        serde_json::to_string(&a.state.monitor)?,
        serde_json::to_string(&b.state.monitor)?
    );
    let interventions = |r: &Run| -> Vec<Intervention> {
        r.guard
            .as_ref()
            .map_or(Vec::new(), |g| g.interventions().to_vec())
    };
    assert_eq!(interventions(a), interventions(b));
    assert_eq!(a.state.step, b.state.step);
    Ok(())
}

fn cfg(read_every: usize, precision: Precision) -> TrainConfig {
    TrainConfig {
        read_every,
        precision,
        accum_steps: K,
        ..Default::default()
    }
}

#[test]
fn host_reads_per_step_and_per_window() -> anyhow::Result<()> {
    let lr = |_| 0.02;
    let d = Drive {
        steps: 40,
        lr: &lr,
        clip: Some(1.0),
        nan_at: &[],
    };
    let sgd = Opt::Recipe(OptimizerKind::Sgd);
    // Reading at once: a read per micro-batch loss and one for the gradient norm.
    let mut a = build(sgd, &cfg(1, Precision::F32), None)?;
    let before = host_read::count();
    per_step(&mut a, &d)?;
    let per_step_reads = (host_read::count() - before) as f64 / 40.0;
    assert_eq!(per_step_reads, (K + 1) as f64);
    assert!(per_step_reads >= 2.0);
    // Windowed f32: one read per 20 steps, nothing in between.
    let mut b = build(sgd, &cfg(20, Precision::F32), None)?;
    let before = host_read::count();
    let mut reads_at = Vec::new();
    while b.state.step < 40 {
        let s = b.state.step;
        let model = &b.model;
        if b.state
            .launch(0.02, Some(1.0), |i| loss(model, s, i, &[]))?
        {
            assert_eq!(host_read::count() - before, reads_at.len() as u64);
            b.state.flush()?;
            reads_at.push(s);
        }
    }
    assert_eq!(host_read::count() - before, 2, "one read per 20 steps");
    assert_eq!(reads_at, vec![19, 39]);
    // f16 with a GradScaler: one read per step (PyTorch's GradScaler.step reads found_inf
    // once per step), none at the flush.
    let mut c = build(sgd, &cfg(20, Precision::F16), None)?;
    let before = host_read::count();
    let outs = windowed(&mut c, &d)?;
    assert_eq!((outs.len() as u64, host_read::count() - before), (40, 40));
    Ok(())
}

#[test]
fn windowed_run_equals_per_step_run() -> anyhow::Result<()> {
    let lr = |s: usize| 0.02 * (1.0 + (s % 3) as f64);
    for (opt, precision, clip) in [
        (Opt::Recipe(OptimizerKind::Sgd), Precision::F32, Some(0.05)),
        (Opt::Recipe(OptimizerKind::AdamW), Precision::F32, None),
        (Opt::Recipe(OptimizerKind::Sgd), Precision::F16, Some(0.05)),
    ] {
        let d = Drive {
            steps: 30,
            lr: &lr,
            clip,
            nan_at: &[],
        };
        let mut a = build(opt, &cfg(1, precision), None)?;
        let oa = per_step(&mut a, &d)?;
        let mut b = build(opt, &cfg(8, precision), None)?;
        let ob = windowed(&mut b, &d)?;
        assert_same(&a, &oa, &b, &ob)?;
        if clip.is_some() {
            assert!(
                oa.iter().any(|o| o.grad_norm > 0.05),
                "{opt:?}: clipping never ran"
            );
        }
    }
    Ok(())
}

#[test]
fn nan_step_in_a_window_is_skipped_on_the_device() -> anyhow::Result<()> {
    let lr = |_| 0.05;
    let guard = GuardConfig {
        policy: GuardPolicy::Skip,
        ..GuardConfig::for_run(24)
    };
    let d = Drive {
        steps: 24,
        lr: &lr,
        clip: Some(1.0),
        nan_at: &[13],
    };
    // Plain SGD: no optimizer state, so the device-gated skip is exact.
    let mut a = build(Opt::PlainSgd, &cfg(1, Precision::F32), Some(guard))?;
    let oa = per_step(&mut a, &d)?;
    let mut b = build(Opt::PlainSgd, &cfg(8, Precision::F32), Some(guard))?;
    let ob = windowed(&mut b, &d)?;
    assert_same(&a, &oa, &b, &ob)?;
    assert!(oa[13].skipped && !oa[13].skipped_on_device && oa[13].loss.is_nan());
    assert!(ob[13].skipped && ob[13].skipped_on_device);
    assert_eq!(ob.iter().filter(|o| o.skipped).count(), 1);

    // With momentum the weights are still those of a skipped step, but the optimizer ran on
    // zero gradients: the momentum buffer decayed (as StepOutcome::skipped_on_device says).
    let sgd = Opt::Recipe(OptimizerKind::Sgd);
    let d14 = Drive { steps: 14, ..d };
    let mut c = build(sgd, &cfg(1, Precision::F32), Some(guard))?;
    per_step(&mut c, &Drive { steps: 13, ..d14 })?;
    let before = weights(&c.vm)?;
    let mut e = build(sgd, &cfg(8, Precision::F32), Some(guard))?;
    let oe = windowed(&mut e, &d14)?;
    assert!(oe[13].skipped_on_device);
    assert_eq!(weights(&e.vm)?, before, "the gated step left the weights");
    let buf = |r: &Run| -> candle::Result<Vec<f32>> {
        let sd = r.state.optimizer.state_dict()?;
        let mut keys: Vec<_> = sd.keys().filter(|k| k.contains("momentum")).collect();
        keys.sort();
        let mut v = Vec::new();
        for k in keys {
            v.extend(
                sd[k]
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(v)
    };
    let (bc, be) = (buf(&c)?, buf(&e)?);
    assert!(!bc.is_empty() && bc.len() == be.len());
    assert!(bc.iter().zip(&be).any(|(x, y)| x != y), "momentum moved");
    Ok(())
}

#[test]
fn rollback_in_a_window_equals_per_step_rollback() -> anyhow::Result<()> {
    // An LR burst of 1000x for 5 steps diverges the run; the guard rolls it back. Windows
    // of 8 steps do not divide the snapshot interval (20): the state ends windows there.
    let lr = |s: usize| 0.05 * if (57..62).contains(&s) { 1000.0 } else { 1.0 };
    let guard = GuardConfig {
        snapshot_every: 20,
        ..GuardConfig::for_run(120)
    };
    let d = Drive {
        steps: 120,
        lr: &lr,
        clip: None,
        nan_at: &[],
    };
    let sgd = Opt::Recipe(OptimizerKind::Sgd);
    let mut a = build(sgd, &cfg(1, Precision::F32), Some(guard))?;
    let oa = per_step(&mut a, &d)?;
    let mut b = build(sgd, &cfg(8, Precision::F32), Some(guard))?;
    let ob = windowed(&mut b, &d)?;
    let ia = a.guard.as_ref().unwrap().interventions().to_vec();
    assert!(!ia.is_empty(), "the burst was not rolled back");
    let ends_window = |s: usize| (s + 1).is_multiple_of(8) || (s + 1).is_multiple_of(20);
    assert!(
        !ends_window(ia[0].step),
        "the alarm ends no window: {:?}",
        ia[0]
    );
    assert_same(&a, &oa, &b, &ob)?;
    Ok(())
}

#[test]
fn a_loop_cannot_forget_to_flush() -> anyhow::Result<()> {
    let mut r = build(
        Opt::Recipe(OptimizerKind::Sgd),
        &cfg(2, Precision::F32),
        None,
    )?;
    let model = &r.model;
    assert!(!r.state.launch(0.01, None, |i| loss(model, 0, i, &[]))?);
    let err = r.state.snapshot(&()).unwrap_err().to_string();
    assert!(err.contains("flush"), "{err}");
    let err = r
        .state
        .step(0.01, None, |i| loss(model, 1, i, &[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("flush"), "{err}");
    assert!(r.state.launch(0.01, None, |i| loss(model, 1, i, &[]))?);
    let err = r
        .state
        .launch(0.01, None, |i| loss(model, 2, i, &[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("full") && err.contains("flush"), "{err}");
    let outs = r.state.flush()?;
    assert_eq!(outs.iter().map(|o| o.step).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(r.state.monitor.summary().stats.steps, 2);
    r.state.snapshot(&())?;
    Ok(())
}
