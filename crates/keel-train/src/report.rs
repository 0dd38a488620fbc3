//! The end-of-run health report: a verdict, the numbers behind it, and [`Advice`] from keel's
//! decision table ([`keel_norm::recommend`]: GroupNorm / Weight Standardization for batch 1-2
//! from scratch, FrozenBatchNorm for a pretrained backbone, BatchNorm from batch 16). Built
//! from a [`MonitorSummary`], so it reads data, not the monitor.
use std::fmt::Write as _;

use keel_norm::{NormKind, BN_MIN_BATCH};
use keel_optim::Precision;
use serde::{Deserialize, Serialize};

use crate::advice::{Advice, Bf16Cause, LrCause};
use crate::config::GuardPolicy;
use crate::stats::lossless_f64;
use crate::summary::{GuardSummary, MonitorSummary, ReportStats};

/// The run's configuration, as far as the advice needs it.
///
/// ```
/// use keel_norm::NormKind;
/// use keel_optim::Precision;
/// use keel_train::RunContext;
/// let ctx = RunContext { norm: NormKind::GroupNorm { groups: None }, batch_size: 2,
///                        pretrained: false, lr: 0.01, clip_grad: Some(1.0),
///                        precision: Precision::Bf16, steps: 1000, backbone_norm: None };
/// let json = serde_json::to_string(&ctx).unwrap();
/// assert!(json.contains(r#""norm":"gn""#) && json.contains(r#""precision":"bf16""#));
/// assert_eq!(serde_json::from_str::<RunContext>(&json).unwrap(), ctx);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunContext {
    /// The normalization the model uses (its head's, when it has a separate
    /// [`RunContext::backbone_norm`]).
    pub norm: NormKind,
    /// Images per optimizer step per device.
    pub batch_size: usize,
    /// Whether training started from pretrained weights (the backbone's, when the model has
    /// a separate backbone).
    pub pretrained: bool,
    /// The peak learning rate.
    #[serde(with = "lossless_f64")]
    pub lr: f64,
    /// The global-norm clipping threshold, if any.
    #[serde(with = "lossless_f64::option")]
    pub clip_grad: Option<f64>,
    /// The numeric precision of the forward and backward passes.
    pub precision: Precision,
    /// The planned number of steps.
    pub steps: usize,
    /// The norm of a separate backbone (a backbone + new head model, e.g. a pretrained ResNet
    /// under a decoder), `None` when one norm covers the model. With a backbone, the norm
    /// advice follows [`keel_norm::recommend_plan`]: the head is judged as trained from
    /// scratch, the backbone by `pretrained` ([`Advice::SwitchBackboneNorm`]). Reports saved
    /// before this field existed read as `None`.
    #[serde(default)]
    pub backbone_norm: Option<NormKind>,
}

/// The overall judgement, from best to worst.
///
/// ```
/// use keel_train::Verdict;
/// assert!(Verdict::Healthy < Verdict::Diverged);
/// assert_eq!(Verdict::Unstable.to_string(), "UNSTABLE");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Verdict {
    /// No event worth acting on.
    Healthy,
    /// Isolated events: worth a look, the run is usable.
    Warning,
    /// Repeated spikes, explosions, non-finite losses or eval regressions, or a loss scale
    /// still collapsed at the end.
    Unstable,
    /// Non-finite losses dominate the end of the run, the loss ended far above its start, or
    /// the monitor raised an [`crate::Alarm::Divergence`].
    Diverged,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Healthy => "HEALTHY",
            Verdict::Warning => "WARNING",
            Verdict::Unstable => "UNSTABLE",
            Verdict::Diverged => "DIVERGED",
        })
    }
}

