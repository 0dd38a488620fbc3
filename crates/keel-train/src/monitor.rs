//! "Is my training going haywire?": a stability monitor fed each step's loss, gradient norm,
//! loss scale and skip flag, and each evaluation's mIoU.
//!
//! Loss spikes are found with the median and the median absolute deviation over a trailing
//! window (Hampel's outlier test, MAD scaled by 1.4826 to estimate a Gaussian sigma; Leys et
//! al. 2013), which a single outlier cannot drag along the way a mean and a standard
//! deviation would. The test runs on `ln(loss)` when the losses are positive: per-batch
//! losses at batch 1-2 are heavy-tailed with a spread proportional to their level, and on a
//! linear scale a healthy seg_train run (gn, batch 2, 12000 steps) raised 123 "spikes" at
//! k = 6, on a log scale none. Gradient-norm explosions are judged against the trailing median, the
//! loss scale of f16 mixed precision against PyTorch's `GradScaler` dynamics (halve on
//! overflow, grow after 2000 clean steps).
//!
//! Those tests need a healthy baseline; a run that diverges from its first update has none.
//! Spikes are therefore also judged against a frozen anchor of the first losses, and
//! [`Alarm::Divergence`] comes from absolute tests (`crate::divergence`): the loss far above
//! its robust initial value or a uniform prediction, geometric grad-norm growth, NaN weights.
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::config::MonitorConfig;
use crate::divergence::{DivergenceCause, DivergenceEvent, DivergenceWatch};
use crate::report::{HealthReport, RunContext};
use crate::stats::{lossless_f64, median, median_mad, QuantileSketch};
use crate::summary::{EventSteps, MonitorSummary, ReportStats};

/// One optimizer step, as the training loop saw it. Non-finite values survive a JSON round
/// trip (`"NaN"`, `"inf"`), so these records can go straight into a [`crate::JsonlLogger`].
///
/// ```
/// use keel_train::StepRecord;
/// let r = StepRecord { step: 7, loss: f64::NAN, grad_norm: Some(1.5), loss_scale: None, skipped: false };
/// let json = serde_json::to_string(&r).unwrap();
/// assert_eq!(json, r#"{"step":7,"loss":"NaN","grad_norm":1.5,"loss_scale":null,"skipped":false}"#);
/// let back: StepRecord = serde_json::from_str(&json).unwrap();
/// assert!(back.loss.is_nan());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step index.
    pub step: usize,
    /// The training loss of this step (unscaled).
    #[serde(with = "lossless_f64")]
    pub loss: f64,
    /// The global L2 gradient norm before clipping (unscaled), when computed.
    #[serde(with = "lossless_f64::option")]
    pub grad_norm: Option<f64>,
    /// The f16 loss scale in use, when a GradScaler runs.
    #[serde(with = "lossless_f64::option")]
    pub loss_scale: Option<f64>,
    /// Whether the optimizer step was skipped (GradScaler overflow, non-finite gradients).
    pub skipped: bool,
}

/// One evaluation.
///
/// ```
/// use keel_train::EvalRecord;
/// let r = EvalRecord { step: 500, miou: 0.81, pixel_acc: 0.95, train_loss: Some(0.3) };
/// assert!(r.miou < r.pixel_acc);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// The step the model was evaluated at.
    pub step: usize,
    /// Validation mean IoU.
    #[serde(with = "lossless_f64")]
    pub miou: f64,
    /// Validation pixel accuracy.
    #[serde(with = "lossless_f64")]
    pub pixel_acc: f64,
    /// The training loss around this eval (e.g. the mean since the previous eval). When
    /// `None`, the monitor uses the median of its trailing loss window.
    #[serde(with = "lossless_f64::option")]
    pub train_loss: Option<f64>,
}

