//! [`LoopConfig`]: the settings of a training loop that every keel trainer shares (optimizer
//! recipe, precision, accumulation, clipping, EMA, evaluation and checkpoint cadence, the
//! guard), checked in one place. A trainer's run config embeds it with `#[serde(flatten)]`,
//! so its `config.json` stays one flat object whose keys are the flags' names.
use keel_optim::{EmaConfig, EmaWarmup, NoDecay, OptimizerKind, Precision};
use serde::{Deserialize, Serialize};

use crate::{GuardPolicy, MonitorConfig, OptimRecipe, TrainConfig};

/// The loop settings of a run; see the module docs. Field names are the trainers' flag
/// names with `_` for `-` (`clip_grad` is `--clip-grad`), and errors name the flags.
///
/// ```
/// use keel_train::LoopConfig;
/// let c = LoopConfig { warmup_steps: 100, ..LoopConfig::default() };
/// c.validate(1000)?;
/// let bad = LoopConfig { lr: Some(1e39), ..c.clone() };
/// assert!(bad.validate(1000).unwrap_err().to_string().contains("--lr 1e39"));
/// assert!(c.validate(100).unwrap_err().to_string().contains("--warmup-steps 100 must be smaller than --steps 100"));
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoopConfig {
    /// The optimizer (and with it the schedule, see [`OptimRecipe`]).
    pub optimizer: OptimizerKind,
    /// Peak learning rate; `None` = the optimizer's default (SGD 0.05, AdamW 1e-3).
    pub lr: Option<f64>,
    /// Weight decay; `None` = the optimizer's default (SGD 1e-4, AdamW 0.05).
    pub weight_decay: Option<f64>,
    /// Linear warmup steps (0 = none); below the run's steps.
    pub warmup_steps: usize,
    /// Clip the global gradient norm at this value (`None`: measured, not clipped).
    pub clip_grad: Option<f64>,
    /// Compute precision (f16 adds a loss scaler).
    pub amp: Precision,
    /// Micro-batches per optimizer step (at least 1).
    pub accum_steps: usize,
    /// Evaluate every N steps (and at the end; at least 1).
    pub eval_every: usize,
    /// Checkpoint every N steps (and at the end; at least 1).
    pub ckpt_every: usize,
    /// Checkpoints kept besides the best (at least 1).
    pub keep_last: usize,
    /// EMA decay of the weights (0 = off), in [0, 1).
    pub ema_decay: f64,
    /// What the guard does on divergence; configs saved before it existed read as rollback.
    #[serde(default)]
    pub guard: GuardPolicy,
    /// Which parameters get no weight decay ([`NoDecay`]; a trainer passes it to its param
    /// groups, e.g. [`keel_optim::split_no_decay_with`]): [`NoDecay::Rank`] (biases and
    /// every norm parameter) for new runs. Configs saved before the field existed read as
    /// [`NoDecay::Names`], the rule those runs trained with, so they resume with the same
    /// groups.
    #[serde(default = "legacy_no_decay")]
    pub no_decay: NoDecay,
}

/// The rule of configs saved before [`LoopConfig::no_decay`] existed.
fn legacy_no_decay() -> NoDecay {
    NoDecay::Names
}

impl Default for LoopConfig {
    /// SGD at its default LR and decay, f32, no warmup, clipping or EMA, evaluation and
    /// checkpoints every 1000 steps, 2 kept, rollback guard, [`NoDecay::Rank`].
    fn default() -> Self {
        Self {
            optimizer: OptimizerKind::Sgd,
            lr: None,
            weight_decay: None,
            warmup_steps: 0,
            clip_grad: None,
            amp: Precision::F32,
            accum_steps: 1,
            eval_every: 1000,
            ckpt_every: 1000,
            keep_last: 2,
            ema_decay: 0.0,
            guard: GuardPolicy::Rollback,
            no_decay: NoDecay::Rank,
        }
    }
}

impl LoopConfig {
    /// The optimizer and schedule over `steps`: the kind's defaults unless `lr` /
    /// `weight_decay` are set.
    pub fn recipe(&self, steps: usize) -> OptimRecipe {
        let r = OptimRecipe::new(self.optimizer, steps).with_warmup(self.warmup_steps);
        OptimRecipe {
            lr: self.lr.unwrap_or(r.lr),
            weight_decay: self.weight_decay.unwrap_or(r.weight_decay),
            ..r
        }
    }

