//! StabilityMonitor on synthetic loss curves: what must alarm, what must not, verdicts,
//! recommendations, and resuming from a serialized monitor.
use keel_norm::NormKind;
use keel_optim::Precision;
use keel_train::{
    Advice, Alarm, Bf16Cause, EvalRecord, HealthReport, MonitorConfig, RunContext,
    StabilityMonitor, StepRecord, Verdict,
};

mod common;
use common::Noise;

fn step(step: usize, loss: f64, grad_norm: f64) -> StepRecord {
    StepRecord {
        step,
        loss,
        grad_norm: Some(grad_norm),
        loss_scale: None,
        skipped: false,
    }
}

/// A decreasing loss with 5% multiplicative Gaussian noise and grad norms around 1.
fn smooth_curve(n: usize, seed: u64) -> Vec<StepRecord> {
    let mut noise = Noise(seed);
    (0..n)
        .map(|t| {
            let clean = 3.0 * (-(t as f64) / 400.0).exp() + 0.2;
            let loss = clean * (1.0 + 0.05 * noise.gauss());
            let grad = 1.0 + 0.1 * noise.gauss();
            step(t, loss, grad)
        })
        .collect()
}

fn ctx(norm: &str, batch_size: usize) -> RunContext {
    RunContext {
        norm: norm.parse().expect("a keel NormKind"),
        batch_size,
        pretrained: false,
        lr: 0.02,
        clip_grad: None,
        precision: Precision::F32,
        steps: 1000,
        backbone_norm: None,
    }
}

const GN: NormKind = NormKind::GroupNorm { groups: None };

fn feed(mon: &mut StabilityMonitor, records: &[StepRecord]) -> Vec<Alarm> {
    records.iter().flat_map(|r| mon.record_step(r)).collect()
}

#[test]
fn smooth_noisy_decreasing_curve_raises_no_alarm() {
    for seed in [1, 2, 3] {
        let mut mon = StabilityMonitor::new(MonitorConfig::default());
        let alarms = feed(&mut mon, &smooth_curve(2000, seed));
        assert!(alarms.is_empty(), "seed {seed}: {alarms:?}");
        let report = mon.report(&ctx("gn", 8));
        assert_eq!(report.verdict, Verdict::Healthy, "{}", report.to_text());
        assert_eq!(
            report.recommendations(),
            vec!["no action needed".to_string()]
        );
        assert!(report.findings.is_empty(), "{:?}", report.findings);
        let p50 = report.summary.grad_norm_p50.unwrap();
        assert!((p50 - 1.0).abs() < 0.03, "grad p50 {p50}");
    }
}

#[test]
fn a_spike_is_caught_and_only_it() {
    let mut records = smooth_curve(600, 7);
    records[300].loss *= 3.0;
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    let alarms = feed(&mut mon, &records);
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    match alarms[0] {
        Alarm::LossSpike {
            step,
            loss,
            median,
            mad,
            log_scale,
        } => {
            assert_eq!(step, 300);
            assert_eq!(loss, records[300].loss);
            assert!(log_scale, "positive losses are judged on ln(loss)");
            assert!(median > 0.0 && mad > 0.0 && loss.ln() > median.ln() + 6.0 * mad);
        }
        ref a => panic!("expected a loss spike, got {a:?}"),
    }
    let report = mon.report(&ctx("gn", 8));
    assert_eq!(report.summary.loss_spikes, 1);
    assert_eq!(report.verdict, Verdict::Warning);
    assert!(report.findings.iter().any(|f| f.contains("at steps 300")));
    assert!(report
        .recommendations()
        .iter()
        .any(|r| r.contains("lower the LR")));
}

