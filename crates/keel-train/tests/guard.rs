//! The guard's proof by fault injection: a tiny MLP classifier (8 features, 4 classes, SGD
//! with momentum, no clipping), trained 200 steps on a deterministic Gaussian-blob set, with
//! one fault injected per run: an LR burst of 1000x for 5 steps mid-run, a batch of NaN
//! inputs, a poisoned label batch (targets scaled 1e4) and an LR 1000x too large from step 0,
//! each a [`keel_train::fault::FaultPlan`]. With `rollback`, each run ends within a stated
//! tolerance of the clean run (same seed) in final val loss and val mIoU and its report lists
//! the interventions; with `off`, the same runs end far from it (so these tests can fail).
//! An LR 1e20 too large cannot be healed: the guard stops the run loudly.
mod common;

use candle::{DType, Device, Tensor, D};
use candle_nn::{Init, VarMap};
use common::Noise;
use keel_norm::NormKind;
use keel_optim::{split_no_decay, LrSchedule, OptimizerKind, Precision};
use keel_train::fault::FaultPlan;
use keel_train::{
    named_vars, ConfusionMatrix, Guard, GuardAction, GuardConfig, GuardPolicy, HealthReport,
    InterventionKind, MonitorConfig, MonitorSummary, OptimRecipe, RunContext, TrainConfig,
    TrainState, Verdict,
};

const FEATURES: usize = 8;
const HIDDEN: usize = 16;
const CLASSES: usize = 4;
const BATCH: usize = 8;
const TRAIN: usize = 256;
const VAL: usize = 128;
const STEPS: usize = 200;
const LR: f64 = 0.05;
/// The mid-run faults, at step 100.
const LR_BURST: &str = "lr-burst@100";
const NAN_BATCH: &str = "nan-batch@100";
const POISON_LABELS: &str = "poison-labels@100";
const HUGE_LR: &str = "huge-lr";

/// Final val loss of a guarded run: at most `LOSS_RTOL` relative (or `LOSS_ATOL` absolute)
/// above the clean run's.
const LOSS_RTOL: f64 = 0.5;
const LOSS_ATOL: f64 = 0.05;
/// Final val mIoU of a guarded run: at most this far below the clean run's.
const MIOU_TOL: f64 = 0.05;

/// Features `(n, 8)` and one-hot targets `(n, 4)`: class `c` is a blob around `2.5 * e_c`.
fn blobs(n: usize, noise: &mut Noise) -> candle::Result<(Tensor, Tensor)> {
    let (mut x, mut t) = (Vec::with_capacity(n * FEATURES), vec![0f32; n * CLASSES]);
    for i in 0..n {
        let c = i % CLASSES;
        t[i * CLASSES + c] = 1.0;
        for f in 0..FEATURES {
            let centre = if f == c { 2.5 } else { 0.0 };
            x.push((centre + noise.gauss()) as f32);
        }
    }
    Ok((
        Tensor::from_vec(x, (n, FEATURES), &Device::Cpu)?,
        Tensor::from_vec(t, (n, CLASSES), &Device::Cpu)?,
    ))
}

