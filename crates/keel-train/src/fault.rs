//! Fault injection for any training loop: the faults the guard's proof injects (an LR burst
//! mid-run, a batch of NaN inputs, a poisoned label batch, an LR far too large from step 0),
//! as a [`FaultPlan`] the loop asks each step. A loop that supports it (seg_train's hidden
//! `--fault SPEC`, the guard's tests) shows what its [`crate::Guard`] does with each fault.
//!
//! The spec forms ([`FaultPlan::FORMS`]):
//! - `none`: no fault.
//! - `lr-burst@STEP[*F]`: the LR times `F` (default 1000) for the 5 steps from `STEP`.
//! - `nan-batch@STEP`: the inputs of step `STEP` are NaN.
//! - `poison-labels@STEP[*F]`: the targets of step `STEP` are scaled by `F` (default 1e4):
//!   one-hot targets of weight 1e4, i.e. the cross-entropy and its gradient 1e4 times too
//!   large. A loop with class-index labels applies it to the loss
//!   ([`FaultPlan::poison_loss`]); one with soft targets may scale them.
//! - `huge-lr[*F]`: the LR times `F` (default 1000) for the whole run.
//!
//! ```
//! use keel_train::fault::{FaultKind, FaultPlan};
//! let plan: FaultPlan = "lr-burst@300".parse()?;
//! assert_eq!((plan.kind, plan.at, plan.factor), (FaultKind::LrBurst, 300, 1000.0));
//! assert_eq!((plan.lr_factor(299), plan.lr_factor(300), plan.lr_factor(305)), (1.0, 1000.0, 1.0));
//! assert_eq!(plan.to_string().parse::<FaultPlan>()?, plan);
//! assert_eq!("huge-lr*1e20".parse::<FaultPlan>()?.lr_factor(0), 1e20);
//! assert!("nan-batch@7".parse::<FaultPlan>()?.nan_inputs(7));
//! let err = "lr-burst".parse::<FaultPlan>().unwrap_err().to_string();
//! assert!(err.contains("lr-burst@STEP"), "{err}");
//! # Ok::<(), candle::Error>(())
//! ```
use std::fmt;
use std::str::FromStr;

use candle::Tensor;
use serde::{Deserialize, Serialize};

/// Which fault a [`FaultPlan`] injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultKind {
    /// No fault.
    None,
    /// The LR times [`FaultPlan::factor`] for [`FaultPlan::BURST_STEPS`] steps from
    /// [`FaultPlan::at`].
    LrBurst,
    /// The inputs of step [`FaultPlan::at`] are NaN.
    NanBatch,
    /// The targets of step [`FaultPlan::at`] are scaled by [`FaultPlan::factor`].
    PoisonLabels,
    /// The LR times [`FaultPlan::factor`] for the whole run.
    HugeLr,
}

impl FaultKind {
    /// The spec name (`lr-burst`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::LrBurst => "lr-burst",
            Self::NanBatch => "nan-batch",
            Self::PoisonLabels => "poison-labels",
            Self::HugeLr => "huge-lr",
        }
    }

    /// Every kind, in spec order.
    pub const ALL: [FaultKind; 5] = [
        Self::None,
        Self::LrBurst,
        Self::NanBatch,
        Self::PoisonLabels,
        Self::HugeLr,
    ];

    /// Whether the spec names a step (`@STEP`).
    fn has_step(self) -> bool {
        matches!(self, Self::LrBurst | Self::NanBatch | Self::PoisonLabels)
    }

    /// The default factor, for the kinds that take one.
    fn default_factor(self) -> Option<f64> {
        match self {
            Self::LrBurst | Self::HugeLr => Some(1000.0),
            Self::PoisonLabels => Some(1e4),
            Self::None | Self::NanBatch => None,
        }
    }
}

/// One fault to inject into a run: parse it from a spec (see the [module docs](self)), then
/// ask it each step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultPlan {
    /// The fault.
    pub kind: FaultKind,
    /// Its (first) step; 0 for `none` and `huge-lr`.
    pub at: usize,
    /// Its factor: the LR's for `lr-burst` and `huge-lr`, the targets' for `poison-labels`;
    /// 1 for the others.
    pub factor: f64,
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self::none()
    }
}