/// The verdict, the numbers, what was found and what to do.
///
/// ```
/// use keel_norm::NormKind;
/// use keel_optim::Precision;
/// use keel_train::{Advice, MonitorConfig, RunContext, StabilityMonitor, StepRecord, Verdict};
/// let mut mon = StabilityMonitor::new(MonitorConfig::default());
/// for step in 0..100 {
///     mon.record_step(&StepRecord { step, loss: f64::NAN, grad_norm: None, loss_scale: None, skipped: false });
/// }
/// let ctx = RunContext { norm: NormKind::GroupNorm { groups: None }, batch_size: 4,
///                        pretrained: false, lr: 0.1, clip_grad: None,
///                        precision: Precision::F32, steps: 100, backbone_norm: None };
/// let report = mon.report(&ctx);
/// assert_eq!(report.verdict, Verdict::Diverged);
/// assert!(report.advice.iter().any(|a| matches!(a, Advice::GuardAgainstNan { .. })));
/// assert!(report.to_text().starts_with("Training health: DIVERGED"));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    /// The overall judgement.
    pub verdict: Verdict,
    /// The counts and statistics.
    pub summary: ReportStats,
    /// What the monitor observed, one sentence each.
    pub findings: Vec<String>,
    /// What to change; empty when no action is needed.
    pub advice: Vec<Advice>,
    /// The run configuration the advice refers to.
    pub context: RunContext,
    /// What the [`crate::Guard`] did, when the run had one ([`HealthReport::with_guard`]).
    #[serde(default)]
    pub guard: Option<GuardSummary>,
    /// The run's end is diverged (non-finite trailing losses, or a loss blown up far above
    /// its start), as opposed to a divergence alarm that a guard rollback answered.
    #[serde(default)]
    pub diverged_at_end: bool,
}

/// What the report concludes from a summary before it writes anything down.
struct Judgement {
    /// At least `diverged_nonfinite_fraction` of the trailing steps had a non-finite loss.
    nonfinite_end: bool,
    /// The trailing median loss is above `diverge_factor` times the initial median.
    blown_up: bool,
    /// The first divergence alarm, when the monitor raised one.
    alarmed: Option<usize>,
    /// The event count that makes a run Unstable: `unstable_events`, raised to
    /// `unstable_rate` of the steps (isolated events in a long run are a Warning).
    unstable_count: usize,
    /// The skipped-step fraction exceeds `max_skip_fraction`.
    excess_skips: bool,
    /// The train-vs-eval gap, when above the regression margin.
    gap: Option<f64>,
    /// The run clipped at most 1.5x the healthy p99: the explosions were bounded.
    clip_bounds_explosions: bool,
    /// The healthy grad-norm p99 (or the p50): the basis of a clip suggestion.
    healthy_p99: Option<f64>,
    /// BatchNorm (the model's, the head's or the backbone's) below [`BN_MIN_BATCH`] images
    /// per device.
    small_batch_bn: bool,
}

impl Judgement {
    fn new(m: &MonitorSummary, ctx: &RunContext) -> Self {
        let (cfg, s) = (&m.config, &m.stats);
        let recent = m.recent_steps;
        let recent_bad = m.recent_non_finite_losses;
        let nonfinite_end =
            recent_bad > 0 && recent_bad as f64 >= cfg.diverged_nonfinite_fraction * recent as f64;
        let blown_up = match (m.initial_loss, s.final_loss) {
            (Some(a), Some(b)) if m.initial_losses >= cfg.min_history.max(1) => {
                a > 0.0 && b > cfg.diverge_factor * a
            }
            _ => false,
        };
        let unstable_count = cfg
            .unstable_events
            .max(1)
            .max((cfg.unstable_rate * s.steps as f64).ceil() as usize);
        let healthy_p99 = s.healthy_grad_norm_p99.or(s.grad_norm_p50);
        // Explosions that a clip at most 1.5x the healthy p99 bounded are what clipping is
        // for: they make a Warning, not an Unstable run.
        let clip_bounds_explosions = ctx
            .clip_grad
            .is_some_and(|c| healthy_p99.is_some_and(|p| c <= 1.5 * p));
        Self {
            nonfinite_end,
            blown_up,
            alarmed: m.divergence_events.first().map(|e| e.step),
            unstable_count,
            excess_skips: m.skip_fraction() > cfg.max_skip_fraction,
            gap: s.train_eval_gap.filter(|&g| g > cfg.eval_regression_margin),
            clip_bounds_explosions,
            healthy_p99,
            small_batch_bn: (ctx.norm == NormKind::BatchNorm
                || ctx.backbone_norm == Some(NormKind::BatchNorm))
                && ctx.batch_size < BN_MIN_BATCH,
        }
    }

