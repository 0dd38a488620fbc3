//! Divergence from step 0: synthetic curves that diverge from their first update must be
//! Diverged (never Healthy); healthy, noisy, warming-up curves must keep their old verdicts.
use keel_optim::Precision;
use keel_train::{
    Advice, Alarm, DivergenceCause, MonitorConfig, RunContext, StabilityMonitor, StepRecord,
    Verdict,
};

mod common;
use common::Noise;

fn rec(step: usize, loss: f64, grad_norm: f64) -> StepRecord {
    StepRecord {
        step,
        loss,
        grad_norm: Some(grad_norm),
        loss_scale: None,
        skipped: false,
    }
}

fn ctx(steps: usize) -> RunContext {
    RunContext {
        norm: "gn".parse().expect("a keel NormKind"),
        batch_size: 1,
        pretrained: false,
        lr: 1000.0,
        clip_grad: Some(1.0),
        precision: Precision::F32,
        steps,
        backbone_norm: None,
    }
}

/// The monitor with every step-0 divergence test switched off: the behaviour before they
/// existed.
fn without_divergence_tests() -> MonitorConfig {
    MonitorConfig {
        anchor_spike_factor: f64::INFINITY,
        diverge_initial_factor: f64::INFINITY,
        reference_loss: None,
        grad_growth_total: f64::INFINITY,
        ..Default::default()
    }
}

/// `--lr 1000` from step 0 as a user reproduced it: 1.4, 8387, 46382, then geometric growth
/// to 1e12 over `n` steps, with ln-normal noise.
fn lr_1000_curve(n: usize, seed: u64) -> Vec<StepRecord> {
    let mut noise = Noise(seed);
    (0..n)
        .map(|t| {
            let loss = match t {
                0 => 1.4,
                1 => 8387.0,
                2 => 46382.0,
                _ => 46382.0 * (1e12f64 / 46382.0).powf((t - 2) as f64 / (n - 3) as f64),
            };
            let loss = if t > 2 {
                loss * (0.3 * noise.gauss()).exp()
            } else {
                loss
            };
            rec(
                t,
                loss,
                1e3 * (1.0 + t as f64) * (0.3 * noise.gauss()).exp(),
            )
        })
        .collect()
}

/// A healthy batch-1-like curve: ln-normal noise (sigma 0.5) around a decaying mean, grad
/// norms ln-normal around a slowly decaying level.
fn healthy_curve(n: usize, seed: u64) -> Vec<StepRecord> {
    let mut noise = Noise(seed);
    (0..n)
        .map(|t| {
            let mean = 2.5 * (-(t as f64) / 1500.0).exp() + 0.3;
            let loss = mean * (0.5 * noise.gauss()).exp();
            let g = (2.0 - t as f64 / n as f64) * (0.5 * noise.gauss()).exp();
            rec(t, loss, g)
        })
        .collect()
}