#[test]
fn flat_curve_does_not_alarm_on_noise_but_does_on_a_real_jump() {
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    // Exactly flat: MAD is 0, so only the floor (2% of the median) stands between noise and
    // an alarm.
    let mut alarms = feed(
        &mut mon,
        &(0..100).map(|t| step(t, 1.0, 1.0)).collect::<Vec<_>>(),
    );
    alarms.extend(mon.record_step(&step(100, 1.05, 1.0)));
    alarms.extend(mon.record_step(&step(101, 1.0 + 1e-9, 1.0)));
    assert!(alarms.is_empty(), "{alarms:?}");
    let jump = mon.record_step(&step(102, 1.5, 1.0));
    assert!(
        matches!(jump[..], [Alarm::LossSpike { step: 102, .. }]),
        "{jump:?}"
    );
}

#[test]
fn no_spike_before_min_history() {
    let cfg = MonitorConfig {
        min_history: 20,
        ..Default::default()
    };
    let mut mon = StabilityMonitor::new(cfg);
    let mut records: Vec<StepRecord> = (0..40).map(|t| step(t, 1.0, 1.0)).collect();
    records[10].loss = 100.0; // only 10 values in the window
    records[30].loss = 100.0; // 29 values
    let alarms = feed(&mut mon, &records);
    let steps: Vec<usize> = alarms.iter().map(Alarm::step).collect();
    assert_eq!(steps, vec![30]);
}

#[test]
fn non_finite_losses_are_counted_and_do_not_poison_the_window() {
    let mut records = smooth_curve(400, 11);
    for t in [200, 250, 300] {
        records[t].loss = if t == 250 { f64::INFINITY } else { f64::NAN };
    }
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    let alarms = feed(&mut mon, &records);
    let nf: Vec<usize> = alarms
        .iter()
        .filter(|a| matches!(a, Alarm::NonFinite { .. }))
        .map(Alarm::step)
        .collect();
    assert_eq!(nf, vec![200, 250, 300]);
    assert_eq!(alarms.len(), 3, "nothing else: {alarms:?}");
    let report = mon.report(&ctx("gn", 8));
    assert_eq!(report.summary.non_finite_losses, 3);
    assert_eq!(report.summary.non_finite, 3);
    // Three NaN/Inf losses: Unstable (repeated), not Diverged (they do not dominate the end).
    assert_eq!(report.verdict, Verdict::Unstable);
    assert!(report
        .recommendations()
        .iter()
        .any(|r| r.starts_with("NaN losses")));
    // Was a text check for the clip flag; now the advice carries the clip value.
    assert!(report.advice.iter().any(|a| matches!(
        a,
        Advice::GuardAgainstNan {
            clip_at: Some(_),
            ..
        }
    )));
}

#[test]
fn a_single_nan_is_a_warning() {
    let mut records = smooth_curve(300, 5);
    records[150].loss = f64::NAN;
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    feed(&mut mon, &records);
    assert_eq!(mon.report(&ctx("gn", 8)).verdict, Verdict::Warning);
}

#[test]
fn nan_dominated_end_is_diverged() {
    let mut records = smooth_curve(300, 3);
    for r in &mut records[240..] {
        r.loss = f64::NAN;
        r.grad_norm = Some(f64::NAN);
    }
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    feed(&mut mon, &records);
    let report = mon.report(&ctx("gn", 8));
    assert_eq!(report.verdict, Verdict::Diverged, "{}", report.to_text());
    assert!(report.findings[0].contains("60 of the last 100 steps"));
    assert!(report
        .recommendations()
        .iter()
        .any(|r| r.contains("diverged")));
}

#[test]
fn finite_blow_up_is_diverged() {
    let mut records = smooth_curve(400, 4);
    for (i, r) in records[200..].iter_mut().enumerate() {
        r.loss = 1.0 * 1.05f64.powi(i as i32);
    }
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    feed(&mut mon, &records);
    assert_eq!(mon.report(&ctx("gn", 8)).verdict, Verdict::Diverged);
}