    fn diverged(&self) -> bool {
        self.nonfinite_end || self.blown_up || self.alarmed.is_some()
    }

    fn verdict(&self, m: &MonitorSummary) -> Verdict {
        let (cfg, s, n) = (&m.config, &m.stats, self.unstable_count);
        if self.diverged() {
            Verdict::Diverged
        } else if s.loss_spikes >= n
            || (s.grad_explosions >= n && !self.clip_bounds_explosions)
            || s.non_finite_losses >= n
            || s.eval_regressions >= cfg.unstable_regressions.max(1)
            || m.scale_collapsed_at_end
        {
            Verdict::Unstable
        } else if s.loss_spikes
            + s.grad_explosions
            + s.non_finite
            + s.scale_collapses
            + s.eval_regressions
            > 0
            || self.excess_skips
            || self.gap.is_some()
            // BatchNorm below its minimum batch: its batch statistics are noise and its
            // running statistics (used at eval) follow them, so even a run without events is
            // a risk the user can act on (the SwitchNorm advice).
            || self.small_batch_bn
        {
            Verdict::Warning
        } else {
            Verdict::Healthy
        }
    }
}

impl HealthReport {
    /// Judges a monitor's summary for a run configured as `ctx`: the verdict, the findings
    /// and the advice.
    ///
    /// ```
    /// use keel_norm::NormKind;
    /// use keel_optim::Precision;
    /// use keel_train::{HealthReport, MonitorConfig, RunContext, StabilityMonitor, Verdict};
    /// let summary = StabilityMonitor::new(MonitorConfig::default()).summary();
    /// let ctx = RunContext { norm: NormKind::BatchNorm, batch_size: 64, pretrained: false,
    ///                        lr: 0.1, clip_grad: None, precision: Precision::F32, steps: 0,
    ///                        backbone_norm: None };
    /// let report = HealthReport::from_summary(&summary, &ctx);
    /// assert_eq!(report.verdict, Verdict::Healthy);
    /// assert!(report.advice.is_empty());
    /// assert_eq!(report.recommendations(), vec!["no action needed".to_string()]);
    /// ```
    pub fn from_summary(summary: &MonitorSummary, ctx: &RunContext) -> Self {
        let j = Judgement::new(summary, ctx);
        let verdict = j.verdict(summary);
        let mut findings = divergence_findings(summary, &j);
        findings.extend(event_findings(summary, &j, ctx));
        findings.extend(eval_findings(summary, &j));
        let mut advice: Vec<Advice> = norm_advice(summary, &j, ctx, verdict).into_iter().collect();
        advice.extend(training_advice(summary, &j, ctx));
        HealthReport {
            verdict,
            summary: summary.stats.clone(),
            findings,
            advice,
            context: ctx.clone(),
            guard: None,
            diverged_at_end: j.nonfinite_end || j.blown_up,
        }
    }