fn divergences(alarms: &[Alarm]) -> Vec<(usize, DivergenceCause)> {
    alarms
        .iter()
        .filter_map(|a| match a {
            Alarm::Divergence { step, cause } => Some((*step, cause.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn lr_1000_from_step_0_is_diverged_and_never_healthy() {
    for seed in [1, 2, 3] {
        let records = lr_1000_curve(200, seed);
        let mut mon = StabilityMonitor::new(MonitorConfig::default());
        let mut alarms = Vec::new();
        for r in &records {
            alarms.extend(mon.record_step(r));
            let verdict = mon.report(&ctx(200)).verdict;
            if r.step >= 1 {
                assert_ne!(verdict, Verdict::Healthy, "seed {seed} step {}", r.step);
            }
            if r.step >= 4 {
                assert_eq!(verdict, Verdict::Diverged, "seed {seed} step {}", r.step);
            }
        }
        // The jump at step 1 is a spike against the anchor (the first loss), long before
        // min_history.
        assert!(
            matches!(alarms[0], Alarm::LossSpike { step: 1, .. }),
            "{:?}",
            alarms[0]
        );
        let div = divergences(&alarms);
        assert!(
            matches!(
                div[0],
                (4, DivergenceCause::LossAboveInitial { initial, .. }) if initial == 1.4
            ),
            "{div:?}"
        );
        let report = mon.report(&ctx(200));
        assert!(report.summary.loss_spikes >= 190, "{}", report.to_text());
        assert_eq!(report.summary.divergences, div.len());
        assert!(report.findings[0].starts_with("training diverged from step 4"));
        assert!(report.findings[0].contains("still diverging at the last step"));
        assert!(matches!(
            report.advice[..],
            [
                Advice::RestartBeforeDivergence {
                    step: 4,
                    from: 1000.0,
                    to: 100.0
                },
                ..
            ]
        ));
        // The old monitor called this run healthy or at worst saw a few spikes.
        let mut old = StabilityMonitor::new(without_divergence_tests());
        records.iter().for_each(|r| drop(old.record_step(r)));
        assert_eq!(old.report(&ctx(200)).summary.loss_spikes, 0);
    }
}

#[test]
fn lr_1000_that_plateaus_under_clipping_is_diverged() {
    // With clipping the loss can stop growing: 1.4, 8387, 46382, then ~5e4 for good.
    let mut noise = Noise(9);
    let mut mon = StabilityMonitor::new(MonitorConfig {
        reference_loss: Some(2f64.ln()),
        ..Default::default()
    });
    let mut alarms = Vec::new();
    for t in 0..300 {
        let loss = match t {
            0 => 1.4,
            1 => 8387.0,
            _ => 46382.0 * (0.2 * noise.gauss()).exp(),
        };
        alarms.extend(mon.record_step(&rec(t, loss, 5.0)));
    }
    let div = divergences(&alarms);
    // The reference test (10 x ln 2) fires first; one episode, not one alarm per step.
    assert!(
        matches!(div[..], [(4, DivergenceCause::LossAboveReference { .. })]),
        "{div:?}"
    );
    let report = mon.report(&ctx(300));
    assert_eq!(report.verdict, Verdict::Diverged, "{}", report.to_text());
    assert!(mon.diverging());
}

#[test]
fn grad_norm_doubling_from_step_0_is_a_divergence() {
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    let mut alarms = Vec::new();
    for t in 0..30 {
        alarms.extend(mon.record_step(&rec(t, 2.0, 0.5 * 2f64.powi(t as i32))));
    }
    let div = divergences(&alarms);
    match &div[..] {
        [(
            9,
            DivergenceCause::GradGrowth {
                rate,
                total,
                window,
            },
        )] => {
            assert!((rate - 2.0).abs() < 1e-9, "rate {rate}");
            assert!((total - 512.0).abs() < 1e-6, "total {total}");
            assert_eq!(*window, 10);
        }
        other => panic!("expected one grad-growth divergence at step 9, got {other:?}"),
    }
    assert_eq!(mon.report(&ctx(30)).verdict, Verdict::Diverged);
    // 1.3x per step is below the default rate of 1.5x: no alarm.
    let mut slow = StabilityMonitor::new(MonitorConfig::default());
    for t in 0..30 {
        let alarms = slow.record_step(&rec(t, 2.0, 1.3f64.powi(t as i32)));
        assert!(divergences(&alarms).is_empty(), "step {t}: {alarms:?}");
    }
}

#[test]
fn non_finite_weights_are_a_divergence() {
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    for t in 0..100 {
        mon.record_step(&rec(t, 1.0 - 0.001 * t as f64, 1.0));
        if t % 25 == 0 {
            assert!(mon.record_weights_finite(t, true).is_empty());
        }
    }
    assert_eq!(mon.report(&ctx(100)).verdict, Verdict::Healthy);
    let alarms = mon.record_weights_finite(100, false);
    assert!(matches!(
        alarms[..],
        [Alarm::Divergence {
            step: 100,
            cause: DivergenceCause::NonFiniteWeights
        }]
    ));
    assert_eq!(
        alarms[0].to_string(),
        "step 100: divergence: non-finite (NaN/Inf) weights"
    );
    let report = mon.report(&ctx(100));
    assert_eq!(report.verdict, Verdict::Diverged);
    assert!(report.findings[0].contains("step 100: non-finite (NaN/Inf) weights"));
    assert_eq!(
        report.advice[0].to_string(),
        "the run diverged at step 100: restart from the last checkpoint before step 100 with \
         the LR lowered 10x (now 1000, e.g. 100) and a warmup"
    );
}

#[test]
fn healthy_noisy_batch_1_curves_keep_their_verdicts() {
    for seed in [1, 2, 3] {
        let records = healthy_curve(5000, seed);
        for reference_loss in [None, Some(21f64.ln())] {
            let cfg = MonitorConfig {
                reference_loss,
                ..Default::default()
            };
            let mut new = StabilityMonitor::new(cfg);
            let mut old = StabilityMonitor::new(without_divergence_tests());
            for r in &records {
                let (a, b) = (new.record_step(r), old.record_step(r));
                assert_eq!(a, b, "seed {seed} step {}", r.step);
            }
            let (a, b) = (new.report(&ctx(5000)), old.report(&ctx(5000)));
            assert!(
                a.verdict <= Verdict::Warning,
                "seed {seed}: {}",
                a.to_text()
            );
            assert_eq!(a.verdict, b.verdict, "seed {seed}");
            assert_eq!(a.findings, b.findings, "seed {seed}");
            assert_eq!(a.summary.divergences, 0);
        }
    }
}

#[test]
fn a_warmup_that_rises_3x_is_not_a_divergence() {
    let mut noise = Noise(17);
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    let mut alarms = Vec::new();
    for t in 0..1000 {
        // 1.0 -> 3.0 over the first 50 steps, then decaying to 0.2.
        let mean = if t < 50 {
            1.0 + 2.0 * t as f64 / 50.0
        } else {
            2.8 * (-((t - 50) as f64) / 200.0).exp() + 0.2
        };
        let g = if t < 50 { 1.0 + 0.1 * t as f64 } else { 6.0 };
        alarms.extend(mon.record_step(&rec(t, mean * (0.1 * noise.gauss()).exp(), g)));
    }
    assert!(alarms.is_empty(), "{alarms:?}");
    assert_eq!(mon.report(&ctx(1000)).verdict, Verdict::Healthy);
}

#[test]
fn a_loss_far_below_the_uniform_prediction_is_not_a_divergence() {
    // Fine-tuning: the loss starts at 0.02, far below ln(21), bumps 25x, then recovers.
    let curve = |t: usize| {
        if (50..80).contains(&t) {
            0.5
        } else {
            0.02 * (1.0 + 0.01 * (t % 7) as f64)
        }
    };
    let mut with_ref = StabilityMonitor::new(MonitorConfig {
        reference_loss: Some(21f64.ln()),
        ..Default::default()
    });
    let mut alarms = Vec::new();
    for t in 0..400 {
        alarms.extend(with_ref.record_step(&rec(t, curve(t), 1.0)));
    }
    assert!(divergences(&alarms).is_empty(), "{alarms:?}");
    assert_ne!(with_ref.report(&ctx(400)).verdict, Verdict::Diverged);
    // Without the reference the same bump is 25x the start: the test can fail.
    let mut no_ref = StabilityMonitor::new(MonitorConfig::default());
    let alarms: Vec<Alarm> = (0..400)
        .flat_map(|t| no_ref.record_step(&rec(t, curve(t), 1.0)))
        .collect();
    assert!(matches!(
        divergences(&alarms)[..],
        [(52, DivergenceCause::LossAboveInitial { .. })]
    ));
}

#[test]
fn an_early_outlier_is_a_spike_not_a_divergence() {
    let mut mon = StabilityMonitor::new(MonitorConfig::default());
    let mut alarms = Vec::new();
    for t in 0..40 {
        let loss = if t == 3 { 5000.0 } else { 1.0 };
        alarms.extend(mon.record_step(&rec(t, loss, 1.0)));
    }
    assert!(
        matches!(alarms[..], [Alarm::LossSpike { step: 3, median, log_scale: true, .. }] if median == 1.0),
        "{alarms:?}"
    );
    assert_eq!(mon.anchor_loss(), Some(1.0));
    assert_eq!(mon.report(&ctx(40)).verdict, Verdict::Warning);
}

#[test]
fn divergence_state_round_trips_through_json() -> anyhow::Result<()> {
    let records = lr_1000_curve(100, 5);
    let mut a = StabilityMonitor::new(MonitorConfig {
        reference_loss: Some(3.0),
        ..Default::default()
    });
    for r in &records[..3] {
        a.record_step(r);
    }
    for t in 0..7i32 {
        a.record_step(&rec(3 + t as usize, 2.0, 2f64.powi(t)));
    }
    a.record_weights_finite(10, false);
    let json = serde_json::to_string(&a)?;
    let mut b: StabilityMonitor = serde_json::from_str(&json)?;
    assert_eq!(a, b);
    assert_eq!(serde_json::to_string(&b)?, json);
    for t in 10..40 {
        let r = rec(t, 2.0, 2f64.powi(t as i32 - 3));
        assert_eq!(a.record_step(&r), b.record_step(&r), "step {t}");
    }
    assert_eq!(a.summary(), b.summary());
    assert!(a.summary().divergence_events.len() >= 2);
    Ok(())
}

#[test]
fn a_monitor_serialized_before_the_divergence_tests_still_loads() -> anyhow::Result<()> {
    // Captured from the monitor before the divergence tests existed: 150 steps of a decaying
    // loss, a spike at 120, a NaN at 130, an eval at 100.
    let json = include_str!("data/monitor_pre_divergence.json");
    assert!(!json.contains("anchor") && !json.contains("divergence"));
    let mut mon: StabilityMonitor = serde_json::from_str(json)?;
    assert_eq!(mon.config(), &MonitorConfig::default());
    let s = mon.summary();
    assert_eq!(
        (s.stats.steps, s.stats.loss_spikes, s.stats.divergences),
        (150, 1, 0)
    );
    // The anchor is rebuilt from the first losses the old monitor kept.
    let mut first: Vec<f64> = (0..10)
        .map(|t: usize| 2.0 * (-(t as f64) / 100.0).exp() + 0.01 * ((t * 7919 % 13) as f64 / 13.0))
        .collect();
    first.sort_by(f64::total_cmp);
    assert_eq!(s.anchor_loss, Some(0.5 * (first[4] + first[5])));
    assert!(mon.record_step(&rec(150, 0.5, 1.0)).is_empty());
    let alarms = mon.record_step(&rec(151, 5000.0, 1.0));
    assert!(matches!(alarms[..], [Alarm::LossSpike { step: 151, .. }]));
    // Serializing again writes the new fields.
    let again = serde_json::to_string(&mon)?;
    assert!(again.contains("anchor_len") && again.contains("divergence_events"));
    Ok(())
}