#[test]
fn grad_explosion_is_caught_and_clip_value_suggested() {
    let mut records = smooth_curve(300, 13);
    records[5].grad_norm = Some(50.0); // before min_history: not judged
    records[150].grad_norm = Some(20.0);
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    let alarms = feed(&mut mon, &records);
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    let Alarm::GradExplosion {
        step,
        grad_norm,
        median,
    } = alarms[0]
    else {
        panic!("{alarms:?}")
    };
    assert_eq!((step, grad_norm), (150, 20.0));
    assert!((median - 1.0).abs() < 0.05, "median {median}");
    let report = mon.report(&ctx("gn", 8));
    assert_eq!(report.summary.grad_explosions, 1);
    assert_eq!(report.summary.grad_norm_max, Some(50.0));
    let healthy = report.summary.healthy_grad_norm_p99.unwrap();
    // The healthy grad norms are 1 +- 0.1 (plus the early 50, never judged): p99 ~ 1.25.
    assert!(healthy > 1.1 && healthy < 1.4, "healthy p99 {healthy}");
    let recs = report.recommendations();
    let rec = recs
        .iter()
        .find(|r| r.starts_with("grad-norm spikes"))
        .expect("a grad-norm recommendation");
    // Was a text check for the clip flag with "1."; now the advice carries the value.
    let clip = report.advice.iter().find_map(|a| match *a {
        Advice::ClipGrad {
            at, current: None, ..
        } => Some(at),
        _ => None,
    });
    assert!(clip.is_some_and(|c| (1.0..2.0).contains(&c)), "{clip:?}");
    assert!(rec.contains("lower the LR"), "{rec}");
}

#[test]
fn eval_regression_is_caught() {
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    let mut alarms = Vec::new();
    for (i, (miou, train_loss)) in [
        (0.5, 1.0),
        (0.6, 0.8),
        (0.7, 0.6),
        (0.65, 0.7),
        (0.69, 0.55),
    ]
    .into_iter()
    .enumerate()
    {
        alarms.extend(mon.record_eval(&EvalRecord {
            step: 100 * (i + 1),
            miou,
            pixel_acc: 0.9,
            train_loss: Some(train_loss),
        }));
    }
    assert_eq!(
        alarms,
        vec![Alarm::EvalRegression {
            step: 400,
            miou: 0.65,
            best_miou: 0.7,
            best_step: 300,
            train_loss_improved: false,
        }]
    );
    let report = mon.report(&ctx("gn", 8));
    assert_eq!(report.summary.eval_regressions, 1);
    assert_eq!(report.summary.best_miou, Some(0.7));
    assert_eq!(report.summary.best_miou_step, Some(300));
    assert_eq!(report.summary.final_miou, Some(0.69));
    // At step 500 the train loss (0.55) beat the best eval's (0.6) while mIoU sat 0.01 below.
    assert!((report.summary.train_eval_gap.unwrap() - 0.01).abs() < 1e-12);
    assert_eq!(report.verdict, Verdict::Warning);
    assert!(report
        .recommendations()
        .iter()
        .any(|r| r.contains("keep the best checkpoint")));
}