    /// The report with what a [`crate::Guard`] did: its interventions are listed, a run the
    /// guard stopped is Diverged (with advice to restart at a tenth of the last LR tried), a
    /// run it rolled back is at least a Warning (never Healthy) and a Warning rather than
    /// Diverged when the rollbacks answered its divergence alarms and its end is not diverged
    /// (it healed), and the findings say whether the run recovered.
    ///
    /// ```
    /// use keel_norm::NormKind;
    /// use keel_optim::Precision;
    /// use keel_train::*;
    /// let ctx = RunContext { norm: NormKind::GroupNorm { groups: None }, batch_size: 2,
    ///                        pretrained: false, lr: 0.1, clip_grad: None,
    ///                        precision: Precision::F32, steps: 100, backbone_norm: None };
    /// let healthy = StabilityMonitor::new(MonitorConfig::default()).report(&ctx);
    /// let rollback = Intervention { step: 57, cause: InterventionCause::NonFiniteLosses(3),
    ///     action: InterventionKind::RolledBack, restored_step: 40, skipped_batches: 18,
    ///     lr_before: 0.1, lr_after: 0.01 };
    /// let g = GuardSummary { policy: GuardPolicy::Rollback, interventions: vec![rollback],
    ///                        stopped: false, lr_scale: 0.1 };
    /// let report = healthy.clone().with_guard(&g);
    /// assert_eq!(report.verdict, Verdict::Warning);
    /// assert!(report.to_text().contains("step 57: 3 non-finite losses in a row; rolled back to step 40"));
    /// assert!(report.findings.iter().any(|f| f.contains("recovered")));
    /// let stopped = GuardSummary { stopped: true, ..g.clone() };
    /// assert_eq!(healthy.clone().with_guard(&stopped).verdict, Verdict::Diverged);
    /// // A divergence alarm answered by a rollback (the run's end is fine) is a Warning...
    /// let alarmed = HealthReport { verdict: Verdict::Diverged, ..healthy.clone() };
    /// assert_eq!(alarmed.clone().with_guard(&g).verdict, Verdict::Warning);
    /// // ...but not when the run's end is diverged, or when the guard only skipped steps.
    /// let ended = HealthReport { diverged_at_end: true, ..alarmed.clone() };
    /// assert_eq!(ended.with_guard(&g).verdict, Verdict::Diverged);
    /// let skip = GuardSummary { policy: GuardPolicy::Skip, ..g.clone() };
    /// assert_eq!(alarmed.with_guard(&skip).verdict, Verdict::Diverged);
    /// ```
    pub fn with_guard(mut self, g: &GuardSummary) -> Self {
        if let Some(last) = g.interventions.last() {
            let n = g.interventions.len();
            if g.stopped {
                self.verdict = Verdict::Diverged;
                self.findings.push(format!(
                    "the guard ({}) stopped the run at step {}: it diverged again after {} interventions (LR scaled by {}); the weights are those of step {}",
                    g.policy, last.step, n - 1, g.lr_scale, last.restored_step
                ));
                let restart = |a: &Advice| {
                    matches!(
                        a,
                        Advice::RestartWithLowerLr { .. } | Advice::RestartBeforeDivergence { .. }
                    )
                };
                if !self.advice.iter().any(restart) {
                    self.advice.push(Advice::RestartWithLowerLr {
                        to: round3(self.context.lr * g.lr_scale / 10.0),
                    });
                }
            } else {
                // Every divergence alarm of a rollback guard that did not stop was answered by
                // a rollback, so unless the end itself is diverged the run healed: a Warning
                // (the findings list the divergences and the interventions), not DIVERGED.
                let healed = g.policy == GuardPolicy::Rollback && !self.diverged_at_end;
                if healed && self.verdict == Verdict::Diverged {
                    self.verdict = Verdict::Warning;
                }
                self.verdict = self.verdict.max(Verdict::Warning);
                self.findings.push(if self.diverged_at_end {
                    format!(
                        "the guard ({}) intervened {n} times (the last at step {}) but the run's end is diverged; it ran on at {} x the scheduled LR",
                        g.policy, last.step, g.lr_scale
                    )
                } else {
                    format!(
                        "the guard ({}) intervened {n} times and the run recovered: no divergence after step {}; it ran on at {} x the scheduled LR",
                        g.policy, last.step, g.lr_scale
                    )
                });
            }
        }
        self.guard = Some(g.clone());
        self
    }

    /// The advice as sentences, or `["no action needed"]` when there is none.
    pub fn recommendations(&self) -> Vec<String> {
        if self.advice.is_empty() {
            vec!["no action needed".to_string()]
        } else {
            self.advice.iter().map(Advice::to_string).collect()
        }
    }