/// Something the monitor noticed at one step or eval.
///
/// ```
/// use keel_train::{Alarm, MonitorConfig, StabilityMonitor, StepRecord};
/// let mut mon = StabilityMonitor::new(MonitorConfig::default());
/// let alarms = mon.record_step(&StepRecord { step: 0, loss: f64::INFINITY, grad_norm: None, loss_scale: None, skipped: false });
/// assert!(matches!(alarms[0], Alarm::NonFinite { step: 0, .. }));
/// assert!(alarms[0].to_string().contains("non-finite"));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Alarm {
    /// `l > median_l + spike_k * mad` over the trailing window, `l = ln(loss)` when
    /// `log_scale`, else the loss.
    LossSpike {
        /// The step.
        step: usize,
        /// The loss.
        #[serde(with = "lossless_f64")]
        loss: f64,
        /// The trailing median loss (in loss units).
        #[serde(with = "lossless_f64")]
        median: f64,
        /// The robust spread used, `max(1.4826 * MAD, floor)`, of `ln(loss)` when
        /// `log_scale` (a relative spread), else of the loss.
        #[serde(with = "lossless_f64")]
        mad: f64,
        /// Whether the test ran on `ln(loss)`.
        #[serde(default)]
        log_scale: bool,
    },
    /// `grad_norm > grad_explosion_factor * median` of the trailing grad norms.
    GradExplosion {
        /// The step.
        step: usize,
        /// The gradient norm.
        #[serde(with = "lossless_f64")]
        grad_norm: f64,
        /// The trailing median gradient norm.
        #[serde(with = "lossless_f64")]
        median: f64,
    },
    /// A NaN or infinite loss, or a non-finite grad norm that was not a GradScaler overflow
    /// (a skipped step with a loss scale counts as [`Alarm::SkippedStep`] only).
    NonFinite {
        /// The step.
        step: usize,
        /// The loss.
        #[serde(with = "lossless_f64")]
        loss: f64,
        /// The gradient norm.
        #[serde(with = "lossless_f64::option")]
        grad_norm: Option<f64>,
    },
    /// The optimizer step was skipped.
    SkippedStep {
        /// The step.
        step: usize,
        /// The loss scale at that step.
        #[serde(with = "lossless_f64::option")]
        loss_scale: Option<f64>,
    },
    /// The loss scale fell below `min_loss_scale` or was lowered `max_scale_halvings` times
    /// within `window` steps. Raised once per episode.
    LossScaleCollapse {
        /// The step.
        step: usize,
        /// The loss scale.
        #[serde(with = "lossless_f64")]
        scale: f64,
        /// Scale decreases within the trailing window.
        halvings_in_window: usize,
    },
    /// The run is diverging (absolute tests that need no healthy baseline). Raised when an
    /// episode of one test begins, and at each report of non-finite weights.
    Divergence {
        /// The step.
        step: usize,
        /// Which test fired, with its values.
        cause: DivergenceCause,
    },
    /// Eval mIoU more than `eval_regression_margin` below the best so far.
    EvalRegression {
        /// The eval step.
        step: usize,
        /// Its mIoU.
        #[serde(with = "lossless_f64")]
        miou: f64,
        /// The best mIoU so far.
        #[serde(with = "lossless_f64")]
        best_miou: f64,
        /// The step of the best mIoU.
        best_step: usize,
        /// Whether the training loss was no worse than at the best eval: the model kept
        /// fitting the training data while eval fell (a train-vs-eval gap: BatchNorm's
        /// train/eval mismatch, or overfitting), rather than training itself degrading.
        train_loss_improved: bool,
    },
}

impl Alarm {
    /// The step or eval step the alarm belongs to.
    pub fn step(&self) -> usize {
        match *self {
            Alarm::LossSpike { step, .. }
            | Alarm::GradExplosion { step, .. }
            | Alarm::NonFinite { step, .. }
            | Alarm::SkippedStep { step, .. }
            | Alarm::LossScaleCollapse { step, .. }
            | Alarm::Divergence { step, .. }
            | Alarm::EvalRegression { step, .. } => step,
        }
    }
}

