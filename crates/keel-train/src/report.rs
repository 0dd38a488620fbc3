//! The end-of-run health report: a verdict, the numbers behind it, and recommendations from
//! keel's decision table ([`keel_norm::recommend`]: GroupNorm / Weight Standardization for
//! batch 1-2 from scratch, FrozenBatchNorm for a pretrained backbone, BatchNorm from batch 16).
use std::fmt::Write as _;

use keel_norm::{NormKind, BN_MIN_BATCH};
use serde::{Deserialize, Serialize};

use crate::monitor::StabilityMonitor;
use crate::stats::{lossless_f64, median};

/// The run's configuration, as far as the recommendations need it.
///
/// ```
/// use keel_train::RunContext;
/// let ctx = RunContext { norm: "gn".into(), batch_size: 2, pretrained: false, lr: 0.01,
///                        clip_grad: Some(1.0), amp: "bf16".into(), steps: 1000 };
/// assert_eq!(ctx.norm_kind().unwrap().to_string(), "gn");
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunContext {
    /// The `--norm` value: a [`NormKind`] string (`bn`, `frozen-bn`, `gn`, `gn:G`, `ws-gn`).
    pub norm: String,
    /// Images per optimizer step per device.
    pub batch_size: usize,
    /// Whether training started from pretrained weights.
    pub pretrained: bool,
    /// The peak learning rate.
    pub lr: f64,
    /// The global-norm clipping threshold, if any.
    pub clip_grad: Option<f64>,
    /// Mixed precision: `off`, `f16` or `bf16`.
    pub amp: String,
    /// The planned number of steps.
    pub steps: usize,
}

impl RunContext {
    /// `norm` parsed as a [`NormKind`].
    pub fn norm_kind(&self) -> candle::Result<NormKind> {
        self.norm.parse()
    }
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
    /// Non-finite losses dominate the end of the run, or the loss ended far above its start.
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

/// The numbers behind a [`HealthReport`]. Quantiles of the grad norm are within about 1%.
///
/// ```
/// use keel_train::{MonitorConfig, RunContext, StabilityMonitor};
/// let mon = StabilityMonitor::new(MonitorConfig::default());
/// let ctx = RunContext { norm: "gn".into(), batch_size: 8, pretrained: false, lr: 0.01,
///                        clip_grad: None, amp: "off".into(), steps: 0 };
/// let stats = mon.report(&ctx).summary;
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
    pub grad_norm_p50: Option<f64>,
    /// 99th-percentile gradient norm.
    pub grad_norm_p99: Option<f64>,
    /// Largest gradient norm.
    pub grad_norm_max: Option<f64>,
    /// 99th percentile of the grad norms that were not explosions: the suggested clip value.
    pub healthy_grad_norm_p99: Option<f64>,
    /// Smallest loss scale seen.
    pub min_loss_scale: Option<f64>,
    /// Median of the trailing loss window at the end.
    pub final_loss: Option<f64>,
    /// mIoU of the last eval.
    #[serde(with = "lossless_f64::option")]
    pub final_miou: Option<f64>,
    /// Best mIoU.
    pub best_miou: Option<f64>,
    /// Step of the best mIoU.
    pub best_miou_step: Option<usize>,
    /// Train-vs-eval gap: the largest mIoU drop below the best so far at an eval whose train
    /// loss was no worse than at the best eval (the model kept fitting, eval did not follow).
    /// `None` when no eval fell below the best while the train loss held.
    pub train_eval_gap: Option<f64>,
}

/// The verdict, the numbers, what was found and what to do.
///
/// ```
/// use keel_train::{MonitorConfig, RunContext, StabilityMonitor, StepRecord, Verdict};
/// let mut mon = StabilityMonitor::new(MonitorConfig::default());
/// for step in 0..100 {
///     mon.record_step(&StepRecord { step, loss: f64::NAN, grad_norm: None, loss_scale: None, skipped: false });
/// }
/// let ctx = RunContext { norm: "gn".into(), batch_size: 4, pretrained: false, lr: 0.1,
///                        clip_grad: None, amp: "off".into(), steps: 100 };
/// let report = mon.report(&ctx);
/// assert_eq!(report.verdict, Verdict::Diverged);
/// assert!(report.recommendations.iter().any(|r| r.contains("--clip-grad")));
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
    /// What to change, one sentence each.
    pub recommendations: Vec<String>,
    /// The run configuration the recommendations refer to.
    pub context: RunContext,
}