    /// A human-readable multi-line report.
    pub fn to_text(&self) -> String {
        let s = &self.summary;
        let c = &self.context;
        let mut t = String::new();
        let _ = writeln!(t, "Training health: {}", self.verdict);
        let _ = writeln!(
            t,
            "  run: norm {}{}, batch {}, lr {}, clip {}, precision {}, {} steps recorded, {} evals",
            c.norm,
            c.backbone_norm.map_or(String::new(), |b| format!(
                " (head), backbone {b}{}",
                if c.pretrained { " pretrained" } else { "" }
            )),
            c.batch_size,
            c.lr,
            c.clip_grad.map_or("off".to_string(), |c| c.to_string()),
            c.precision,
            s.steps,
            s.evals
        );
        let _ = writeln!(
            t,
            "  events: {} loss spikes, {} grad explosions, {} non-finite, {} skipped, {} loss-scale collapses, {} eval regressions",
            s.loss_spikes, s.grad_explosions, s.non_finite, s.skipped_steps, s.scale_collapses, s.eval_regressions
        );
        let _ = writeln!(
            t,
            "  grad norm: p50 {}, p99 {}, max {}; final loss {}",
            fmt_opt(s.grad_norm_p50),
            fmt_opt(s.grad_norm_p99),
            fmt_opt(s.grad_norm_max),
            fmt_opt(s.final_loss)
        );
        if s.evals > 0 {
            let _ = writeln!(
                t,
                "  mIoU: final {}, best {}{}; train-vs-eval gap {}",
                fmt_opt(s.final_miou),
                fmt_opt(s.best_miou),
                s.best_miou_step
                    .map_or(String::new(), |st| format!(" (step {st})")),
                fmt_opt(s.train_eval_gap)
            );
        }
        if let Some(g) = self.guard.as_ref().filter(|g| !g.interventions.is_empty()) {
            let _ = writeln!(t, "Guard ({}) interventions:", g.policy);
            for i in &g.interventions {
                let _ = writeln!(t, "  - {i}");
            }
        }
        if !self.findings.is_empty() {
            let _ = writeln!(t, "Findings:");
            for f in &self.findings {
                let _ = writeln!(t, "  - {f}");
            }
        }
        let _ = writeln!(t, "Recommendations:");
        for r in self.recommendations() {
            let _ = writeln!(t, "  - {r}");
        }
        t
    }
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or("-".to_string(), |v| format!("{v:.4}"))
}

fn steps_list(steps: &[usize], count: usize) -> String {
    let mut s = steps
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if count > steps.len() {
        let _ = write!(s, ", ... ({} more)", count - steps.len());
    }
    s
}

/// A suggested value, rounded to 3 significant digits.
fn round3(x: f64) -> f64 {
    format!("{x:.2e}").parse::<f64>().unwrap_or(x)
}

/// Findings about divergence: non-finite losses at the end, a blown-up loss.
fn divergence_findings(m: &MonitorSummary, j: &Judgement) -> Vec<String> {
    let mut findings = Vec::new();
    if j.nonfinite_end {
        findings.push(format!(
            "{} of the last {} steps had a non-finite loss: training diverged",
            m.recent_non_finite_losses, m.recent_steps
        ));
    }
    if let Some(first) = m.divergence_events.first() {
        let causes: Vec<String> = m
            .divergence_events
            .iter()
            .map(|e| format!("step {}: {}", e.step, e.cause))
            .collect();
        findings.push(format!(
            "training diverged from step {}: {} divergence alarm(s) ({}{}); {}",
            first.step,
            m.stats.divergences,
            causes.join("; "),
            if m.stats.divergences > causes.len() {
                format!("; ... ({} more)", m.stats.divergences - causes.len())
            } else {
                String::new()
            },
            if m.diverging_at_end {
                "still diverging at the last step"
            } else {
                "the loss and grad-norm tests no longer held at the last step"
            }
        ));
    }
    if j.blown_up {
        findings.push(format!(
            "the trailing median loss ({}) is more than {}x the initial median ({}): training \
             diverged",
            fmt_opt(m.stats.final_loss),
            m.config.diverge_factor,
            fmt_opt(m.initial_loss)
        ));
    }
    findings
}