impl std::fmt::Display for Alarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Alarm::LossSpike { step, loss, median, mad, log_scale } => write!(
                f,
                "step {step}: loss spike {loss:.4} (trailing median {median:.4}, robust sigma {mad:.3e}{})",
                if *log_scale { " of ln(loss)" } else { "" }
            ),
            Alarm::GradExplosion { step, grad_norm, median } => write!(
                f,
                "step {step}: grad-norm explosion {grad_norm:.4e} ({:.1}x the trailing median {median:.4e})",
                grad_norm / median
            ),
            Alarm::NonFinite { step, loss, grad_norm } => match grad_norm {
                Some(g) => write!(f, "step {step}: non-finite loss {loss} / grad norm {g}"),
                None => write!(f, "step {step}: non-finite loss {loss}"),
            },
            Alarm::SkippedStep { step, loss_scale } => match loss_scale {
                Some(s) => write!(f, "step {step}: optimizer step skipped (loss scale {s})"),
                None => write!(f, "step {step}: optimizer step skipped"),
            },
            Alarm::LossScaleCollapse { step, scale, halvings_in_window } => write!(
                f,
                "step {step}: loss scale collapsed to {scale} ({halvings_in_window} decreases in the window)"
            ),
            Alarm::Divergence { step, cause } => write!(f, "step {step}: divergence: {cause}"),
            Alarm::EvalRegression { step, miou, best_miou, best_step, train_loss_improved } => {
                write!(
                    f,
                    "step {step}: eval mIoU {miou:.4} regressed from the best {best_miou:.4} (step {best_step})"
                )?;
                if *train_loss_improved {
                    write!(f, " while the train loss kept improving")?;
                }
                Ok(())
            }
        }
    }
}

/// The count and the first steps of one event kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Events {
    count: usize,
    steps: Vec<usize>,
}

impl Events {
    fn add(&mut self, step: usize) {
        self.count += 1;
        if self.steps.len() < EventSteps::LISTED {
            self.steps.push(step);
        }
    }
}

/// One eval as remembered by the monitor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct EvalPoint {
    step: usize,
    #[serde(with = "lossless_f64")]
    miou: f64,
    #[serde(with = "lossless_f64::option")]
    train_loss: Option<f64>,
}

/// Watches a training run for loss spikes, gradient explosions, NaN/Inf, skipped steps,
/// loss-scale collapses, eval regressions and a train-vs-eval gap, and writes a
/// [`HealthReport`] (through the data of a [`MonitorSummary`]) with a verdict and advice
/// from keel's decision table.
///
/// The monitor is plain data (`Serialize + Deserialize`): store it in the checkpoint meta and
/// a resumed run raises exactly the alarms an uninterrupted one would. Memory is bounded by
/// the window, not by the run length.
///
/// ```
/// use keel_norm::NormKind;
/// use keel_optim::Precision;
/// use keel_train::{Advice, MonitorConfig, RunContext, StabilityMonitor, StepRecord, Verdict};
/// let mut mon = StabilityMonitor::new(MonitorConfig::default());
/// for step in 0..200 {
///     let loss = 2.0 * (-(step as f64) / 100.0).exp() + 0.01 * ((step * 7919 % 13) as f64 / 13.0);
///     let grad_norm = Some(1.0 + 0.1 * ((step * 31 % 7) as f64 / 7.0));
///     let alarms = mon.record_step(&StepRecord { step, loss, grad_norm, loss_scale: None, skipped: false });
///     assert!(alarms.is_empty(), "{alarms:?}");
/// }
/// let ctx = RunContext { norm: NormKind::BatchNorm, batch_size: 2, pretrained: false,
///                        lr: 0.01, clip_grad: None, precision: Precision::F32, steps: 200,
///                        backbone_norm: None };
/// let report = mon.report(&ctx);
/// // Clean dynamics, but BatchNorm at batch 2 is a risk on its own: a Warning, advised
/// // against with the norm keel's table picks.
/// assert!(matches!(report.verdict, Verdict::Warning));
/// assert!(report.findings.iter().any(|f| f.starts_with("BatchNorm below 16 images")));
/// let gn = RunContext { norm: NormKind::GroupNorm { groups: None }, ..ctx.clone() };
/// assert!(matches!(mon.report(&gn).verdict, Verdict::Healthy));
/// assert!(matches!(report.advice[..],
///                  [Advice::SwitchNorm { to: NormKind::GroupNorm { groups: None }, .. }]));
/// println!("{}", report.to_text());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StabilityMonitor {
    cfg: MonitorConfig,
    /// Trailing finite losses.
    #[serde(with = "lossless_f64::seq")]
    losses: VecDeque<f64>,
    /// Trailing finite grad norms.
    #[serde(with = "lossless_f64::seq")]
    grads: VecDeque<f64>,
    /// The first `window` finite losses (the baseline for divergence).
    #[serde(with = "lossless_f64::seq")]
    first_losses: Vec<f64>,
    /// Whether each of the last `window` steps had a non-finite loss.
    recent_nonfinite: VecDeque<bool>,
    #[serde(with = "lossless_f64::option")]
    last_scale: Option<f64>,
    #[serde(with = "lossless_f64::option")]
    min_scale: Option<f64>,
    /// Steps at which the loss scale decreased, within the trailing window.
    halvings: VecDeque<usize>,
    scale_collapsed: bool,
    steps: usize,
    spikes: Events,
    explosions: Events,
    non_finite: Events,
    non_finite_losses: usize,
    skipped: Events,
    collapses: Events,
    regressions: Events,
    /// Regressions during which the train loss was no worse than at the best eval.
    gap_regressions: usize,
    grad_all: QuantileSketch,
    /// Grad norms that were not explosions: the basis of the suggested clip value.
    grad_healthy: QuantileSketch,
    evals: Vec<EvalPoint>,
    best_eval: Option<EvalPoint>,
    /// Largest mIoU drop below the best at an eval whose train loss was no worse.
    #[serde(with = "lossless_f64::option")]
    max_gap: Option<f64>,
    /// The step-0 divergence tests; `None` in a monitor serialized before they existed (the
    /// anchor is then rebuilt from `first_losses`).
    #[serde(default)]
    watch: Option<DivergenceWatch>,
    #[serde(default)]
    divergences: Events,
    /// The first [`EventSteps::LISTED`] divergence alarms.
    #[serde(default)]
    divergence_events: Vec<DivergenceEvent>,
}