impl HealthReport {
    /// A human-readable multi-line report.
    pub fn to_text(&self) -> String {
        let s = &self.summary;
        let mut t = String::new();
        let _ = writeln!(t, "Training health: {}", self.verdict);
        let _ = writeln!(
            t,
            "  run: norm {}, batch {}, lr {}, clip {}, amp {}, {} steps recorded, {} evals",
            self.context.norm,
            self.context.batch_size,
            self.context.lr,
            self.context
                .clip_grad
                .map_or("off".to_string(), |c| c.to_string()),
            self.context.amp,
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
        if !self.findings.is_empty() {
            let _ = writeln!(t, "Findings:");
            for f in &self.findings {
                let _ = writeln!(t, "  - {f}");
            }
        }
        let _ = writeln!(t, "Recommendations:");
        for r in &self.recommendations {
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

/// A number as a CLI argument: 3 significant digits.
fn arg(x: f64) -> String {
    format!("{}", format!("{x:.2e}").parse::<f64>().unwrap_or(x))
}

pub(crate) fn build(m: &StabilityMonitor, ctx: &RunContext) -> HealthReport {
    let cfg = &m.cfg;
    let summary = ReportStats {
        steps: m.steps,
        evals: m.evals.len(),
        loss_spikes: m.spikes.count,
        grad_explosions: m.explosions.count,
        non_finite: m.non_finite.count,
        non_finite_losses: m.non_finite_losses,
        skipped_steps: m.skipped.count,
        scale_collapses: m.collapses.count,
        eval_regressions: m.regressions.count,
        grad_norm_p50: m.grad_all.quantile(0.5),
        grad_norm_p99: m.grad_all.quantile(0.99),
        grad_norm_max: m.grad_all.max(),
        healthy_grad_norm_p99: m.grad_healthy.quantile(0.99),
        min_loss_scale: m.min_scale,
        final_loss: m.trailing_loss(),
        final_miou: m.evals.last().map(|e| e.miou),
        best_miou: m.best_eval.as_ref().map(|e| e.miou),
        best_miou_step: m.best_eval.as_ref().map(|e| e.step),
        train_eval_gap: m.max_gap,
    };
    let s = &summary;

    // Verdict.
    let recent = m.recent_nonfinite.len();
    let recent_bad = m.recent_nonfinite.iter().filter(|&&b| b).count();
    let nonfinite_end = recent > 0
        && recent_bad as f64 >= cfg.diverged_nonfinite_fraction * recent as f64
        && recent_bad > 0;
    let start = median(m.first_losses.iter().copied());
    let blown_up = match (start, s.final_loss) {
        (Some(a), Some(b)) if m.first_losses.len() >= cfg.min_history.max(1) => {
            a > 0.0 && b > cfg.diverge_factor * a
        }
        _ => false,
    };
    // Isolated events in a long run are a Warning: Unstable needs both a count and a rate.
    let n = cfg
        .unstable_events
        .max(1)
        .max((cfg.unstable_rate * s.steps as f64).ceil() as usize);
    let skip_fraction = if s.steps > 0 {
        s.skipped_steps as f64 / s.steps as f64
    } else {
        0.0
    };
    let excess_skips = skip_fraction > cfg.max_skip_fraction;
    let gap = s.train_eval_gap.filter(|&g| g > cfg.eval_regression_margin);
    // Explosions that a clip at most 1.5x the healthy p99 bounded are what clipping is for:
    // they make a Warning, not an Unstable run.
    let clip_bounds_explosions = ctx.clip_grad.is_some_and(|c| {
        s.healthy_grad_norm_p99
            .or(s.grad_norm_p50)
            .is_some_and(|p| c <= 1.5 * p)
    });
    let verdict = if nonfinite_end || blown_up {
        Verdict::Diverged
    } else if s.loss_spikes >= n
        || (s.grad_explosions >= n && !clip_bounds_explosions)
        || s.non_finite_losses >= n
        || s.eval_regressions >= cfg.unstable_regressions.max(1)
        || m.scale_collapsed
    {
        Verdict::Unstable
    } else if s.loss_spikes
        + s.grad_explosions
        + s.non_finite
        + s.scale_collapses
        + s.eval_regressions
        > 0
        || excess_skips
        || gap.is_some()
    {
        Verdict::Warning
    } else {
        Verdict::Healthy
    };

    // Findings.
    let mut findings = Vec::new();
    if nonfinite_end {
        findings.push(format!(
            "{recent_bad} of the last {recent} steps had a non-finite loss: training diverged"
        ));
    }
    if blown_up {
        findings.push(format!(
            "the trailing median loss ({}) is more than {}x the initial median ({}): training \
             diverged",
            fmt_opt(s.final_loss),
            cfg.diverge_factor,
            fmt_opt(start)
        ));
    }
    if s.loss_spikes > 0 {
        findings.push(format!(
            "{} loss spike(s) above median + {} x robust sigma, at steps {}",
            s.loss_spikes,
            cfg.spike_k,
            steps_list(&m.spikes.steps, s.loss_spikes)
        ));
    }
    if s.grad_explosions > 0 {
        findings.push(format!(
            "{} grad-norm explosion(s) above {}x the trailing median (max {}, p50 {}), at steps {}{}",
            s.grad_explosions,
            cfg.grad_explosion_factor,
            fmt_opt(s.grad_norm_max),
            fmt_opt(s.grad_norm_p50),
            steps_list(&m.explosions.steps, s.grad_explosions),
            match ctx.clip_grad {
                Some(c) if clip_bounds_explosions => format!("; --clip-grad {c} bounded them"),
                _ => String::new(),
            }
        ));
    }
    if s.non_finite > 0 {
        findings.push(format!(
            "{} step(s) with NaN/Inf ({} non-finite losses), at steps {}",
            s.non_finite,
            s.non_finite_losses,
            steps_list(&m.non_finite.steps, s.non_finite)
        ));
    }
    if s.skipped_steps > 0 {
        findings.push(format!(
            "{} skipped optimizer step(s) ({:.1}% of steps{}), at steps {}",
            s.skipped_steps,
            100.0 * skip_fraction,
            if excess_skips {
                ", too many"
            } else {
                ", within normal GradScaler behaviour"
            },
            steps_list(&m.skipped.steps, s.skipped_steps)
        ));
    }
    if s.scale_collapses > 0 {
        findings.push(format!(
            "the loss scale collapsed {} time(s) (minimum {}{}), at steps {}",
            s.scale_collapses,
            fmt_opt(s.min_loss_scale),
            if m.scale_collapsed {
                ", still collapsed at the end"
            } else {
                ""
            },
            steps_list(&m.collapses.steps, s.scale_collapses)
        ));
    }
    if s.eval_regressions > 0 {
        findings.push(format!(
            "eval mIoU fell more than {} below its best ({}) {} time(s), at steps {}{}",
            cfg.eval_regression_margin,
            fmt_opt(s.best_miou),
            s.eval_regressions,
            steps_list(&m.regressions.steps, s.eval_regressions),
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
    if let Some(g) = gap {
        findings.push(format!(
            "train-vs-eval gap: eval mIoU dropped up to {g:.4} below its best while the train \
             loss was no worse than at the best eval (the model fits the training batches but \
             does not evaluate well)"
        ));
    }

    // Recommendations.
    let mut recs = Vec::new();
    let kind = ctx.norm_kind();
    let recommended = keel_norm::recommend(ctx.batch_size, ctx.pretrained);
    let start_desc = if ctx.pretrained {
        "with a pretrained backbone"
    } else {
        "from scratch"
    };
    let b = ctx.batch_size;
    let healthy_p99 = s.healthy_grad_norm_p99.or(s.grad_norm_p50);
    match &kind {
        Err(e) => findings.push(format!(
            "the run context's norm is not a keel NormKind ({e}); the norm advice is skipped"
        )),
        Ok(NormKind::BatchNorm) if b < BN_MIN_BATCH => {
            let symptom = if gap.is_some() || m.gap_regressions > 0 {
                " The eval regressions while the train loss kept falling are BatchNorm's \
                 train/eval mismatch: eval uses running statistics that the noisy batch \
                 statistics of training never matched."
            } else {
                ""
            };
            let options = if ctx.pretrained {
                "freeze BN (--norm frozen-bn) or switch to GroupNorm (--norm gn)"
            } else {
                "switch to GroupNorm (--norm gn) or, when starting from pretrained weights, \
                 freeze BN (--norm frozen-bn)"
            };
            recs.push(format!(
                "BatchNorm at batch {b}: {options}; keel's decision table picks --norm \
                 {recommended} at batch {b} {start_desc}, since BatchNorm needs about \
                 {BN_MIN_BATCH} images per device for its batch statistics.{symptom}"
            ));
        }
        Ok(k)
            if verdict > Verdict::Healthy
                && std::mem::discriminant(k) != std::mem::discriminant(&recommended) =>
        {
            recs.push(format!(
                "keel's decision table recommends --norm {recommended} at batch {b} {start_desc} \
                 (this run used --norm {k})"
            ));
        }
        Ok(_) => {}
    }
    if nonfinite_end || blown_up {
        recs.push(format!(
            "the run diverged: restart from the best checkpoint or an earlier healthy one with a \
             lower LR (e.g. {}) and warmup",
            arg(ctx.lr / 10.0)
        ));
    }
    if s.grad_explosions > 0 {
        let clip = healthy_p99.map(arg);
        let text = match (ctx.clip_grad, &clip) {
            (None, Some(c)) => format!(
                "grad-norm spikes: lower the LR (now {}) or clip at {c} (--clip-grad {c}, the \
                 p99 of the healthy grad norms)",
                ctx.lr
            ),
            (Some(cur), Some(c)) if healthy_p99.is_some_and(|p| cur > 1.5 * p) => format!(
                "grad-norm spikes: clipping at {cur} is loose; clip at {c} (--clip-grad {c}, \
                 the p99 of the healthy grad norms) or lower the LR (now {})",
                ctx.lr
            ),
            _ => format!(
                "grad-norm spikes despite clipping: lower the LR (now {}, e.g. {}) or lengthen \
                 the warmup (--warmup-steps)",
                ctx.lr,
                arg(ctx.lr / 2.0)
            ),
        };
        recs.push(text);
    }
    if s.loss_spikes > 0 {
        recs.push(format!(
            "loss spikes: lower the LR (now {}, e.g. {}) or lengthen the warmup \
             (--warmup-steps){}",
            ctx.lr,
            arg(ctx.lr / 2.0),
            if b <= 2 {
                format!("; at batch {b} a step sees few images, --accum-steps averages more")
            } else {
                String::new()
            }
        ));
    }
    if s.non_finite_losses > 0 {
        let clip = healthy_p99.map_or("--clip-grad".to_string(), |p| {
            format!("--clip-grad {}", arg(p))
        });
        recs.push(format!(
            "NaN losses: enable {clip}, warmup (--warmup-steps) and a lower LR (now {}){}",
            ctx.lr,
            if ctx.amp == "f16" {
                "; f16 overflows above 65504: try --amp bf16"
            } else {
                ""
            }
        ));
    }
    if s.scale_collapses > 0 {
        recs.push(
            "loss scale collapsed: use bf16 (--amp bf16, same range as f32) or check for \
             NaN-producing ops (log or division near 0, sqrt of negatives, exp overflow, f16 \
             activations above 65504)"
                .to_string(),
        );
    }
    if excess_skips {
        recs.push(if ctx.amp == "f16" {
            "too many skipped steps: the GradScaler keeps overflowing; use --amp bf16 or find \
             the op that overflows in f16"
                .to_string()
        } else {
            "too many skipped steps: the gradients are non-finite; lower the LR and enable \
             --clip-grad"
                .to_string()
        });
    }
    if s.eval_regressions > 0 && !matches!(kind, Ok(NormKind::BatchNorm) if b < BN_MIN_BATCH) {
        recs.push(format!(
            "eval regressions: keep the best checkpoint (CheckpointManager::best, mIoU {}), \
             decay the LR towards the end (poly or cosine) and check for overfitting \
             (augmentation, more data)",
            fmt_opt(s.best_miou)
        ));
    }
    if recs.is_empty() {
        recs.push("no action needed".to_string());
    }
    HealthReport {
        verdict,
        summary,
        findings,
        recommendations: recs,
        context: ctx.clone(),
    }
}
