//! The thresholds of the [`crate::StabilityMonitor`], shared by the monitor (which raises
//! alarms with them) and the health report (which judges the run with them).
use serde::{Deserialize, Serialize};

use crate::stats::lossless_f64;

/// Thresholds of the [`crate::StabilityMonitor`]. The defaults suit per-step records of a
/// segmentation or detection run; `..Default::default()` keeps the rest.
///
/// ```
/// use keel_train::MonitorConfig;
/// let cfg = MonitorConfig { window: 50, spike_k: 8.0, ..Default::default() };
/// assert_eq!(cfg.min_history, MonitorConfig::default().min_history);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MonitorConfig {
    /// Trailing window, in finite losses (and finite grad norms, and steps for the loss-scale
    /// halving count), that the robust statistics use. Default 100; 0 counts as 1.
    pub window: usize,
    /// A loss is a spike when `l > median + spike_k * max(1.4826 * MAD, floor)` over the
    /// trailing window, with `l = ln(loss)` when the loss and the window are positive (else
    /// the loss itself). Default 6.
    #[serde(with = "lossless_f64")]
    pub spike_k: f64,
    /// A grad norm is an explosion when `grad_norm > grad_explosion_factor * median` of the
    /// trailing window. Default 10 (at 5, healthy batch-2 runs raised one per ~80 steps).
    #[serde(with = "lossless_f64")]
    pub grad_explosion_factor: f64,
    /// Spikes and explosions are only judged once the window holds this many values.
    /// Default 20; 0 counts as 1.
    pub min_history: usize,
    /// The spread floor relative to the median, so a flat curve does not alarm on rounding
    /// noise: `ln(1 + mad_floor_rel)` on the log scale, `max(mad_floor_rel * |median|,
    /// mad_floor_abs)` on the linear one. Default 0.02.
    #[serde(with = "lossless_f64")]
    pub mad_floor_rel: f64,
    /// The absolute spread floor (see [`MonitorConfig::mad_floor_rel`]). Default 1e-6.
    #[serde(with = "lossless_f64")]
    pub mad_floor_abs: f64,
    /// A loss scale below this has collapsed. Default 1.0 (PyTorch starts at 65536).
    #[serde(with = "lossless_f64")]
    pub min_loss_scale: f64,
    /// This many loss-scale decreases within `window` steps is a collapse. Default 10.
    pub max_scale_halvings: usize,
    /// An eval whose mIoU is more than this below the best so far is a regression; the same
    /// margin flags a train-vs-eval gap. Default 0.03 (absolute mIoU).
    #[serde(with = "lossless_f64")]
    pub eval_regression_margin: f64,
    /// This many loss spikes, grad explosions or non-finite losses (each kind counted on its
    /// own), and at least `unstable_rate` of the steps, make a run Unstable. Default 3.
    pub unstable_events: usize,
    /// The event rate (per step) that makes a run Unstable, together with
    /// `unstable_events`: isolated events in a long run are a Warning. Default 0.001.
    #[serde(default = "default_unstable_rate", with = "lossless_f64")]
    pub unstable_rate: f64,
    /// This many eval regressions make a run Unstable. Default 2.
    pub unstable_regressions: usize,
    /// A skipped-step fraction above this is a finding (isolated skips are a GradScaler
    /// doing its job). Default 0.05.
    #[serde(with = "lossless_f64")]
    pub max_skip_fraction: f64,
    /// The run has Diverged when at least this fraction of the last `window` steps had a
    /// non-finite loss. Default 0.5.
    #[serde(with = "lossless_f64")]
    pub diverged_nonfinite_fraction: f64,
    /// The run has Diverged when the trailing median loss exceeds this multiple of the
    /// median of the first `window` losses. Default 10.
    #[serde(with = "lossless_f64")]
    pub diverge_factor: f64,
    /// The anchor: the first `anchor_len` positive finite losses that were not anchor spikes,
    /// frozen once filled. Its median is the robust initial loss of the step-0 divergence
    /// test, and its median/MAD of `ln(loss)` judges spikes from the first step on, which a
    /// run diverging later cannot poison. Default 10; 0 counts as 1.
    #[serde(default = "default_anchor_len")]
    pub anchor_len: usize,
    /// A loss is also a spike when `ln(loss) > median + max(spike_k * sigma, ln(anchor_spike_factor))`
    /// over the anchor (sigma as for `spike_k`): in the first steps the noise level is
    /// unknown, so only a jump of this factor above the start counts. Default 1000.
    #[serde(default = "default_anchor_spike_factor", with = "lossless_f64")]
    pub anchor_spike_factor: f64,
    /// How many trailing finite losses the step-level divergence tests take the median of,
    /// so a single outlier is a spike, not a divergence. Default 5; 0 counts as 1.
    #[serde(default = "default_diverge_confirm")]
    pub diverge_confirm: usize,
    /// [`crate::Alarm::Divergence`] when the median of the last `diverge_confirm` losses
    /// exceeds this multiple of the anchor's median (and the `reference_loss`, when given: a
    /// loss below a uniform prediction has not diverged). Default 20 (a healthy warmup may
    /// rise about 3x).
    #[serde(default = "default_diverge_initial_factor", with = "lossless_f64")]
    pub diverge_initial_factor: f64,
    /// The loss of a uniform prediction, when the caller knows it: `ln(num_classes)` for
    /// cross-entropy. `None` (the default) disables the reference test.
    #[serde(default, with = "lossless_f64::option")]
    pub reference_loss: Option<f64>,
    /// [`crate::Alarm::Divergence`] when the median of the last `diverge_confirm` losses
    /// exceeds this multiple of `reference_loss`. Default 10.
    #[serde(default = "default_reference_factor", with = "lossless_f64")]
    pub reference_factor: f64,
    /// The grad-norm growth test looks at the last this many finite, positive grad norms.
    /// Default 10; below 3 counts as 3.
    #[serde(default = "default_grad_growth_window")]
    pub grad_growth_window: usize,
    /// [`crate::Alarm::Divergence`] when the grad norm grows geometrically: the Theil-Sen
    /// slope of `ln(grad_norm)` over the window exceeds `ln(grad_growth_rate)` per step ...
    /// Default 1.5.
    #[serde(default = "default_grad_growth_rate", with = "lossless_f64")]
    pub grad_growth_rate: f64,
    /// ... and the growth that slope implies across the window exceeds this factor.
    /// Default 100.
    #[serde(default = "default_grad_growth_total", with = "lossless_f64")]
    pub grad_growth_total: f64,
}