impl FaultPlan {
    /// The steps an `lr-burst` lasts.
    pub const BURST_STEPS: usize = 5;
    /// The accepted spec forms, for error messages and help.
    pub const FORMS: &'static str = "none, lr-burst@STEP[*F] (LR x F, default 1000, for 5 steps), nan-batch@STEP, poison-labels@STEP[*F] (targets x F, default 1e4), huge-lr[*F] (LR x F, default 1000, every step)";

    /// No fault.
    pub fn none() -> Self {
        Self {
            kind: FaultKind::None,
            at: 0,
            factor: 1.0,
        }
    }

    /// Parses a spec; the error names the spec, what is wrong and [`FaultPlan::FORMS`].
    pub fn parse(spec: &str) -> candle::Result<Self> {
        let bad = |why: &str| {
            candle::Error::Msg(format!(
                "fault spec `{spec}`: {why}; the accepted forms are {}",
                Self::FORMS
            ))
        };
        let (head, factor) = match spec.split_once('*') {
            Some((h, f)) => {
                let f: f64 = f.parse().map_err(|_| bad("the factor is not a number"))?;
                if !(f.is_finite() && f > 0.0) {
                    return Err(bad("the factor must be finite and positive"));
                }
                (h, Some(f))
            }
            None => (spec, None),
        };
        let (name, at) = match head.split_once('@') {
            Some((n, a)) => (
                n,
                Some(
                    a.parse::<usize>()
                        .map_err(|_| bad("the step is not a non-negative integer"))?,
                ),
            ),
            None => (head, None),
        };
        let kind = FaultKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| bad("unknown fault"))?;
        if kind.has_step() != at.is_some() {
            return Err(bad(if kind.has_step() {
                "this fault needs @STEP"
            } else {
                "this fault takes no @STEP"
            }));
        }
        let factor = match (kind.default_factor(), factor) {
            (None, Some(_)) => return Err(bad("this fault takes no *FACTOR")),
            (None, None) => 1.0,
            (Some(d), f) => f.unwrap_or(d),
        };
        Ok(Self {
            kind,
            at: at.unwrap_or(0),
            factor,
        })
    }

    /// What the scheduled LR of `step` is multiplied by (1 outside an LR fault).
    pub fn lr_factor(&self, step: usize) -> f64 {
        match self.kind {
            FaultKind::HugeLr => self.factor,
            FaultKind::LrBurst if (self.at..self.at + Self::BURST_STEPS).contains(&step) => {
                self.factor
            }
            _ => 1.0,
        }
    }

    /// Whether the inputs of `step` are to be NaN.
    pub fn nan_inputs(&self, step: usize) -> bool {
        self.kind == FaultKind::NanBatch && step == self.at
    }

    /// What the targets of `step` are multiplied by (1 outside `poison-labels`).
    pub fn label_scale(&self, step: usize) -> f64 {
        match self.kind {
            FaultKind::PoisonLabels if step == self.at => self.factor,
            _ => 1.0,
        }
    }

    /// The inputs of `step` as the fault leaves them: NaN on a `nan-batch` step, else `x`.
    pub fn poison_inputs(&self, step: usize, x: &Tensor) -> candle::Result<Tensor> {
        if self.nan_inputs(step) {
            x * f64::NAN
        } else {
            Ok(x.clone())
        }
    }

    /// A cross-entropy `loss` of class-index labels as a target scale of
    /// [`FaultPlan::label_scale`] leaves it (the cross-entropy is linear in the targets).
    pub fn poison_loss(&self, step: usize, loss: &Tensor) -> candle::Result<Tensor> {
        let s = self.label_scale(step);
        if s == 1.0 {
            Ok(loss.clone())
        } else {
            loss * s
        }
    }
}

impl FromStr for FaultPlan {
    type Err = candle::Error;

    fn from_str(s: &str) -> candle::Result<Self> {
        Self::parse(s)
    }
}

impl fmt::Display for FaultPlan {
    /// The spec that parses back to this plan.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind.name())?;
        if self.kind.has_step() {
            write!(f, "@{}", self.at)?;
        }
        if self.kind.default_factor().is_some() {
            write!(f, "*{}", self.factor)?;
        }
        Ok(())
    }
}