    /// The [`TrainState`](crate::TrainState) settings: precision, accumulation and the EMA
    /// (TF-style warmup of the decay), with `monitor`.
    pub fn train_config(&self, monitor: MonitorConfig) -> TrainConfig {
        TrainConfig {
            precision: self.amp,
            accum_steps: self.accum_steps,
            ema: (self.ema_decay > 0.0).then_some(EmaConfig {
                decay: self.ema_decay,
                warmup: EmaWarmup::Tf,
            }),
            monitor,
            ..Default::default()
        }
    }

    /// Checks every setting for a run of `steps` steps; the error names the flag, the value
    /// and what it must be.
    pub fn validate(&self, steps: usize) -> candle::Result<()> {
        let at_least_1 = [
            ("--accum-steps", self.accum_steps),
            ("--eval-every", self.eval_every),
            ("--ckpt-every", self.ckpt_every),
            ("--keep-last", self.keep_last),
        ];
        check_at_least_1(&at_least_1)?;
        self.validate_optimizer(steps)?;
        if let Some(c) = self.clip_grad {
            if !(c.is_finite() && c > 0.0) {
                candle::bail!("--clip-grad {c}: must be a positive number")
            }
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            candle::bail!(
                "--ema-decay {}: must lie in [0, 1) (0 = off)",
                self.ema_decay
            )
        }
        if self.warmup_steps >= steps {
            candle::bail!(
                "--warmup-steps {} must be smaller than --steps {steps}",
                self.warmup_steps
            )
        }
        Ok(())
    }

    /// --lr and --weight-decay: finite and positive (non-negative) in f32, the precision
    /// the optimizer computes in (1e39 is a finite f64 but an infinite f32: every weight
    /// would become NaN at the first step).
    fn validate_optimizer(&self, steps: usize) -> candle::Result<()> {
        let r = self.recipe(steps);
        let fits_f32 = |x: f64| (x as f32).is_finite();
        // 1e39, not 1000000000000000000000000000000000000000.
        let show = |x: f64| match x.abs() {
            a if a != 0.0 && !(1e-4..1e6).contains(&a) => format!("{x:e}"),
            _ => x.to_string(),
        };
        if !(r.lr > 0.0 && fits_f32(r.lr)) {
            candle::bail!(
                "--lr {}: must be a positive number below {:e} (the largest f32; the optimizer computes in f32)",
                show(r.lr),
                f32::MAX
            )
        }
        if !(r.weight_decay >= 0.0 && fits_f32(r.weight_decay)) {
            candle::bail!(
                "--weight-decay {}: must be a non-negative number below {:e} (the largest f32)",
                show(r.weight_decay),
                f32::MAX
            )
        }
        Ok(())
    }
}

/// Checks that every `(flag, value)` is at least 1; the error names the first that is not:
/// `--steps must be at least 1 (got 0)`. A trainer's config checks its own counts with it,
/// as [`LoopConfig::validate`] does the loop's.
pub fn check_at_least_1(flags: &[(&str, usize)]) -> candle::Result<()> {
    match flags.iter().find(|(_, v)| *v == 0) {
        Some((flag, v)) => candle::bail!("{flag} must be at least 1 (got {v})"),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// New configs use the rank rule and record it; a config saved before the field
    /// existed reads as the name rule its run trained with (so it resumes with the same
    /// parameter groups).
    #[test]
    fn no_decay_is_recorded_and_old_configs_read_as_the_name_rule() {
        let fresh = LoopConfig::default();
        assert_eq!(fresh.no_decay, NoDecay::Rank);
        let mut json = serde_json::to_value(&fresh).unwrap();
        assert_eq!(json["no_decay"], "rank");
        let back: LoopConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, fresh);
        json.as_object_mut().unwrap().remove("no_decay");
        let old: LoopConfig = serde_json::from_value(json).unwrap();
        assert_eq!(old.no_decay, NoDecay::Names);
        assert_eq!(
            LoopConfig {
                no_decay: NoDecay::Rank,
                ..old
            },
            fresh
        );
    }
}
