//! Divergence from step 0: absolute tests that need no healthy baseline. The loss is compared
//! with a robust initial loss (the median of an anchor of the first losses, gated so that a
//! run diverging from its first update cannot poison it) and with the loss of a uniform
//! prediction; the gradient norm is tested for geometric growth with the Theil-Sen slope of
//! `ln(grad_norm)` (Sen 1968), which a few outliers cannot tilt; non-finite weights are
//! reported by the caller.
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::config::MonitorConfig;
use crate::stats::{lossless_f64, median, median_mad};

/// Why the monitor judged a run to be diverging.
///
/// ```
/// use keel_train::DivergenceCause;
/// let c = DivergenceCause::LossAboveInitial { loss: 8387.0, initial: 1.4, factor: 20.0 };
/// assert!(c.to_string().contains("more than 20x the initial loss"));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DivergenceCause {
    /// The median of the last `diverge_confirm` losses is above `factor` x the initial loss
    /// (the anchor median), and above the reference loss when one is given.
    LossAboveInitial {
        /// The median of the last losses.
        #[serde(with = "lossless_f64")]
        loss: f64,
        /// The robust initial loss.
        #[serde(with = "lossless_f64")]
        initial: f64,
        /// `diverge_initial_factor`.
        #[serde(with = "lossless_f64")]
        factor: f64,
    },
    /// The median of the last `diverge_confirm` losses is above `factor` x the loss of a
    /// uniform prediction.
    LossAboveReference {
        /// The median of the last losses.
        #[serde(with = "lossless_f64")]
        loss: f64,
        /// The caller's reference loss (e.g. `ln(num_classes)`).
        #[serde(with = "lossless_f64")]
        reference: f64,
        /// `reference_factor`.
        #[serde(with = "lossless_f64")]
        factor: f64,
    },
    /// The gradient norm grew geometrically over the last `window` finite grad norms, to
    /// above its initial value (the median of the first `anchor_len` grad norms).
    GradGrowth {
        /// The robust growth factor per step (`exp` of the Theil-Sen slope of `ln(g)`).
        #[serde(with = "lossless_f64")]
        rate: f64,
        /// The growth that rate implies across the window.
        #[serde(with = "lossless_f64")]
        total: f64,
        /// Grad norms in the window.
        window: usize,
    },
    /// The caller found a NaN or infinite weight
    /// ([`crate::StabilityMonitor::record_weights_finite`]).
    NonFiniteWeights,
}

impl std::fmt::Display for DivergenceCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DivergenceCause::LossAboveInitial {
                loss,
                initial,
                factor,
            } => write!(
                f,
                "the recent median loss {loss:.4e} is more than {factor}x the initial loss \
                 {initial:.4}"
            ),
            DivergenceCause::LossAboveReference {
                loss,
                reference,
                factor,
            } => write!(
                f,
                "the recent median loss {loss:.4e} is more than {factor}x the loss of a uniform \
                 prediction ({reference:.4})"
            ),
            DivergenceCause::GradGrowth {
                rate,
                total,
                window,
            } => write!(
                f,
                "the gradient norm grew {rate:.2}x per step over the last {window} grad norms \
                 ({total:.3e}x in all)"
            ),
            DivergenceCause::NonFiniteWeights => f.write_str("non-finite (NaN/Inf) weights"),
        }
    }
}

/// One divergence alarm: its step and cause.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DivergenceEvent {
    /// The step.
    pub step: usize,
    /// Why.
    pub cause: DivergenceCause,
}

/// A spike judged against the anchor: the anchor median and the robust sigma of `ln(loss)`.
pub(crate) struct AnchorSpike {
    pub(crate) median: f64,
    pub(crate) sigma: f64,
}