#[test]
fn batchnorm_at_batch_2_train_eval_gap() {
    // Train loss keeps falling, eval mIoU swings down: BatchNorm's train/eval mismatch.
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    let curve = smooth_curve(500, 17);
    let mut alarms = Vec::new();
    for (i, chunk) in curve.chunks(100).enumerate() {
        alarms.extend(feed(&mut mon, chunk));
        let miou = [0.40, 0.55, 0.35, 0.30, 0.50][i];
        alarms.extend(mon.record_eval(&EvalRecord {
            step: 100 * (i + 1),
            miou,
            pixel_acc: 0.8,
            train_loss: None, // the monitor's own trailing loss
        }));
    }
    let regressions: Vec<_> = alarms
        .iter()
        .filter_map(|a| match a {
            Alarm::EvalRegression {
                step,
                train_loss_improved,
                ..
            } => Some((*step, *train_loss_improved)),
            _ => None,
        })
        .collect();
    assert_eq!(regressions, vec![(300, true), (400, true), (500, true)]);
    let report = mon.report(&ctx("bn", 2));
    assert_eq!(report.verdict, Verdict::Unstable);
    assert!((report.summary.train_eval_gap.unwrap() - 0.25).abs() < 1e-12);
    let recs = report.recommendations();
    let bn = &recs[0];
    assert!(bn.starts_with("BatchNorm at batch 2:"), "{bn}");
    // Was a text check for the norm flags (gn, frozen-bn) and the table's pick; now the
    // advice is typed, and the sentence names both options in plain words.
    assert_eq!(
        report.advice[0],
        Advice::SwitchNorm {
            from: NormKind::BatchNorm,
            to: GN,
            batch_size: 2,
            pretrained: false,
            train_eval_mismatch: true,
        }
    );
    assert!(bn.contains("(gn)") && bn.contains("(frozen-bn)"), "{bn}");
    assert!(bn.contains("train/eval mismatch"), "{bn}");
    assert!(report
        .findings
        .iter()
        .any(|f| f.contains("train-vs-eval gap")));
}

#[test]
fn norm_advice_follows_the_decision_table() {
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    feed(&mut mon, &smooth_curve(200, 2));
    let has = |c: &RunContext, s: &str| {
        mon.report(c)
            .recommendations()
            .iter()
            .any(|r| r.contains(s))
    };
    let switch_to = |c: &RunContext| {
        mon.report(c).advice.iter().find_map(|a| match a {
            Advice::SwitchNorm { to, .. } => Some(*to),
            _ => None,
        })
    };
    // BatchNorm at a small batch: always advised against, even when healthy.
    assert!(has(&ctx("bn", 2), "BatchNorm at batch 2"));
    let mut pretrained = ctx("bn", 4);
    pretrained.pretrained = true;
    // Was a text check for the table's pick as a norm flag.
    assert_eq!(switch_to(&pretrained), Some(NormKind::FrozenBatchNorm));
    // BatchNorm at batch 32 and GroupNorm at batch 2 are fine.
    assert!(!has(&ctx("bn", 32), "BatchNorm"));
    assert_eq!(
        mon.report(&ctx("gn", 2)).recommendations(),
        vec!["no action needed".to_string()]
    );
    // A bad norm string no longer reaches the report: RunContext holds a NormKind, and the
    // text is rejected, with a message, where it is parsed.
    let err = "layernorm".parse::<NormKind>().unwrap_err().to_string();
    assert!(err.contains("layernorm"), "{err}");
}

#[test]
fn norm_advice_for_an_unhealthy_run_off_the_table() {
    let mut records = smooth_curve(400, 21);
    for t in [100, 200, 300] {
        records[t].loss *= 4.0;
    }
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    feed(&mut mon, &records);
    let report = mon.report(&ctx("ws-gn", 1));
    assert_eq!(report.verdict, Verdict::Unstable);
    // Was a text check for "recommends" plus the norm flag.
    assert!(report.advice.contains(&Advice::SwitchNorm {
        from: NormKind::WsGroupNorm { groups: None },
        to: GN,
        batch_size: 1,
        pretrained: false,
        train_eval_mismatch: false,
    }));
    assert!(report
        .recommendations()
        .iter()
        .any(|r| r.contains("recommends GroupNorm (gn) at batch 1 from scratch")));
}