struct Mlp {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

impl Mlp {
    /// Deterministic weights from `seed` (candle's own init draws from an unseeded RNG).
    fn new(vm: &VarMap, seed: u64) -> candle::Result<Self> {
        let mut noise = Noise(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let dev = Device::Cpu;
        let mut param = |name: &str, shape: (usize, usize), scale: f64| -> candle::Result<Tensor> {
            let v = vm.get(shape, name, Init::Const(0.0), DType::F32, &dev)?;
            let vals: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| (scale * noise.gauss()) as f32)
                .collect();
            let t = Tensor::from_vec(vals, shape, &dev)?;
            let data = vm.data().lock().unwrap();
            data[name].set(&t)?;
            Ok(v)
        };
        Ok(Self {
            w1: param("w1", (FEATURES, HIDDEN), (1.0 / FEATURES as f64).sqrt())?,
            b1: param("b1", (1, HIDDEN), 0.0)?,
            w2: param("w2", (HIDDEN, CLASSES), (1.0 / HIDDEN as f64).sqrt())?,
            b2: param("b2", (1, CLASSES), 0.0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle::Result<Tensor> {
        let h = x.matmul(&self.w1)?.broadcast_add(&self.b1)?.relu()?;
        h.matmul(&self.w2)?.broadcast_add(&self.b2)
    }
}

/// Cross-entropy with (soft) targets: `-(t * log_softmax(logits)).sum(1).mean()`.
fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle::Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    (targets * logp)?.sum(1)?.mean_all()?.neg()
}

/// How a run ended.
struct Outcome {
    val_loss: f64,
    miou: f64,
    report: HealthReport,
    monitor: MonitorSummary,
    stopped: bool,
}

fn run(fault: &str, policy: GuardPolicy, seed: u64) -> anyhow::Result<Outcome> {
    let plan: FaultPlan = fault.parse()?;
    let mut noise = Noise(seed);
    let (xs, ts) = blobs(TRAIN, &mut noise)?;
    let (xv, tv) = blobs(VAL, &mut noise)?;
    let vm = VarMap::new();
    let model = Mlp::new(&vm, seed)?;
    let recipe = OptimRecipe {
        lr: LR,
        ..OptimRecipe::new(OptimizerKind::Sgd, STEPS)
    };
    let schedule = recipe.schedule()?;
    let monitor = MonitorConfig {
        reference_loss: Some((CLASSES as f64).ln()),
        ..Default::default()
    };
    let cfg = TrainConfig {
        monitor,
        ..Default::default()
    };
    let mut state = TrainState::new(
        named_vars(&vm),
        recipe.optimizer(split_no_decay(&vm))?,
        &cfg,
    )?;
    let gcfg = GuardConfig {
        policy,
        ..GuardConfig::for_run(STEPS)
    };
    let mut guard = Guard::new(gcfg, &mut state)?;
    let batches = TRAIN / BATCH;
    while state.step < STEPS {
        let step = state.step;
        let b = step % batches;
        let x = plan.poison_inputs(step, &xs.narrow(0, b * BATCH, BATCH)?)?;
        let t = (ts.narrow(0, b * BATCH, BATCH)? * plan.label_scale(step))?;
        let lr = schedule.lr(step) * plan.lr_factor(step);
        let out = state.step(guard.lr(lr), None, |_| {
            cross_entropy(&model.forward(&x)?, &t)
        })?;
        if let GuardAction::Stop(_) = guard.after_step(&mut state, &out)? {
            break;
        }
    }
    let logits = model.forward(&xv)?;
    let val_loss = cross_entropy(&logits, &tv)?.to_scalar::<f32>()? as f64;
    let mut cm = ConfusionMatrix::new(CLASSES, None)?;
    cm.update(&logits.argmax(1)?, &tv.argmax(1)?)?;
    let ctx = RunContext {
        norm: NormKind::GroupNorm { groups: None },
        batch_size: BATCH,
        pretrained: false,
        lr: LR,
        clip_grad: None,
        precision: Precision::F32,
        steps: STEPS,
        backbone_norm: None,
    };
    Ok(Outcome {
        val_loss,
        miou: cm.miou(),
        report: state.monitor.report(&ctx).with_guard(&guard.summary()),
        monitor: state.monitor.summary(),
        stopped: guard.stopped(),
    })
}

/// The rollback run is within tolerance of the clean run, lists its interventions (at least
/// `min_interventions`) and is never Healthy when it intervened; the off run ends far from
/// the clean one.
fn check(fault: &str, min_interventions: usize) -> anyhow::Result<Outcome> {
    let seed = 7;
    let clean = run("none", GuardPolicy::Rollback, seed)?;
    assert!(
        clean
            .report
            .guard
            .as_ref()
            .unwrap()
            .interventions
            .is_empty(),
        "the clean run needs no intervention: {}",
        clean.report.to_text()
    );
    assert!(
        clean.miou > 0.6,
        "the clean run learns: mIoU {}",
        clean.miou
    );
    let guarded = run(fault, GuardPolicy::Rollback, seed)?;
    let text = guarded.report.to_text();
    let g = guarded.report.guard.as_ref().unwrap();
    eprintln!(
        "{fault}: clean loss {:.4} mIoU {:.4}; rollback loss {:.4} mIoU {:.4}\n{text}",
        clean.val_loss, clean.miou, guarded.val_loss, guarded.miou
    );
    assert!(
        !guarded.stopped,
        "{fault}: the guard stopped the run\n{text}"
    );
    let loss_tol = (LOSS_RTOL * clean.val_loss).max(LOSS_ATOL);
    assert!(
        guarded.val_loss.is_finite() && guarded.val_loss <= clean.val_loss + loss_tol,
        "{fault}: val loss {} vs clean {} (+{loss_tol})\n{text}",
        guarded.val_loss,
        clean.val_loss
    );
    assert!(
        guarded.miou >= clean.miou - MIOU_TOL,
        "{fault}: val mIoU {} vs clean {}\n{text}",
        guarded.miou,
        clean.miou
    );
    assert!(
        g.interventions.len() >= min_interventions,
        "{fault}: {} interventions, expected at least {min_interventions}\n{text}",
        g.interventions.len()
    );
    assert!(g
        .interventions
        .iter()
        .all(|i| i.action == InterventionKind::RolledBack));
    for i in &g.interventions {
        assert!(text.contains(&i.to_string()), "{fault}: {i} not in\n{text}");
    }
    if min_interventions > 0 {
        assert_ne!(guarded.report.verdict, Verdict::Healthy, "{text}");
        assert!(text.contains("recovered"), "{text}");
    }
    let off = run(fault, GuardPolicy::Off, seed)?;
    eprintln!(
        "{fault}: off loss {:.4} mIoU {:.4} verdict {}",
        off.val_loss, off.miou, off.report.verdict
    );
    assert!(
        off.val_loss.is_nan()
            || off.val_loss > clean.val_loss + loss_tol
            || off.miou < clean.miou - MIOU_TOL,
        "{fault}: without the guard the run did not diverge (loss {}, mIoU {}): the fault is too weak to prove anything",
        off.val_loss,
        off.miou
    );
    Ok(guarded)
}

#[test]
fn lr_burst_mid_run_is_rolled_back() -> anyhow::Result<()> {
    check(LR_BURST, 1).map(drop)
}

#[test]
fn nan_input_batch_is_skipped() -> anyhow::Result<()> {
    // Skipping the one non-finite step is enough: no rollback needed, the weights stay finite.
    check(NAN_BATCH, 0).map(drop)
}

#[test]
fn poisoned_label_batch_is_rolled_back() -> anyhow::Result<()> {
    check(POISON_LABELS, 1).map(drop)
}

/// An LR 1000x too large from step 0: the run never gets below its initial loss, so the
/// first rollback goes back to the start and cuts the LR by `early_lr_factor` (0.1), not by
/// 0.5, and so does every later one (the LR is the cause); the run recovers within the
/// tolerances of the clean run.
#[test]
fn huge_lr_from_step_0_is_rolled_back_to_the_start_with_the_early_cut() -> anyhow::Result<()> {
    let guarded = check(HUGE_LR, 1)?;
    let g = guarded.report.guard.as_ref().unwrap();
    let text = guarded.report.to_text();
    assert_eq!(g.interventions[0].restored_step, 0, "{text}");
    for i in &g.interventions {
        assert!((i.lr_after / i.lr_before - 0.1).abs() < 1e-9, "{i}\n{text}");
    }
    assert!(
        (g.lr_scale - 0.1f64.powi(g.interventions.len() as i32)).abs() < 1e-12,
        "{text}"
    );
    Ok(())
}

/// A mid-run burst after healthy progress keeps the gentle cut (0.5), not the early one.
#[test]
fn lr_burst_after_progress_keeps_the_gentle_cut() -> anyhow::Result<()> {
    let guarded = run(LR_BURST, GuardPolicy::Rollback, 7)?;
    let g = guarded.report.guard.as_ref().unwrap();
    let text = guarded.report.to_text();
    assert!(!g.interventions.is_empty(), "{text}");
    for i in &g.interventions {
        assert!(i.restored_step > 0, "{i}\n{text}");
        assert!((i.lr_after / i.lr_before - 0.5).abs() < 1e-9, "{i}\n{text}");
    }
    Ok(())
}

/// An LR 1e20 too large cannot be healed by three cuts of 10x: the guard rolls back three
/// times, then stops loudly (DIVERGED) with the weights of the start; off ends non-finite.
#[test]
fn absurd_lr_from_step_0_stops_loudly_with_finite_weights() -> anyhow::Result<()> {
    let guarded = run("huge-lr*1e20", GuardPolicy::Rollback, 7)?;
    let text = guarded.report.to_text();
    eprintln!(
        "huge-lr*1e20: rollback loss {:.4} mIoU {:.4}\n{text}",
        guarded.val_loss, guarded.miou
    );
    let g = guarded.report.guard.as_ref().unwrap();
    assert!(guarded.stopped, "{text}");
    assert_eq!(guarded.report.verdict, Verdict::Diverged, "{text}");
    let kinds: Vec<_> = g.interventions.iter().map(|i| i.action).collect();
    let mut expected = vec![InterventionKind::RolledBack; 3];
    expected.push(InterventionKind::Stopped);
    assert_eq!(kinds, expected, "{text}");
    assert!((g.lr_scale - 1e-3).abs() < 1e-15, "{text}");
    assert!(text.contains("stopped the run"), "{text}");
    // The weights are those of the start: finite, the loss near a uniform prediction's.
    assert!(
        guarded.val_loss.is_finite() && guarded.val_loss < 2.0 * (CLASSES as f64).ln(),
        "{text}"
    );
    let off = run("huge-lr*1e20", GuardPolicy::Off, 7)?;
    eprintln!(
        "huge-lr*1e20: off loss {:.4} mIoU {:.4} verdict {}",
        off.val_loss, off.miou, off.report.verdict
    );
    assert!(
        off.val_loss.is_nan() || off.val_loss >= 10.0 * (CLASSES as f64).ln(),
        "off loss {}",
        off.val_loss
    );
    assert_ne!(off.report.verdict, Verdict::Healthy);
    Ok(())
}

/// The monitor's history survives the rollbacks: the report of a rolled-back burst still
/// counts every step run and the spikes and divergences that caused the rollback.
#[test]
fn monitor_history_survives_a_rollback() -> anyhow::Result<()> {
    let guarded = run(LR_BURST, GuardPolicy::Rollback, 7)?;
    let s = &guarded.monitor;
    let g = guarded.report.guard.as_ref().unwrap();
    let text = guarded.report.to_text();
    assert!(!g.interventions.is_empty(), "{text}");
    assert_eq!(s.stats.steps, STEPS, "every step run is counted\n{text}");
    assert!(s.stats.divergences >= g.interventions.len(), "{text}");
    let first = &g.interventions[0];
    assert!(
        s.events
            .loss_spikes
            .iter()
            .chain(&s.events.grad_explosions)
            .any(|&st| st > first.restored_step && st <= first.step),
        "the events between the snapshot and the rollback are kept\n{text}"
    );
    Ok(())
}

/// A linear model's state and guard for the mechanics tests: snapshots and checks every 5
/// steps, no lookback, patience high enough that only the weight check fires.
fn linear_setup(
    policy: GuardPolicy,
) -> anyhow::Result<(candle_nn::Linear, TrainState, Guard, Tensor, Tensor)> {
    use candle::Module as _;
    let dev = Device::Cpu;
    let x = (Tensor::arange(0f32, 64.0, &dev)?.reshape((16, 4))? / 64.0)?.sin()?;
    let y = x.sum_keepdim(1)?;
    let vm = VarMap::new();
    let model = candle_nn::linear(
        4,
        1,
        candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &dev),
    )?;
    let recipe = OptimRecipe {
        lr: 0.1,
        ..OptimRecipe::new(OptimizerKind::Sgd, 100)
    };
    let mut state = TrainState::new(
        named_vars(&vm),
        recipe.optimizer(split_no_decay(&vm))?,
        &TrainConfig::default(),
    )?;
    let cfg = GuardConfig {
        policy,
        snapshot_every: 5,
        check_every: 5,
        lookback: 0,
        nonfinite_patience: 100,
        ..GuardConfig::for_run(100)
    };
    let guard = Guard::new(cfg, &mut state)?;
    let _ = model.forward(&x)?;
    Ok((model, state, guard, x, y))
}

fn weights(state: &TrainState) -> anyhow::Result<Vec<Vec<f32>>> {
    Ok(state
        .vars()
        .iter()
        .map(|v| v.as_tensor().flatten_all()?.to_vec1::<f32>())
        .collect::<candle::Result<_>>()?)
}

/// Ten healthy steps, NaN written into the weights, then steps until the guard acts.
fn poison_weights(policy: GuardPolicy) -> anyhow::Result<(TrainState, Guard, Vec<Vec<f32>>)> {
    use candle::Module as _;
    let (model, mut state, mut guard, x, y) = linear_setup(policy)?;
    let loss = |m: &candle_nn::Linear| (m.forward(&x)? - &y)?.sqr()?.mean_all();
    let mut at_10 = Vec::new();
    while state.step < 14 {
        if state.step == 10 {
            at_10 = weights(&state)?;
            let w = &state.vars()[0];
            w.set(&(w.as_tensor() * f64::NAN)?)?;
        }
        let out = state.step(guard.lr(0.1), None, |_| loss(&model))?;
        assert_eq!(
            guard.after_step(&mut state, &out)?,
            GuardAction::Continue,
            "step {}",
            out.step
        );
    }
    let out = state.step(guard.lr(0.1), None, |_| loss(&model))?;
    guard.after_step(&mut state, &out)?;
    Ok((state, guard, at_10))
}

#[test]
fn nan_weights_are_found_by_the_check_and_rolled_back_bit_exactly() -> anyhow::Result<()> {
    let (state, guard, at_10) = poison_weights(GuardPolicy::Rollback)?;
    // The check after step 14 (every 5 steps) found the NaN; the newest snapshot (step 10) is back.
    let i = &guard.interventions()[0];
    assert_eq!(
        (i.step, i.restored_step, i.skipped_batches, state.step),
        (14, 10, 5, 15),
        "{i}"
    );
    assert!(matches!(
        i.cause,
        keel_train::InterventionCause::Divergence(keel_train::DivergenceCause::NonFiniteWeights)
    ));
    assert_eq!(
        (i.lr_before, i.lr_after, guard.lr_scale()),
        (0.1, 0.05, 0.5)
    );
    let now = weights(&state)?;
    for (a, b) in now.iter().flatten().zip(at_10.iter().flatten()) {
        assert_eq!(a.to_bits(), b.to_bits());
    }
    assert_eq!(
        guard.snapshot_steps(),
        vec![5, 10],
        "snapshots newer than the restored one are dropped"
    );
    Ok(())
}

#[test]
fn skip_policy_reports_nan_weights_but_never_rolls_back() -> anyhow::Result<()> {
    let (state, guard, _) = poison_weights(GuardPolicy::Skip)?;
    assert!(guard.interventions().is_empty() && guard.snapshot_steps().is_empty());
    assert!(weights(&state)?[0].iter().all(|w| w.is_nan()));
    assert!(state.skip_non_finite);
    let s = state.monitor.summary();
    assert_eq!(
        s.stats.divergences, 1,
        "the check after step 14 reported the NaN weights"
    );
    assert_eq!(
        s.stats.skipped_steps, 5,
        "the NaN steps 10..=14 were skipped"
    );
    Ok(())
}

#[test]
fn off_policy_applies_non_finite_steps() -> anyhow::Result<()> {
    use candle::Module as _;
    let (model, mut state, mut guard, x, y) = linear_setup(GuardPolicy::Off)?;
    assert!(!state.skip_non_finite);
    let out = state.step(0.1, None, |_| {
        (model.forward(&(&x * f64::NAN)?)? - &y)?.sqr()?.mean_all()
    })?;
    assert!(!out.skipped && out.loss.is_nan());
    assert!(weights(&state)?[0].iter().all(|w| w.is_nan()));
    assert_eq!(guard.after_step(&mut state, &out)?, GuardAction::Continue);
    assert!(guard.snapshot_steps().is_empty());
    Ok(())
}

/// The BENCHMARKS.md table: final val mIoU per fault and policy, seeds 1-3 (mean, then
/// per seed; `stop` marks a run the guard stopped, `n` the interventions). A measurement:
/// `cargo test -p keel-train --test guard -- --ignored --nocapture fault_table`.
#[test]
#[ignore]
fn fault_table() -> anyhow::Result<()> {
    let faults = ["none", LR_BURST, NAN_BATCH, POISON_LABELS, HUGE_LR];
    println!("| fault | guard off | guard skip | guard rollback |");
    println!("|---|---|---|---|");
    for fault in faults {
        let mut row = format!("| {fault} |");
        for policy in GuardPolicy::ALL {
            let mut cells = Vec::new();
            let mut sum = 0.0;
            for seed in 1..=3 {
                let o = run(fault, policy, seed)?;
                let n = o.report.guard.as_ref().map_or(0, |g| g.interventions.len());
                sum += o.miou;
                let mark = if o.stopped {
                    format!(" stop/{n}")
                } else if n > 0 {
                    format!(" n={n}")
                } else {
                    String::new()
                };
                cells.push(format!("{:.3}{mark}", o.miou));
            }
            row += &format!(" {:.3} ({}) |", sum / 3.0, cells.join(", "));
        }
        println!("{row}");
    }
    Ok(())
}