/// The state of the step-0 divergence tests: the anchor, the last losses and grad norms, and
/// whether each test is in an episode (an alarm is raised when one begins).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct DivergenceWatch {
    /// The first positive finite losses that were not anchor spikes (frozen once full).
    #[serde(with = "lossless_f64::seq")]
    anchor: Vec<f64>,
    /// The last `diverge_confirm` finite losses.
    #[serde(with = "lossless_f64::seq")]
    recent: VecDeque<f64>,
    /// Steps of the last `grad_growth_window` positive finite grad norms.
    grad_steps: VecDeque<usize>,
    /// `ln` of those grad norms.
    #[serde(with = "lossless_f64::seq")]
    grad_logs: VecDeque<f64>,
    loss_active: bool,
    grad_active: bool,
    /// The first `anchor_len` positive finite grad norms: growth back up to them (a healthy
    /// run whose gradients had shrunk near a minimum) is not a divergence.
    #[serde(default, with = "lossless_f64::seq")]
    grad_anchor: Vec<f64>,
}

impl DivergenceWatch {
    /// A watch whose anchor is taken from already-recorded first losses (a monitor serialized
    /// before the watch existed).
    pub(crate) fn from_first_losses(cfg: &MonitorConfig, first: &[f64]) -> Self {
        let mut w = Self::default();
        for &l in first {
            let spike = w.anchor_spike(cfg, l).is_some();
            w.admit(cfg, l, spike);
        }
        w
    }

    /// The median of the anchor: the robust initial loss.
    pub(crate) fn anchor_loss(&self) -> Option<f64> {
        median(self.anchor.iter().copied())
    }

    /// Whether the last loss test is in a divergence episode.
    pub(crate) fn active(&self) -> bool {
        self.loss_active || self.grad_active
    }

    /// Tests a finite loss against the anchor: `ln(loss) > median + max(spike_k * sigma,
    /// ln(anchor_spike_factor))`.
    pub(crate) fn anchor_spike(&self, cfg: &MonitorConfig, loss: f64) -> Option<AnchorSpike> {
        if loss <= 0.0 || self.anchor.is_empty() {
            return None;
        }
        let logs: Vec<f64> = self.anchor.iter().map(|l| l.ln()).collect();
        let (med, mad) = median_mad(&logs)?;
        let sigma = (1.4826 * mad).max(cfg.mad_floor_rel.ln_1p());
        let margin = (cfg.spike_k * sigma).max(cfg.anchor_spike_factor.ln());
        (loss.ln() > med + margin).then_some(AnchorSpike {
            median: med.exp(),
            sigma,
        })
    }

    /// Adds a finite loss to the anchor while it is not full, unless it was an anchor spike.
    pub(crate) fn admit(&mut self, cfg: &MonitorConfig, loss: f64, spike: bool) {
        if loss > 0.0 && !spike && self.anchor.len() < cfg.anchor_len.max(1) {
            self.anchor.push(loss);
        }
    }

    /// Feeds a finite loss; returns the cause when a loss divergence episode begins.
    pub(crate) fn judge_loss(&mut self, cfg: &MonitorConfig, loss: f64) -> Option<DivergenceCause> {
        let confirm = cfg.diverge_confirm.max(1);
        self.recent.push_back(loss);
        while self.recent.len() > confirm {
            self.recent.pop_front();
        }
        let cause = if self.recent.len() < confirm {
            None
        } else {
            median(self.recent.iter().copied()).and_then(|m| self.loss_cause(cfg, m))
        };
        let begins = cause.is_some() && !self.loss_active;
        self.loss_active = cause.is_some();
        cause.filter(|_| begins)
    }

    /// The loss tests on the recent median `m`.
    fn loss_cause(&self, cfg: &MonitorConfig, m: f64) -> Option<DivergenceCause> {
        if let Some(r) = cfg.reference_loss.filter(|&r| r > 0.0) {
            if m > cfg.reference_factor * r {
                return Some(DivergenceCause::LossAboveReference {
                    loss: m,
                    reference: r,
                    factor: cfg.reference_factor,
                });
            }
        }
        let initial = self.anchor_loss().filter(|&a| a > 0.0)?;
        let above_reference = cfg.reference_loss.is_none_or(|r| m > r);
        (m > cfg.diverge_initial_factor * initial && above_reference).then_some(
            DivergenceCause::LossAboveInitial {
                loss: m,
                initial,
                factor: cfg.diverge_initial_factor,
            },
        )
    }