#[test]
fn loss_scale_collapse_and_scaler_overflows() {
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    let mut alarms = Vec::new();
    let mut scale = 65536.0;
    for t in 0..60 {
        // Steps 0-2: normal GradScaler warm-up overflows (inf grads, skipped, scale halved).
        // From step 30 on: an overflow every step, the scale halves down below 1.
        let overflow = !(3..30).contains(&t);
        alarms.push(mon.record_step(&StepRecord {
            step: t,
            loss: 1.0,
            grad_norm: Some(if overflow { f64::INFINITY } else { 1.0 }),
            loss_scale: Some(scale),
            skipped: overflow,
        }));
        if overflow {
            scale /= 2.0;
        }
    }
    // The early overflows are skipped steps only, not NaN alarms.
    for a in &alarms[..3] {
        assert!(matches!(a[..], [Alarm::SkippedStep { .. }]), "{a:?}");
    }
    let collapses: Vec<_> = alarms
        .iter()
        .flatten()
        .filter(|a| matches!(a, Alarm::LossScaleCollapse { .. }))
        .collect();
    // Ten decreases within the window (steps 0-2 and 30-36) trigger one episode.
    assert_eq!(collapses.len(), 1, "{collapses:?}");
    assert_eq!(collapses[0].step(), 37);
    assert!(alarms
        .iter()
        .flatten()
        .all(|a| !matches!(a, Alarm::NonFinite { .. })));
    let mut c = ctx("gn", 8);
    c.precision = Precision::F16;
    let report = mon.report(&c);
    assert_eq!(report.summary.non_finite, 0);
    assert_eq!(report.summary.skipped_steps, 33);
    assert_eq!(report.summary.scale_collapses, 1);
    assert_eq!(
        report.verdict,
        Verdict::Unstable,
        "still collapsed at the end"
    );
    assert!(report.summary.min_loss_scale.unwrap() < 1.0);
    assert!(report
        .recommendations()
        .iter()
        .any(|r| r.starts_with("loss scale collapsed: use bf16")));
    assert!(report
        .recommendations()
        .iter()
        .any(|r| r.contains("GradScaler keeps overflowing")));
    assert!(report.advice.contains(&Advice::UseBf16 {
        cause: Bf16Cause::ScalerOverflows
    }));
}

#[test]
fn non_finite_grad_without_a_scaler_is_an_alarm() {
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    let a = mon.record_step(&step(0, 1.0, f64::NAN));
    assert!(matches!(a[..], [Alarm::NonFinite { step: 0, .. }]), "{a:?}");
    let r = mon.report(&ctx("gn", 8));
    assert_eq!((r.summary.non_finite, r.summary.non_finite_losses), (1, 0));
}

#[test]
fn serde_round_trip_gives_identical_subsequent_alarms() -> anyhow::Result<()> {
    let mut records = smooth_curve(800, 29);
    records[500].loss *= 5.0;
    records[550].grad_norm = Some(40.0);
    records[600].loss = f64::NAN;
    for r in &mut records[650..700] {
        r.loss_scale = Some(1024.0 / (r.step - 649) as f64);
    }
    let eval = |step: usize, miou: f64| EvalRecord {
        step,
        miou,
        pixel_acc: 0.9,
        train_loss: None,
    };
    let mut a = StabilityMonitor::new(MonitorConfig::default());
    feed(&mut a, &records[..400]);
    a.record_eval(&eval(400, 0.7));
    let json = serde_json::to_string(&a)?;
    let mut b: StabilityMonitor = serde_json::from_str(&json)?;
    assert_eq!(a, b);
    // Also through a serde_json::Value (as when it travels inside a checkpoint's meta).
    let via_value: StabilityMonitor = serde_json::from_value(serde_json::to_value(&a)?)?;
    assert_eq!(a, via_value);
    let mut alarms_a = Vec::new();
    let mut alarms_b = Vec::new();
    for (i, r) in records[400..].iter().enumerate() {
        alarms_a.push(a.record_step(r));
        alarms_b.push(b.record_step(r));
        if i % 100 == 99 {
            let e = eval(r.step, 0.6 + 0.01 * i as f64 / 100.0);
            alarms_a.push(a.record_eval(&e));
            alarms_b.push(b.record_eval(&e));
        }
    }
    let flat: Vec<&Alarm> = alarms_a.iter().flatten().collect();
    assert!(
        flat.len() >= 4,
        "the second half must raise alarms: {flat:?}"
    );
    for (x, y) in alarms_a.iter().zip(&alarms_b) {
        // NaN != NaN, so compare the serialized form.
        assert_eq!(serde_json::to_string(x)?, serde_json::to_string(y)?);
    }
    let c = ctx("gn", 8);
    assert_eq!(
        serde_json::to_string(&a.report(&c))?,
        serde_json::to_string(&b.report(&c))?
    );
    // And the alarms themselves survive JSON, NaN included.
    for x in flat {
        let back: Alarm = serde_json::from_str(&serde_json::to_string(x)?)?;
        assert_eq!(serde_json::to_string(&back)?, serde_json::to_string(x)?);
    }
    Ok(())
}