impl StabilityMonitor {
    /// A fresh monitor.
    pub fn new(cfg: MonitorConfig) -> Self {
        Self {
            cfg,
            losses: VecDeque::new(),
            grads: VecDeque::new(),
            first_losses: Vec::new(),
            recent_nonfinite: VecDeque::new(),
            last_scale: None,
            min_scale: None,
            halvings: VecDeque::new(),
            scale_collapsed: false,
            steps: 0,
            spikes: Events::default(),
            explosions: Events::default(),
            non_finite: Events::default(),
            non_finite_losses: 0,
            skipped: Events::default(),
            collapses: Events::default(),
            regressions: Events::default(),
            gap_regressions: 0,
            grad_all: QuantileSketch::default(),
            grad_healthy: QuantileSketch::default(),
            evals: Vec::new(),
            best_eval: None,
            max_gap: None,
            watch: Some(DivergenceWatch::default()),
            divergences: Events::default(),
            divergence_events: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MonitorConfig {
        &self.cfg
    }

    fn window(&self) -> usize {
        self.cfg.window.max(1)
    }

    fn min_history(&self) -> usize {
        self.cfg.min_history.max(1)
    }

    /// The robust initial loss: the median of the anchor (the first `anchor_len` positive
    /// finite losses that were not anchor spikes).
    pub fn anchor_loss(&self) -> Option<f64> {
        match &self.watch {
            Some(w) => w.anchor_loss(),
            None => DivergenceWatch::from_first_losses(&self.cfg, &self.first_losses).anchor_loss(),
        }
    }

    /// The median of the trailing finite losses.
    pub fn trailing_loss(&self) -> Option<f64> {
        median(self.losses.iter().copied())
    }

    /// The divergence watch, rebuilt from the first losses when deserialized from an older
    /// monitor.
    fn watch(&mut self) -> &mut DivergenceWatch {
        let (cfg, first) = (&self.cfg, &self.first_losses);
        self.watch
            .get_or_insert_with(|| DivergenceWatch::from_first_losses(cfg, first))
    }

    /// Counts a divergence and returns its alarm.
    fn diverge(&mut self, step: usize, cause: DivergenceCause) -> Alarm {
        self.divergences.add(step);
        if self.divergence_events.len() < EventSteps::LISTED {
            self.divergence_events.push(DivergenceEvent {
                step,
                cause: cause.clone(),
            });
        }
        Alarm::Divergence { step, cause }
    }

    /// Reports whether the weights were all finite at `step` (a cheap check the caller runs
    /// every few steps, e.g. the sum of every parameter); returns an
    /// [`Alarm::Divergence`] with [`DivergenceCause::NonFiniteWeights`] when they were not.
    ///
    /// ```
    /// use keel_train::{Alarm, DivergenceCause, MonitorConfig, StabilityMonitor};
    /// let mut mon = StabilityMonitor::new(MonitorConfig::default());
    /// assert!(mon.record_weights_finite(100, true).is_empty());
    /// let alarms = mon.record_weights_finite(200, false);
    /// assert!(matches!(alarms[..],
    ///     [Alarm::Divergence { step: 200, cause: DivergenceCause::NonFiniteWeights }]));
    /// ```
    pub fn record_weights_finite(&mut self, step: usize, finite: bool) -> Vec<Alarm> {
        if finite {
            Vec::new()
        } else {
            vec![self.diverge(step, DivergenceCause::NonFiniteWeights)]
        }
    }

    /// After a rollback of the run to an earlier state whose monitor was `snapshot`: takes
    /// its baseline statistics (the trailing loss and grad windows, the first losses, the
    /// divergence watch and its anchor, the loss-scale state), so the restored weights are
    /// judged against the baseline they had, and keeps this monitor's history (steps, every
    /// event count and step, divergences, evals, grad quantiles), so the report still shows
    /// the spikes and divergences that caused the rollback.
    ///
    /// ```
    /// use keel_train::{MonitorConfig, StabilityMonitor, StepRecord};
    /// let rec = |step, loss| StepRecord { step, loss, grad_norm: Some(1.0), loss_scale: None, skipped: false };
    /// let mut mon = StabilityMonitor::new(MonitorConfig::default());
    /// for step in 0..30 { mon.record_step(&rec(step, 1.0)); }
    /// let snapshot = mon.clone();
    /// for step in 30..40 { mon.record_step(&rec(step, 1e6 * step as f64)); }
    /// assert!(mon.diverging());
    /// mon.rolled_back_to(&snapshot);
    /// assert!(!mon.diverging(), "the baseline is the snapshot's");
    /// let s = mon.summary();
    /// assert_eq!(s.stats.steps, 40);
    /// assert!(s.stats.divergences > 0 && s.stats.loss_spikes > 0, "{:?}", s.stats);
    /// ```
    pub fn rolled_back_to(&mut self, snapshot: &StabilityMonitor) {
        self.losses = snapshot.losses.clone();
        self.grads = snapshot.grads.clone();
        self.first_losses = snapshot.first_losses.clone();
        self.recent_nonfinite = snapshot.recent_nonfinite.clone();
        self.last_scale = snapshot.last_scale;
        self.halvings = snapshot.halvings.clone();
        self.scale_collapsed = snapshot.scale_collapsed;
        self.watch = snapshot.watch.clone();
    }

    /// Whether a loss or grad-norm divergence test held at the last step.
    pub fn diverging(&self) -> bool {
        self.watch.as_ref().is_some_and(DivergenceWatch::active)
    }

    /// Feeds one step; returns the alarms it raised (empty for a healthy step).
    pub fn record_step(&mut self, r: &StepRecord) -> Vec<Alarm> {
        let mut alarms = Vec::new();
        let window = self.window();
        self.steps += 1;
        let loss_finite = r.loss.is_finite();
        let grad_finite = r.grad_norm.is_none_or(f64::is_finite);
        let scaler_overflow = r.skipped && r.loss_scale.is_some();
        if !loss_finite || (!grad_finite && !scaler_overflow) {
            self.non_finite.add(r.step);
            if !loss_finite {
                self.non_finite_losses += 1;
            }
            alarms.push(Alarm::NonFinite {
                step: r.step,
                loss: r.loss,
                grad_norm: r.grad_norm,
            });
        }
        if r.skipped {
            self.skipped.add(r.step);
            alarms.push(Alarm::SkippedStep {
                step: r.step,
                loss_scale: r.loss_scale,
            });
        }
        if loss_finite {
            self.judge_loss(r, &mut alarms);
        }
        push_bounded(&mut self.recent_nonfinite, !loss_finite, window);
        if let Some(g) = r.grad_norm.filter(|g| g.is_finite()) {
            self.judge_grad(r.step, g, &mut alarms);
            let cfg = self.cfg.clone();
            if let Some(cause) = self.watch().judge_grad(&cfg, r.step, g) {
                alarms.push(self.diverge(r.step, cause));
            }
        }
        if let Some(s) = r.loss_scale {
            self.judge_scale(r.step, s, &mut alarms);
        }
        alarms
    }

    /// The spike tests of a finite loss (trailing window, then anchor), the divergence test,
    /// then its entry into the windows.
    fn judge_loss(&mut self, r: &StepRecord, alarms: &mut Vec<Alarm>) {
        let window = self.window();
        let trailing_spike = self.trailing_spike(r, alarms);
        let cfg = self.cfg.clone();
        let anchor = self.watch().anchor_spike(&cfg, r.loss);
        if let (false, Some(a)) = (trailing_spike, &anchor) {
            self.spikes.add(r.step);
            alarms.push(Alarm::LossSpike {
                step: r.step,
                loss: r.loss,
                median: a.median,
                mad: a.sigma,
                log_scale: true,
            });
        }
        self.watch().admit(&cfg, r.loss, anchor.is_some());
        if let Some(cause) = self.watch().judge_loss(&cfg, r.loss) {
            alarms.push(self.diverge(r.step, cause));
        }
        push_bounded(&mut self.losses, r.loss, window);
        if self.first_losses.len() < window {
            self.first_losses.push(r.loss);
        }
    }

    /// The spike test of a finite loss against the trailing window (once it holds
    /// `min_history` values); whether it raised an alarm.
    fn trailing_spike(&mut self, r: &StepRecord, alarms: &mut Vec<Alarm>) -> bool {
        if self.losses.len() >= self.min_history() {
            let window: Vec<f64> = self.losses.iter().copied().collect();
            let log_scale = r.loss > 0.0 && window.iter().all(|&l| l > 0.0);
            let (x, window) = if log_scale {
                (r.loss.ln(), window.iter().map(|l| l.ln()).collect())
            } else {
                (r.loss, window)
            };
            if let Some((med, mad)) = median_mad(&window) {
                let floor = if log_scale {
                    self.cfg.mad_floor_rel.ln_1p()
                } else {
                    (self.cfg.mad_floor_rel * med.abs()).max(self.cfg.mad_floor_abs)
                };
                let sigma = (1.4826 * mad).max(floor);
                if x > med + self.cfg.spike_k * sigma {
                    self.spikes.add(r.step);
                    alarms.push(Alarm::LossSpike {
                        step: r.step,
                        loss: r.loss,
                        median: if log_scale { med.exp() } else { med },
                        mad: sigma,
                        log_scale,
                    });
                    return true;
                }
            }
        }
        false
    }

    /// The explosion test of a finite grad norm, then its entry into the window and sketches.
    fn judge_grad(&mut self, step: usize, g: f64, alarms: &mut Vec<Alarm>) {
        let window = self.window();
        let mut healthy = true;
        if self.grads.len() >= self.min_history() {
            if let Some(med) = median(self.grads.iter().copied()) {
                if med > 0.0 && g > self.cfg.grad_explosion_factor * med {
                    healthy = false;
                    self.explosions.add(step);
                    alarms.push(Alarm::GradExplosion {
                        step,
                        grad_norm: g,
                        median: med,
                    });
                }
            }
        }
        if healthy {
            self.grad_healthy.add(g);
        }
        self.grad_all.add(g);
        push_bounded(&mut self.grads, g, window);
    }

    /// The collapse test of a loss scale: a halving count over the window, a floor, NaN.
    fn judge_scale(&mut self, step: usize, s: f64, alarms: &mut Vec<Alarm>) {
        let window = self.window();
        if self.last_scale.is_some_and(|prev| s < prev) {
            self.halvings.push_back(step);
        }
        while self
            .halvings
            .front()
            .is_some_and(|&h| h.saturating_add(window) <= step)
        {
            self.halvings.pop_front();
        }
        if s.is_finite() {
            self.min_scale = Some(self.min_scale.map_or(s, |m| m.min(s)));
        }
        let collapsed = s.is_nan()
            || s < self.cfg.min_loss_scale
            || self.halvings.len() >= self.cfg.max_scale_halvings.max(1);
        if collapsed && !self.scale_collapsed {
            self.collapses.add(step);
            alarms.push(Alarm::LossScaleCollapse {
                step,
                scale: s,
                halvings_in_window: self.halvings.len(),
            });
        }
        self.scale_collapsed = collapsed;
        self.last_scale = Some(s);
    }

    /// Feeds one evaluation; returns the alarms it raised. A non-finite mIoU is remembered
    /// but never becomes the best.
    pub fn record_eval(&mut self, r: &EvalRecord) -> Vec<Alarm> {
        let mut alarms = Vec::new();
        let train_loss = r
            .train_loss
            .filter(|l| l.is_finite())
            .or_else(|| self.trailing_loss());
        let point = EvalPoint {
            step: r.step,
            miou: r.miou,
            train_loss,
        };
        if let Some(best) = &self.best_eval {
            let improved = matches!((train_loss, best.train_loss), (Some(t), Some(b)) if t <= b);
            if improved && r.miou.is_finite() && r.miou < best.miou {
                let gap = best.miou - r.miou;
                self.max_gap = Some(self.max_gap.map_or(gap, |g| g.max(gap)));
            }
            if r.miou.is_nan() || r.miou < best.miou - self.cfg.eval_regression_margin {
                self.regressions.add(r.step);
                if improved {
                    self.gap_regressions += 1;
                }
                alarms.push(Alarm::EvalRegression {
                    step: r.step,
                    miou: r.miou,
                    best_miou: best.miou,
                    best_step: best.step,
                    train_loss_improved: improved,
                });
            }
        }
        if r.miou.is_finite() && self.best_eval.as_ref().is_none_or(|b| r.miou > b.miou) {
            self.best_eval = Some(point.clone());
        }
        self.evals.push(point);
        alarms
    }

    /// What the monitor has seen so far, as plain data (the input of a [`HealthReport`]).
    pub fn summary(&self) -> MonitorSummary {
        let stats = ReportStats {
            steps: self.steps,
            evals: self.evals.len(),
            loss_spikes: self.spikes.count,
            grad_explosions: self.explosions.count,
            non_finite: self.non_finite.count,
            non_finite_losses: self.non_finite_losses,
            skipped_steps: self.skipped.count,
            scale_collapses: self.collapses.count,
            eval_regressions: self.regressions.count,
            grad_norm_p50: self.grad_all.quantile(0.5),
            grad_norm_p99: self.grad_all.quantile(0.99),
            grad_norm_max: self.grad_all.max(),
            healthy_grad_norm_p99: self.grad_healthy.quantile(0.99),
            min_loss_scale: self.min_scale,
            final_loss: self.trailing_loss(),
            final_miou: self.evals.last().map(|e| e.miou),
            best_miou: self.best_eval.as_ref().map(|e| e.miou),
            best_miou_step: self.best_eval.as_ref().map(|e| e.step),
            train_eval_gap: self.max_gap,
            divergences: self.divergences.count,
        };
        let events = EventSteps {
            loss_spikes: self.spikes.steps.clone(),
            grad_explosions: self.explosions.steps.clone(),
            non_finite: self.non_finite.steps.clone(),
            skipped_steps: self.skipped.steps.clone(),
            scale_collapses: self.collapses.steps.clone(),
            eval_regressions: self.regressions.steps.clone(),
        };
        MonitorSummary {
            config: self.cfg.clone(),
            stats,
            events,
            gap_regressions: self.gap_regressions,
            recent_steps: self.recent_nonfinite.len(),
            recent_non_finite_losses: self.recent_nonfinite.iter().filter(|&&b| b).count(),
            initial_loss: median(self.first_losses.iter().copied()),
            initial_losses: self.first_losses.len(),
            scale_collapsed_at_end: self.scale_collapsed,
            divergence_events: self.divergence_events.clone(),
            diverging_at_end: self.diverging(),
            anchor_loss: self.anchor_loss(),
        }
    }

    /// The health report of the run so far, with advice for its configuration:
    /// [`HealthReport::from_summary`] of [`StabilityMonitor::summary`].
    pub fn report(&self, ctx: &RunContext) -> HealthReport {
        HealthReport::from_summary(&self.summary(), ctx)
    }
}

fn push_bounded<T>(q: &mut VecDeque<T>, v: T, cap: usize) {
    q.push_back(v);
    while q.len() > cap {
        q.pop_front();
    }
}