fn default_anchor_len() -> usize {
    10
}

fn default_anchor_spike_factor() -> f64 {
    1000.0
}

fn default_diverge_confirm() -> usize {
    5
}

fn default_diverge_initial_factor() -> f64 {
    20.0
}

fn default_reference_factor() -> f64 {
    10.0
}

fn default_grad_growth_window() -> usize {
    10
}

fn default_grad_growth_rate() -> f64 {
    1.5
}

fn default_grad_growth_total() -> f64 {
    100.0
}

fn default_unstable_rate() -> f64 {
    1e-3
}

impl MonitorConfig {
    /// Whether the monitor's gradient checks are on: the explosion test
    /// (`grad_explosion_factor` finite) or the growth test (`grad_growth_rate` and
    /// `grad_growth_total` finite). Set `grad_explosion_factor` and `grad_growth_total` to
    /// `f64::INFINITY` to turn both off: a windowed step then measures the gradient norm
    /// only for clipping or skipping ([`crate::TrainState::launch`]).
    ///
    /// ```
    /// use keel_train::MonitorConfig;
    /// assert!(MonitorConfig::default().needs_grad_norm());
    /// let off = MonitorConfig { grad_explosion_factor: f64::INFINITY, grad_growth_total: f64::INFINITY, ..Default::default() };
    /// assert!(!off.needs_grad_norm());
    /// ```
    pub fn needs_grad_norm(&self) -> bool {
        self.grad_explosion_factor.is_finite()
            || (self.grad_growth_rate.is_finite() && self.grad_growth_total.is_finite())
    }
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            window: 100,
            spike_k: 6.0,
            grad_explosion_factor: 10.0,
            min_history: 20,
            mad_floor_rel: 0.02,
            mad_floor_abs: 1e-6,
            min_loss_scale: 1.0,
            max_scale_halvings: 10,
            eval_regression_margin: 0.03,
            unstable_events: 3,
            unstable_rate: default_unstable_rate(),
            unstable_regressions: 2,
            max_skip_fraction: 0.05,
            diverged_nonfinite_fraction: 0.5,
            diverge_factor: 10.0,
            anchor_len: default_anchor_len(),
            anchor_spike_factor: default_anchor_spike_factor(),
            diverge_confirm: default_diverge_confirm(),
            diverge_initial_factor: default_diverge_initial_factor(),
            reference_loss: None,
            reference_factor: default_reference_factor(),
            grad_growth_window: default_grad_growth_window(),
            grad_growth_rate: default_grad_growth_rate(),
            grad_growth_total: default_grad_growth_total(),
        }
    }
}

/// What a [`crate::Guard`] does about a diverging run.
///
/// Text form (`FromStr`, `Display`, serde): `off`, `skip`, `rollback`.
///
/// ```
/// use keel_train::GuardPolicy;
/// let p: GuardPolicy = "Rollback".parse()?;
/// assert_eq!((p, p.to_string()), (GuardPolicy::default(), "rollback".to_string()));
/// assert!("undo".parse::<GuardPolicy>().unwrap_err().to_string().contains("off, skip, rollback"));
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuardPolicy {
    /// Nothing: every optimizer step is applied, a NaN/Inf gradient included (f16 runs
    /// still skip GradScaler overflows, the scaler's protocol).
    Off,
    /// Skip the optimizer steps whose loss, gradient or gradient norm is not finite (keel's
    /// behaviour before the guard); never roll back.
    Skip,
    /// Skip non-finite steps, and on divergence restore the last good in-memory snapshot,
    /// move past the batches that led there, lower the LR for the rest of the run; stop
    /// after `max_interventions`.
    #[default]
    Rollback,
}