#[test]
fn step_records_keep_non_finite_values_through_json() -> anyhow::Result<()> {
    let r = StepRecord {
        step: 3,
        loss: f64::NEG_INFINITY,
        grad_norm: Some(f64::INFINITY),
        loss_scale: Some(0.1 + 0.2),
        skipped: true,
    };
    let back: StepRecord = serde_json::from_str(&serde_json::to_string(&r)?)?;
    assert_eq!(back, r);
    // A foreign writer's `null` reads as NaN.
    let nulls: StepRecord = serde_json::from_str(
        r#"{"step":1,"loss":null,"grad_norm":null,"loss_scale":null,"skipped":false}"#,
    )?;
    assert!(nulls.loss.is_nan() && nulls.grad_norm.is_none());
    assert!(serde_json::from_str::<StepRecord>(
        r#"{"step":1,"loss":"big","grad_norm":null,"loss_scale":null,"skipped":false}"#
    )
    .is_err());
    Ok(())
}

#[test]
fn report_round_trips_and_prints() -> anyhow::Result<()> {
    let mut records = smooth_curve(300, 31);
    records[200].loss *= 4.0;
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    feed(&mut mon, &records);
    mon.record_eval(&EvalRecord {
        step: 300,
        miou: 0.8,
        pixel_acc: 0.95,
        train_loss: None,
    });
    let report = mon.report(&ctx("bn", 2));
    let back: HealthReport = serde_json::from_str(&serde_json::to_string(&report)?)?;
    assert_eq!(back, report);
    let text = report.to_text();
    assert!(text.starts_with("Training health: WARNING\n"), "{text}");
    assert!(text.contains("1 loss spikes"), "{text}");
    assert!(
        text.contains("mIoU: final 0.8000, best 0.8000 (step 300)"),
        "{text}"
    );
    assert!(
        text.contains("Recommendations:\n  - BatchNorm at batch 2"),
        "{text}"
    );
    Ok(())
}

/// Repeated grad-norm explosions make a run Unstable, unless a tight clip bounded
/// them (then they are a Warning: clipping is doing its job).
#[test]
fn explosions_bounded_by_a_tight_clip_are_a_warning() {
    let mut records = smooth_curve(1000, 5);
    for t in [200, 400, 600, 800] {
        records[t].grad_norm = Some(15.0);
    }
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    feed(&mut mon, &records);
    assert_eq!(mon.report(&ctx("gn", 8)).summary.grad_explosions, 4);
    assert_eq!(mon.report(&ctx("gn", 8)).verdict, Verdict::Unstable);
    let clipped = RunContext {
        clip_grad: Some(1.2),
        ..ctx("gn", 8)
    };
    let report = mon.report(&clipped);
    assert_eq!(report.verdict, Verdict::Warning, "{}", report.to_text());
    assert!(report
        .findings
        .iter()
        .any(|f| f.contains("clipping the global gradient norm at 1.2 bounded them")));
    let loose = RunContext {
        clip_grad: Some(10.0),
        ..ctx("gn", 8)
    };
    assert_eq!(mon.report(&loose).verdict, Verdict::Unstable);
}

