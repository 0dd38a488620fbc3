//! The outcome of one run in numbers a comparison of runs needs: the loss and grad-norm of
//! every step, the validation metric of every evaluation, the monitor's alarm counts, the
//! speed, the health verdict and what the guard did. A loop fills it step by step
//! ([`RunSummary::record_step`], [`RunSummary::record_eval`], [`RunSummary::finish`]),
//! checkpoints it with the train state, and writes it as `summary.json`; a grid of runs
//! aggregates many ([`crate::grid`]).
use serde::{Deserialize, Serialize};

use crate::{lossless_f64, Alarm, GuardSummary, StepOutcome, Verdict};

/// The outcome of a run. Its floats keep NaN and infinities (keel's [`lossless_f64`]
/// encoding: `"NaN"`, `"inf"`), so a run that ever logged a non-finite loss or grad norm (an
/// f16 loss-scaler skip) still resumes from its checkpoints.
///
/// ```
/// use keel_train::{RunSummary, StepOutcome};
/// let mut s = RunSummary::default();
/// let out = StepOutcome { step: 0, loss: 1.5, lr: 0.1, grad_norm: 2.0, loss_scale: None,
///                         skipped: false, skipped_on_device: false, weights_finite: None,
///                         alarms: Vec::new() };
/// s.record_step(&out);
/// s.record_eval(0, 0.25, 0.5);
/// assert_eq!((s.losses[0], s.evals[0], s.final_miou), ((0, 1.5), (1, 0.25), 0.25));
/// ```
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunSummary {
    /// The last evaluation's mIoU; NaN when the weights were non-finite.
    #[serde(with = "lossless_f64")]
    pub final_miou: f64,
    /// The last evaluation's pixel accuracy.
    #[serde(with = "lossless_f64")]
    pub final_pixel_acc: f64,
    /// `(step, loss)` of every step (0-based steps).
    #[serde(with = "lossless_f64::pairs")]
    pub losses: Vec<(usize, f64)>,
    /// `(steps done, mIoU)` of every evaluation.
    #[serde(with = "lossless_f64::pairs")]
    pub evals: Vec<(usize, f64)>,
    /// The pre-clip global gradient L2 norm of every step.
    #[serde(with = "lossless_f64::seq")]
    pub grad_norms: Vec<f64>,
    /// Loss-spike alarms of the monitor.
    pub loss_spikes: usize,
    /// Steps with a non-finite loss or gradient.
    pub nonfinite_steps: usize,
    /// Steps the optimizer skipped.
    pub skipped_steps: usize,
    /// Wall-clock seconds per optimizer step of the last session.
    pub seconds_per_step: f64,
    /// The health report's verdict (`"Healthy"`, `"Warning"`, ...).
    pub verdict: String,
    /// Rollbacks and stops of the guard.
    #[serde(default)]
    pub guard_interventions: usize,
    /// The step at which the guard stopped the run, if it did.
    #[serde(default)]
    pub guard_stopped_at: Option<usize>,
    /// The guard's history (checkpointed with the summary, continued on resume).
    #[serde(default)]
    pub guard: Option<GuardSummary>,
}

impl RunSummary {
    /// Records a step: its loss and grad norm, and its alarms in the counts.
    pub fn record_step(&mut self, out: &StepOutcome) {
        for alarm in &out.alarms {
            match alarm {
                Alarm::LossSpike { .. } => self.loss_spikes += 1,
                Alarm::NonFinite { .. } => self.nonfinite_steps += 1,
                Alarm::SkippedStep { .. } => self.skipped_steps += 1,
                _ => {}
            }
        }
        self.losses.push((out.step, out.loss));
        self.grad_norms.push(out.grad_norm);
    }

    /// Records the evaluation after the 0-based `step`: it becomes the final metrics.
    pub fn record_eval(&mut self, step: usize, miou: f64, pixel_acc: f64) {
        self.evals.push((step + 1, miou));
        (self.final_miou, self.final_pixel_acc) = (miou, pixel_acc);
    }

    /// Records the end of a run: the report's verdict and the guard's interventions (the
    /// step it stopped at, when it stopped the run).
    pub fn finish(&mut self, verdict: Verdict, guard: &GuardSummary) {
        self.verdict = format!("{verdict:?}");
        self.guard_interventions = guard.interventions.len();
        self.guard_stopped_at = guard
            .interventions
            .last()
            .filter(|_| guard.stopped)
            .map(|i| i.step);
    }

    /// An error when the guard stopped the run (it kept diverging after its rollbacks), so
    /// a trainer exits non-zero after the run's report was written; `Ok` otherwise.
    pub fn check_not_stopped(&self) -> candle::Result<()> {
        match self.guard_stopped_at {
            Some(step) => candle::bail!(
                "the guard stopped the run at step {step}: it kept diverging after {} rollbacks (see health.json); lower --lr",
                self.guard_interventions.saturating_sub(1)
            ),
            None => Ok(()),
        }
    }

    /// The mean of the runs' seconds per step.
    pub(crate) fn mean_seconds_per_step(runs: &[RunSummary]) -> f64 {
        runs.iter().map(|r| r.seconds_per_step).sum::<f64>() / runs.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alarms_are_counted_and_non_finite_values_survive_json() -> anyhow::Result<()> {
        let mut s = RunSummary::default();
        let out = StepOutcome {
            step: 3,
            loss: f64::NAN,
            lr: 0.1,
            grad_norm: f64::INFINITY,
            loss_scale: Some(1024.0),
            skipped: true,
            skipped_on_device: false,
            weights_finite: None,
            alarms: vec![
                Alarm::NonFinite {
                    step: 3,
                    loss: f64::NAN,
                    grad_norm: None,
                },
                Alarm::SkippedStep {
                    step: 3,
                    loss_scale: Some(1024.0),
                },
            ],
        };
        s.record_step(&out);
        assert_eq!(
            (s.nonfinite_steps, s.skipped_steps, s.loss_spikes),
            (1, 1, 0)
        );
        let back: RunSummary = serde_json::from_str(&serde_json::to_string(&s)?)?;
        assert!(back.losses[0].1.is_nan() && back.grad_norms[0] == f64::INFINITY);
        Ok(())
    }
}