impl GuardPolicy {
    /// Every choice, in the order help texts list them.
    pub const ALL: [GuardPolicy; 3] = [GuardPolicy::Off, GuardPolicy::Skip, GuardPolicy::Rollback];
}

impl std::fmt::Display for GuardPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GuardPolicy::Off => "off",
            GuardPolicy::Skip => "skip",
            GuardPolicy::Rollback => "rollback",
        })
    }
}

impl std::str::FromStr for GuardPolicy {
    type Err = candle::Error;

    fn from_str(s: &str) -> candle::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" => Ok(GuardPolicy::Off),
            "skip" => Ok(GuardPolicy::Skip),
            "rollback" => Ok(GuardPolicy::Rollback),
            _ => candle::bail!("unknown guard policy '{s}': expected one of off, skip, rollback"),
        }
    }
}

/// How a [`crate::Guard`] watches and acts. [`GuardConfig::for_run`] derives the intervals
/// from the run length; `..GuardConfig::for_run(steps)` keeps the rest.
///
/// ```
/// use keel_train::{GuardConfig, GuardPolicy};
/// let cfg = GuardConfig::for_run(20_000);
/// assert_eq!((cfg.policy, cfg.snapshot_every, cfg.check_every), (GuardPolicy::Rollback, 200, 10));
/// assert_eq!(GuardConfig::for_run(300).snapshot_every, 20);
/// cfg.validate()?;
/// assert!(GuardConfig { lr_factor: 1.5, ..cfg }.validate().is_err());
/// assert!(GuardConfig { early_lr_factor: 0.0, ..cfg }.validate().is_err());
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuardConfig {
    /// What to do. Default [`GuardPolicy::Rollback`].
    pub policy: GuardPolicy,
    /// Take an in-memory snapshot of a healthy state every this many steps (default: 1% of
    /// the run, at least 20 steps, at most 1000).
    pub snapshot_every: usize,
    /// Check that the weights are finite every this many steps (one reduction of all the
    /// parameters, one device sync; default 10).
    pub check_every: usize,
    /// A snapshot taken fewer than this many steps before an alarm may already hold the
    /// start of the divergence (the monitor confirms over a few steps): a rollback restores
    /// the newest snapshot at least this old, or the oldest held. Default 10.
    #[serde(default = "default_lookback")]
    pub lookback: usize,
    /// This many non-finite losses in a row are a divergence (a single NaN batch is only
    /// skipped). Default 3.
    pub nonfinite_patience: usize,
    /// Each intervention multiplies the learning rate by this, for the rest of the run.
    /// Default 0.5: three interventions cover an LR up to 8x too large; an LR far beyond
    /// that ends in a stop (a loud DIVERGED), not a crawl at a tiny LR, and a transient
    /// fault (an LR burst, a bad batch) costs the rest of the run only a halved LR.
    #[serde(with = "lossless_f64")]
    pub lr_factor: f64,
    /// A divergence after this many interventions stops the run. Default 3.
    pub max_interventions: usize,
    /// The factor for an intervention before the run has made any progress (no snapshot
    /// below its initial loss was ever taken, so the rollback goes back to its start): the
    /// learning rate itself is the cause, and [`GuardConfig::lr_factor`] could not undo it
    /// within [`GuardConfig::max_interventions`]. Default 0.1: three such interventions
    /// cover an LR up to 1000x too large (see [`crate::Guard`]).
    #[serde(default = "default_early_lr_factor", with = "lossless_f64")]
    pub early_lr_factor: f64,
}

fn default_early_lr_factor() -> f64 {
    0.1
}

fn default_lookback() -> usize {
    10
}

impl GuardConfig {
    /// The defaults for a run of `steps` optimizer steps (see the field docs).
    pub fn for_run(steps: usize) -> Self {
        Self {
            policy: GuardPolicy::Rollback,
            snapshot_every: (steps / 100).clamp(20, 1000),
            check_every: 10,
            lookback: default_lookback(),
            nonfinite_patience: 3,
            lr_factor: 0.5,
            max_interventions: 3,
            early_lr_factor: default_early_lr_factor(),
        }
    }

    /// Checks the values: intervals and patience at least 1, both LR factors in (0, 1].
    pub fn validate(&self) -> candle::Result<()> {
        for (name, v) in [
            ("snapshot_every", self.snapshot_every),
            ("check_every", self.check_every),
            ("nonfinite_patience", self.nonfinite_patience),
        ] {
            if v == 0 {
                candle::bail!("GuardConfig: {name} is 0; it counts steps, use at least 1")
            }
        }
        for (name, v) in [
            ("lr_factor", self.lr_factor),
            ("early_lr_factor", self.early_lr_factor),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                candle::bail!(
                    "GuardConfig: {name} {v} must be in (0, 1]: an intervention multiplies the LR by it (e.g. 0.1)"
                )
            }
        }
        Ok(())
    }
}