/// Findings about step events: loss spikes, grad explosions, NaN/Inf, skipped steps and
/// loss-scale collapses.
fn event_findings(m: &MonitorSummary, j: &Judgement, ctx: &RunContext) -> Vec<String> {
    let (cfg, s, e) = (&m.config, &m.stats, &m.events);
    let mut findings = Vec::new();
    if s.loss_spikes > 0 {
        findings.push(format!(
            "{} loss spike(s) above median + {} x robust sigma, at steps {}",
            s.loss_spikes,
            cfg.spike_k,
            steps_list(&e.loss_spikes, s.loss_spikes)
        ));
    }
    if s.grad_explosions > 0 {
        findings.push(format!(
            "{} grad-norm explosion(s) above {}x the trailing median (max {}, p50 {}), at steps {}{}",
            s.grad_explosions,
            cfg.grad_explosion_factor,
            fmt_opt(s.grad_norm_max),
            fmt_opt(s.grad_norm_p50),
            steps_list(&e.grad_explosions, s.grad_explosions),
            match ctx.clip_grad {
                Some(c) if j.clip_bounds_explosions => {
                    format!("; clipping the global gradient norm at {c} bounded them")
                }
                _ => String::new(),
            }
        ));
    }
    if s.non_finite > 0 {
        findings.push(format!(
            "{} step(s) with NaN/Inf ({} non-finite losses), at steps {}",
            s.non_finite,
            s.non_finite_losses,
            steps_list(&e.non_finite, s.non_finite)
        ));
    }
    if s.skipped_steps > 0 {
        findings.push(format!(
            "{} skipped optimizer step(s) ({:.1}% of steps{}), at steps {}",
            s.skipped_steps,
            100.0 * m.skip_fraction(),
            if j.excess_skips {
                ", too many"
            } else {
                ", within normal GradScaler behaviour"
            },
            steps_list(&e.skipped_steps, s.skipped_steps)
        ));
    }
    if s.scale_collapses > 0 {
        findings.push(format!(
            "the loss scale collapsed {} time(s) (minimum {}{}), at steps {}",
            s.scale_collapses,
            fmt_opt(s.min_loss_scale),
            if m.scale_collapsed_at_end {
                ", still collapsed at the end"
            } else {
                ""
            },
            steps_list(&e.scale_collapses, s.scale_collapses)
        ));
    }
    findings
}

/// Findings about evals: regressions and the train-vs-eval gap.
fn eval_findings(m: &MonitorSummary, j: &Judgement) -> Vec<String> {
    let (cfg, s) = (&m.config, &m.stats);
    let mut findings = Vec::new();
    if j.small_batch_bn {
        findings.push(format!(
            "BatchNorm below {} images per device: its batch statistics are noise at this \
             batch size, and the running statistics the eval uses follow them (the train and \
             eval models disagree)",
            keel_norm::BN_MIN_BATCH
        ));
    }
    if s.eval_regressions > 0 {
        findings.push(format!(
            "eval mIoU fell more than {} below its best ({}) {} time(s), at steps {}{}",
            cfg.eval_regression_margin,
            fmt_opt(s.best_miou),
            s.eval_regressions,
            steps_list(&m.events.eval_regressions, s.eval_regressions),
            if m.gap_regressions > 0 {
                format!(
                    "; {} of them while the train loss kept improving",
                    m.gap_regressions
                )
            } else {
                String::new()
            }
        ));
    }
    if let Some(g) = j.gap {
        findings.push(format!(
            "train-vs-eval gap: eval mIoU dropped up to {g:.4} below its best while the train \
             loss was no worse than at the best eval (the model fits the training batches but \
             does not evaluate well)"
        ));
    }
    findings
}