/// NaN/inf steps and evals, a NaN mIoU, an infinite loss scale and non-finite thresholds: the
/// monitor, its summary and its report all survive serde_json (as inside a checkpoint's
/// meta, through a `Value`), and the restored monitor reports exactly what the original does.
#[test]
fn non_finite_state_round_trips_through_json_values() -> anyhow::Result<()> {
    let cfg = MonitorConfig {
        diverge_factor: f64::INFINITY,
        ..Default::default()
    };
    let mut mon = StabilityMonitor::new(cfg);
    let mut records = smooth_curve(300, 37);
    records[100].loss = f64::NAN;
    records[120].loss = f64::INFINITY;
    records[140].grad_norm = Some(f64::NEG_INFINITY);
    records[160].grad_norm = Some(f64::NAN);
    for r in &mut records[200..] {
        r.loss_scale = Some(if r.step == 299 { f64::INFINITY } else { 1024.0 });
    }
    feed(&mut mon, &records[..250]);
    for (step, miou) in [(150, 0.5), (250, f64::NAN)] {
        mon.record_eval(&EvalRecord {
            step,
            miou,
            pixel_acc: f64::NAN,
            train_loss: Some(f64::INFINITY),
        });
    }
    feed(&mut mon, &records[250..]);

    let value = serde_json::to_value(&mon)?;
    let back: StabilityMonitor = serde_json::from_value(value.clone())?;
    // NaN != NaN: equal states serialize identically, and the re-serialized value is the same.
    assert_eq!(serde_json::to_value(&back)?, value);
    assert_eq!(back.config().diverge_factor, f64::INFINITY);

    let summary = mon.summary();
    assert!(summary.stats.final_miou.is_some_and(f64::is_nan));
    assert_eq!(summary.stats.non_finite, 4);
    let summary_value = serde_json::to_value(&summary)?;
    let summary_back: keel_train::MonitorSummary = serde_json::from_value(summary_value.clone())?;
    assert!(summary_back.stats.final_miou.is_some_and(f64::is_nan));
    assert_eq!(serde_json::to_value(&summary_back)?, summary_value);
    assert_eq!(serde_json::to_value(back.summary())?, summary_value);

    let c = RunContext {
        lr: f64::INFINITY,
        clip_grad: Some(f64::NAN),
        ..ctx("gn", 2)
    };
    let report = mon.report(&c);
    let report_value = serde_json::to_value(&report)?;
    assert_eq!(serde_json::to_value(back.report(&c))?, report_value);
    let report_back: HealthReport = serde_json::from_value(report_value.clone())?;
    assert_eq!(serde_json::to_value(&report_back)?, report_value);
    assert_eq!(report_back.to_text(), report.to_text());
    assert!(!report.advice.is_empty());
    Ok(())
}

/// No sentence the report writes names a command-line option.
#[test]
fn report_text_names_no_command_line_flag() {
    let mut records = smooth_curve(800, 41);
    for t in [100, 300, 500] {
        records[t].loss *= 5.0;
        records[t + 1].grad_norm = Some(30.0);
    }
    records[600].loss = f64::NAN;
    for r in &mut records[700..] {
        r.skipped = true;
        r.loss_scale = Some(0.5);
    }
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    feed(&mut mon, &records);
    for (i, miou) in [0.6, 0.4, 0.3].into_iter().enumerate() {
        mon.record_eval(&EvalRecord {
            step: 800 + i,
            miou,
            pixel_acc: 0.9,
            train_loss: None,
        });
    }
    for (norm, batch, precision, clip) in [
        ("bn", 2, Precision::F16, None),
        ("ws-gn", 1, Precision::F32, Some(100.0)),
        ("gn", 8, Precision::Bf16, Some(1.0)),
    ] {
        let c = RunContext {
            precision,
            clip_grad: clip,
            ..ctx(norm, batch)
        };
        let report = mon.report(&c);
        assert!(report.advice.len() >= 5, "{:?}", report.advice);
        let text = report.to_text();
        assert!(!text.contains("--"), "{text}");
    }
}
