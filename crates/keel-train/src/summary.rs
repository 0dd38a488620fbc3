//! What a [`crate::StabilityMonitor`] has seen, as plain data: the counts and statistics a
//! report prints ([`ReportStats`]) plus the facts the verdict and the advice are judged from
//! ([`MonitorSummary`]). The monitor writes it, the health report reads it; neither module
//! knows the other's internals (monitor -> summary <- report).
use serde::{Deserialize, Serialize};

use crate::config::{GuardPolicy, MonitorConfig};
use crate::divergence::{DivergenceCause, DivergenceEvent};
use crate::stats::lossless_f64;

/// The numbers behind a [`crate::HealthReport`]. Quantiles of the grad norm are within about
/// 1%. Every `f64` survives a JSON round trip, NaN and infinities included.
///
/// ```
/// use keel_train::{MonitorConfig, StabilityMonitor};
/// let mon = StabilityMonitor::new(MonitorConfig::default());
/// let stats = mon.summary().stats;
/// assert_eq!((stats.steps, stats.loss_spikes, stats.grad_norm_p99), (0, 0, None));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportStats {
    /// Steps recorded.
    pub steps: usize,
    /// Evals recorded.
    pub evals: usize,
    /// Loss spikes.
    pub loss_spikes: usize,
    /// Gradient-norm explosions.
    pub grad_explosions: usize,
    /// Steps with a non-finite loss or an unexpected non-finite grad norm.
    pub non_finite: usize,
    /// Steps with a non-finite loss.
    pub non_finite_losses: usize,
    /// Skipped optimizer steps.
    pub skipped_steps: usize,
    /// Loss-scale collapse episodes.
    pub scale_collapses: usize,
    /// Eval regressions.
    pub eval_regressions: usize,
    /// Median gradient norm.
    #[serde(with = "lossless_f64::option")]
    pub grad_norm_p50: Option<f64>,
    /// 99th-percentile gradient norm.
    #[serde(with = "lossless_f64::option")]
    pub grad_norm_p99: Option<f64>,
    /// Largest gradient norm.
    #[serde(with = "lossless_f64::option")]
    pub grad_norm_max: Option<f64>,
    /// 99th percentile of the grad norms that were not explosions: the suggested clip value.
    #[serde(with = "lossless_f64::option")]
    pub healthy_grad_norm_p99: Option<f64>,
    /// Smallest loss scale seen.
    #[serde(with = "lossless_f64::option")]
    pub min_loss_scale: Option<f64>,
    /// Median of the trailing loss window at the end.
    #[serde(with = "lossless_f64::option")]
    pub final_loss: Option<f64>,
    /// mIoU of the last eval.
    #[serde(with = "lossless_f64::option")]
    pub final_miou: Option<f64>,
    /// Best mIoU.
    #[serde(with = "lossless_f64::option")]
    pub best_miou: Option<f64>,
    /// Step of the best mIoU.
    pub best_miou_step: Option<usize>,
    /// Train-vs-eval gap: the largest mIoU drop below the best so far at an eval whose train
    /// loss was no worse than at the best eval (the model kept fitting, eval did not follow).
    /// `None` when no eval fell below the best while the train loss held.
    #[serde(with = "lossless_f64::option")]
    pub train_eval_gap: Option<f64>,
    /// Divergence alarms (loss far above its start or a uniform prediction, geometric
    /// grad-norm growth, non-finite weights).
    #[serde(default)]
    pub divergences: usize,
}

/// The first steps (up to [`EventSteps::LISTED`]) of each event kind; the counts are in
/// [`ReportStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventSteps {
    /// Steps of the first loss spikes.
    pub loss_spikes: Vec<usize>,
    /// Steps of the first gradient-norm explosions.
    pub grad_explosions: Vec<usize>,
    /// Steps of the first non-finite losses or grad norms.
    pub non_finite: Vec<usize>,
    /// Steps of the first skipped optimizer steps.
    pub skipped_steps: Vec<usize>,
    /// Steps at which the first loss-scale collapse episodes began.
    pub scale_collapses: Vec<usize>,
    /// Steps of the first eval regressions.
    pub eval_regressions: Vec<usize>,
}

impl EventSteps {
    /// How many steps of each event kind the monitor remembers.
    pub const LISTED: usize = 16;
}