/// The normalization advice: BatchNorm at a small batch always, another norm off keel's
/// decision table when the run was not healthy. A model with a separate backbone is judged
/// part by part ([`keel_norm::recommend_plan`]): the head as trained from scratch
/// ([`Advice::SwitchNorm`] with `pretrained: false`), the backbone by its starting point
/// ([`Advice::SwitchBackboneNorm`]).
fn norm_advice(
    m: &MonitorSummary,
    j: &Judgement,
    ctx: &RunContext,
    verdict: Verdict,
) -> Vec<Advice> {
    let small = ctx.batch_size < BN_MIN_BATCH;
    let mismatch = j.gap.is_some() || m.gap_regressions > 0;
    // Whether `used` needs changing to `pick`: BatchNorm at a small batch always, another
    // norm off the table when the run was not healthy.
    let needs = |used: NormKind, pick: NormKind| {
        let off_table = std::mem::discriminant(&used) != std::mem::discriminant(&pick);
        (small && used == NormKind::BatchNorm) || (verdict > Verdict::Healthy && off_table)
    };
    let Some(backbone) = ctx.backbone_norm else {
        let recommended = keel_norm::recommend(ctx.batch_size, ctx.pretrained);
        return needs(ctx.norm, recommended)
            .then_some(Advice::SwitchNorm {
                from: ctx.norm,
                to: recommended,
                batch_size: ctx.batch_size,
                pretrained: ctx.pretrained,
                train_eval_mismatch: j.small_batch_bn && mismatch,
            })
            .into_iter()
            .collect();
    };
    let plan = keel_norm::recommend_plan(ctx.batch_size, ctx.pretrained);
    let mut advice = Vec::new();
    if needs(backbone, plan.backbone) {
        advice.push(Advice::SwitchBackboneNorm {
            from: backbone,
            to: plan.backbone,
            head: plan.head,
            batch_size: ctx.batch_size,
            pretrained: ctx.pretrained,
        });
    }
    if needs(ctx.norm, plan.head) {
        advice.push(Advice::SwitchNorm {
            from: ctx.norm,
            to: plan.head,
            batch_size: ctx.batch_size,
            pretrained: false,
            train_eval_mismatch: ctx.norm == NormKind::BatchNorm && small && mismatch,
        });
    }
    advice
}

/// The advice for the training dynamics: divergence, spikes, NaN, loss scaling, skipped
/// steps, eval regressions.
fn training_advice(m: &MonitorSummary, j: &Judgement, ctx: &RunContext) -> Vec<Advice> {
    let s = &m.stats;
    let lr = ctx.lr;
    let clip_at = j.healthy_p99.map(round3);
    let f16 = ctx.precision == Precision::F16;
    let mut advice = Vec::new();
    if let Some(step) = j.alarmed {
        advice.push(Advice::RestartBeforeDivergence {
            step,
            from: lr,
            to: round3(lr / 10.0),
        });
    } else if j.diverged() {
        advice.push(Advice::RestartWithLowerLr {
            to: round3(lr / 10.0),
        });
    }
    if s.grad_explosions > 0 {
        let loose = |cur: f64| j.healthy_p99.is_some_and(|p| cur > 1.5 * p);
        advice.push(match (ctx.clip_grad, clip_at) {
            (current, Some(at)) if current.is_none_or(loose) => {
                Advice::ClipGrad { at, current, lr }
            }
            _ => Advice::LowerLr {
                from: lr,
                to: round3(lr / 2.0),
                cause: LrCause::GradSpikesDespiteClipping,
            },
        });
    }
    if s.loss_spikes > 0 {
        advice.push(Advice::LowerLr {
            from: lr,
            to: round3(lr / 2.0),
            cause: LrCause::LossSpikes {
                batch_size: ctx.batch_size,
            },
        });
    }
    if s.non_finite_losses > 0 {
        advice.push(Advice::GuardAgainstNan {
            clip_at,
            lr,
            try_bf16: f16,
        });
    }
    if s.scale_collapses > 0 {
        advice.push(Advice::UseBf16 {
            cause: Bf16Cause::LossScaleCollapsed,
        });
    }
    if j.excess_skips {
        advice.push(if f16 {
            Advice::UseBf16 {
                cause: Bf16Cause::ScalerOverflows,
            }
        } else {
            Advice::FixNonFiniteGrads { clip_at, lr }
        });
    }
    if s.eval_regressions > 0 && !j.small_batch_bn {
        advice.push(Advice::KeepBestCheckpoint {
            best_miou: s.best_miou,
        });
    }
    advice
}
