//! The optimizer and learning-rate schedule keel's recipes pair with each
//! [`OptimizerKind`]: SGD (momentum 0.9) with a polynomial decay (power 0.9, DeepLab's
//! "poly" policy, <https://arxiv.org/abs/1606.00915>) or AdamW with a cosine decay
//! (<https://arxiv.org/abs/1608.03983>), either behind an optional linear warmup
//! (<https://arxiv.org/abs/1706.02677>). Built from the enum, so no caller matches strings.
use keel_optim::{
    AdamW, AdamWConfig, Cosine, DynOptimizer, LrSchedule, OptimizerKind, ParamGroup, Poly, Sgd,
    SgdConfig, Warmup,
};

/// SGD momentum in keel's recipe.
pub const SGD_MOMENTUM: f64 = 0.9;
/// Power of the polynomial decay that follows SGD.
pub const POLY_POWER: f64 = 0.9;
/// The linear warmup starts at this fraction of the peak learning rate.
pub const WARMUP_START_FACTOR: f64 = 0.001;

/// Which optimizer and schedule a run uses and their numbers.
///
/// ```
/// use keel_optim::{LrSchedule, OptimizerKind};
/// use keel_train::OptimRecipe;
/// let r = OptimRecipe::new(OptimizerKind::Sgd, 1000).with_warmup(100);
/// assert_eq!((r.lr, r.weight_decay), (0.05, 1e-4)); // the kind's defaults
/// let s = r.schedule()?;
/// assert!((s.lr(0) - 0.05 * 0.001).abs() < 1e-15); // warmup starts low
/// assert_eq!(s.lr(100), 0.05); // the peak, then poly decay
/// assert!(s.lr(999) < 0.001);
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimRecipe {
    /// The optimizer (and with it the decay: poly for SGD, cosine for AdamW).
    pub kind: OptimizerKind,
    /// Peak learning rate.
    pub lr: f64,
    /// Weight decay of the groups that do not set their own.
    pub weight_decay: f64,
    /// Optimizer steps of the whole run (warmup included).
    pub steps: usize,
    /// Linear warmup steps (0 = none); must be below `steps`.
    pub warmup_steps: usize,
}

impl OptimRecipe {
    /// The recipe of `kind` over `steps` steps with the kind's default learning rate and
    /// weight decay ([`OptimizerKind::default_lr`], [`OptimizerKind::default_weight_decay`])
    /// and no warmup.
    pub fn new(kind: OptimizerKind, steps: usize) -> Self {
        Self {
            kind,
            lr: kind.default_lr(),
            weight_decay: kind.default_weight_decay(),
            steps,
            warmup_steps: 0,
        }
    }

    /// The same recipe with `warmup_steps` of linear warmup.
    pub fn with_warmup(mut self, warmup_steps: usize) -> Self {
        self.warmup_steps = warmup_steps;
        self
    }

    /// The optimizer over `groups` (e.g. [`keel_optim::split_no_decay`]'s), at the peak
    /// learning rate; errors as the optimizer's constructor does on a bad LR or decay.
    pub fn optimizer(&self, groups: Vec<ParamGroup>) -> candle::Result<Box<dyn DynOptimizer>> {
        Ok(match self.kind {
            OptimizerKind::Sgd => Box::new(Sgd::with_groups(
                groups,
                SgdConfig {
                    lr: self.lr,
                    momentum: SGD_MOMENTUM,
                    weight_decay: self.weight_decay,
                    ..Default::default()
                },
            )?),
            OptimizerKind::AdamW => Box::new(AdamW::with_groups(
                groups,
                AdamWConfig {
                    lr: self.lr,
                    weight_decay: self.weight_decay,
                    ..Default::default()
                },
            )?),
        })
    }

    /// The schedule: the kind's decay over the steps after the warmup, behind the warmup.
    /// Errors when `warmup_steps >= steps` or the LR is not finite and non-negative.
    pub fn schedule(&self) -> candle::Result<Box<dyn LrSchedule + Send + Sync>> {
        if self.warmup_steps >= self.steps {
            candle::bail!(
                "OptimRecipe: warmup_steps ({}) must be below steps ({}); shorten the warmup",
                self.warmup_steps,
                self.steps
            )
        }
        let main = self.steps - self.warmup_steps;
        let decay: Box<dyn LrSchedule + Send + Sync> = match self.kind {
            OptimizerKind::Sgd => Box::new(Poly::new(self.lr, main, POLY_POWER)?),
            OptimizerKind::AdamW => Box::new(Cosine::new(self.lr, main, 0.0)?),
        };
        Ok(match self.warmup_steps {
            0 => decay,
            w => Box::new(Warmup::linear(decay, w, WARMUP_START_FACTOR)?),
        })
    }

    /// The decay's name as the recipes describe it (`poly 0.9`, `cosine`), for logs.
    pub fn decay_name(&self) -> &'static str {
        match self.kind {
            OptimizerKind::Sgd => "poly 0.9",
            OptimizerKind::AdamW => "cosine",
        }
    }
}