    /// Feeds a finite grad norm; returns the cause when a grad-growth episode begins.
    pub(crate) fn judge_grad(
        &mut self,
        cfg: &MonitorConfig,
        step: usize,
        g: f64,
    ) -> Option<DivergenceCause> {
        if g <= 0.0 {
            return None;
        }
        let window = cfg.grad_growth_window.max(3);
        if self.grad_anchor.len() < cfg.anchor_len.max(1) {
            self.grad_anchor.push(g);
        }
        self.grad_steps.push_back(step);
        self.grad_logs.push_back(g.ln());
        while self.grad_steps.len() > window {
            self.grad_steps.pop_front();
            self.grad_logs.pop_front();
        }
        let cause = if self.grad_steps.len() < window {
            None
        } else {
            self.grad_cause(cfg, window)
        };
        let begins = cause.is_some() && !self.grad_active;
        self.grad_active = cause.is_some();
        cause.filter(|_| begins)
    }

    /// The Theil-Sen growth test over the full grad window.
    fn grad_cause(&self, cfg: &MonitorConfig, window: usize) -> Option<DivergenceCause> {
        let slope = theil_sen(&self.grad_steps, &self.grad_logs)?;
        let span = *self.grad_steps.back()? as f64 - *self.grad_steps.front()? as f64;
        let (rate, total) = (slope.exp(), (slope * span).exp());
        let last = self.grad_logs.back()?.exp();
        let above_start = median(self.grad_anchor.iter().copied()).is_none_or(|a| last > a);
        (slope > cfg.grad_growth_rate.ln() && total > cfg.grad_growth_total && above_start)
            .then_some(DivergenceCause::GradGrowth {
                rate,
                total,
                window,
            })
    }
}

/// The Theil-Sen slope: the median of the slopes between all pairs of points with distinct x.
fn theil_sen(xs: &VecDeque<usize>, ys: &VecDeque<f64>) -> Option<f64> {
    let mut slopes = Vec::with_capacity(xs.len() * xs.len() / 2);
    for i in 0..xs.len() {
        for j in i + 1..xs.len() {
            if xs[j] != xs[i] {
                slopes.push((ys[j] - ys[i]) / (xs[j] as f64 - xs[i] as f64));
            }
        }
    }
    median(slopes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn theil_sen_ignores_an_outlier() {
        let xs: VecDeque<usize> = (0..10).collect();
        let mut ys: VecDeque<f64> = (0..10).map(|x| 0.5 * x as f64).collect();
        ys[4] = 100.0;
        assert_eq!(theil_sen(&xs, &ys), Some(0.5));
    }

    /// A healthy run whose gradients shrank near a minimum and grow back (the noise of a
    /// tiny loss) is not diverging; the same growth from the start is.
    #[test]
    fn grad_growth_counts_only_above_the_initial_grad_norm() {
        let cfg = MonitorConfig::default();
        let mut w = DivergenceWatch::default();
        let mut alarms = 0;
        for step in 0..60 {
            // 1.0 for 10 steps, down to 1e-4, then back up 2x per step to 0.5.
            let g = if step < 10 {
                1.0
            } else if step < 40 {
                1e-4
            } else {
                (1e-4 * 2f64.powi(step - 39)).min(0.5)
            };
            alarms += usize::from(w.judge_grad(&cfg, step as usize, g).is_some());
        }
        assert_eq!(alarms, 0);
        let mut w = DivergenceWatch::default();
        let fired =
            (0..30).find(|&step| w.judge_grad(&cfg, step, 2f64.powi(step as i32)).is_some());
        assert_eq!(fired, Some(9));
    }
}