/// Everything a [`crate::HealthReport`] is built from: the monitor's thresholds, its counts
/// and statistics, and the facts about the start and the end of the run that the verdict
/// needs. Plain data: serialize it, compare it, or judge it with
/// [`crate::HealthReport::from_summary`].
///
/// ```
/// use keel_train::{MonitorConfig, StabilityMonitor, StepRecord};
/// let mut mon = StabilityMonitor::new(MonitorConfig::default());
/// for step in 0..30 {
///     let loss = if step == 25 { f64::NAN } else { 1.0 };
///     mon.record_step(&StepRecord { step, loss, grad_norm: Some(1.0), loss_scale: None, skipped: false });
/// }
/// let s = mon.summary();
/// assert_eq!((s.stats.steps, s.stats.non_finite_losses), (30, 1));
/// assert_eq!(s.events.non_finite, vec![25]);
/// assert_eq!((s.recent_steps, s.recent_non_finite_losses), (30, 1));
/// assert_eq!(s.initial_loss, Some(1.0));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MonitorSummary {
    /// The thresholds the run was watched with (and is judged by).
    pub config: MonitorConfig,
    /// The counts and statistics.
    pub stats: ReportStats,
    /// The first steps of each event kind.
    pub events: EventSteps,
    /// Eval regressions during which the train loss was no worse than at the best eval.
    pub gap_regressions: usize,
    /// Steps in the trailing window (at most `config.window`).
    pub recent_steps: usize,
    /// Steps in the trailing window with a non-finite loss.
    pub recent_non_finite_losses: usize,
    /// Median of the first `config.window` finite losses: the baseline for divergence.
    #[serde(with = "lossless_f64::option")]
    pub initial_loss: Option<f64>,
    /// How many finite losses `initial_loss` is the median of.
    pub initial_losses: usize,
    /// Whether the loss scale was still collapsed at the last step.
    pub scale_collapsed_at_end: bool,
    /// The first [`EventSteps::LISTED`] divergence alarms, with their causes.
    #[serde(default)]
    pub divergence_events: Vec<DivergenceEvent>,
    /// Whether a loss or grad-norm divergence test still held at the last step.
    #[serde(default)]
    pub diverging_at_end: bool,
    /// The robust initial loss of the divergence tests: the median of the anchor (the first
    /// `config.anchor_len` positive losses that were not anchor spikes).
    #[serde(default, with = "lossless_f64::option")]
    pub anchor_loss: Option<f64>,
}

impl MonitorSummary {
    /// The fraction of the recorded steps that were skipped (0 when none were recorded).
    pub fn skip_fraction(&self) -> f64 {
        if self.stats.steps > 0 {
            self.stats.skipped_steps as f64 / self.stats.steps as f64
        } else {
            0.0
        }
    }
}

/// Why a [`crate::Guard`] intervened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum InterventionCause {
    /// The monitor raised [`crate::Alarm::Divergence`] (non-finite weights included).
    Divergence(DivergenceCause),
    /// This many non-finite losses in a row (the guard's `nonfinite_patience`).
    NonFiniteLosses(usize),
}

impl std::fmt::Display for InterventionCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InterventionCause::Divergence(c) => write!(f, "divergence: {c}"),
            InterventionCause::NonFiniteLosses(n) => write!(f, "{n} non-finite losses in a row"),
        }
    }
}

/// What a [`crate::Guard`] did about a divergence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterventionKind {
    /// Restored the snapshot, lowered the LR, and the run continued.
    RolledBack,
    /// Restored the snapshot and stopped the run: the interventions were used up.
    Stopped,
}

/// One intervention of a [`crate::Guard`]: a JSONL-ready record.
///
/// ```
/// use keel_train::{DivergenceCause, Intervention, InterventionCause, InterventionKind};
/// let i = Intervention { step: 57, cause: InterventionCause::Divergence(DivergenceCause::NonFiniteWeights),
///     action: InterventionKind::RolledBack, restored_step: 40, skipped_batches: 18,
///     lr_before: 0.5, lr_after: 0.05 };
/// assert_eq!(i.to_string(), "step 57: divergence: non-finite (NaN/Inf) weights; rolled back to \
///     step 40, skipped 18 batches, LR 0.5 -> 0.05");
/// let json = serde_json::to_string(&i).unwrap();
/// assert_eq!(serde_json::from_str::<Intervention>(&json).unwrap(), i);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Intervention {
    /// The step whose alarm triggered it.
    pub step: usize,
    /// Why.
    pub cause: InterventionCause,
    /// What the guard did.
    pub action: InterventionKind,
    /// The step of the snapshot restored (the weights are those before that step).
    pub restored_step: usize,
    /// Batches whose updates were discarded and not replayed: `step + 1 - restored_step`.
    /// The step counter (and the data position) continues at `step + 1`.
    pub skipped_batches: usize,
    /// The learning rate of the alarm step.
    #[serde(with = "lossless_f64")]
    pub lr_before: f64,
    /// That learning rate after the intervention (unchanged when the run stopped).
    #[serde(with = "lossless_f64")]
    pub lr_after: f64,
}

impl std::fmt::Display for Intervention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step {}: {}; ", self.step, self.cause)?;
        match self.action {
            InterventionKind::RolledBack => write!(
                f,
                "rolled back to step {}, skipped {} batches, LR {} -> {}",
                self.restored_step, self.skipped_batches, self.lr_before, self.lr_after
            ),
            InterventionKind::Stopped => write!(
                f,
                "restored step {} and stopped the run (LR {})",
                self.restored_step, self.lr_before
            ),
        }
    }
}

/// What a [`crate::Guard`] did over a run, for [`crate::HealthReport::with_guard`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuardSummary {
    /// The policy.
    pub policy: GuardPolicy,
    /// Every intervention, in order.
    pub interventions: Vec<Intervention>,
    /// Whether the guard stopped the run.
    pub stopped: bool,
    /// The factor the learning rate is multiplied by now (1 before any intervention).
    #[serde(with = "lossless_f64")]
    pub lr_scale: f64,
}

impl GuardSummary {
    /// Whether the guard intervened and the run then went on to its end.
    pub fn recovered(&self) -> bool {
        !self.interventions.is_empty() && !self.stopped
    }
}
