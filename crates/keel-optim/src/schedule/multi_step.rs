//! Step decay at given milestones, the closed form of PyTorch's `MultiStepLR`.

use super::{check_lr, LrSchedule};

/// `base_lr * gamma^k` where `k` is the number of milestones `<= step`.
///
/// ```
/// use keel_optim::{LrSchedule, MultiStep};
/// let s = MultiStep::new(0.1, vec![3, 6], 0.1)?;
/// assert_eq!(s.lr(2), 0.1);
/// assert!((s.lr(3) - 0.01).abs() < 1e-15);
/// assert!((s.lr(6) - 0.001).abs() < 1e-15);
/// assert!(MultiStep::new(0.1, vec![6, 3], 0.1).is_err());
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct MultiStep {
    base_lr: f64,
    milestones: Vec<usize>,
    gamma: f64,
}

impl MultiStep {
    /// A multi-step schedule; errors on a negative or non-finite LR, milestones that are
    /// not strictly increasing, or a `gamma` that is not finite and positive.
    pub fn new(base_lr: f64, milestones: Vec<usize>, gamma: f64) -> candle::Result<Self> {
        check_lr("MultiStep", "base_lr", base_lr)?;
        if let Some(w) = milestones.windows(2).find(|w| w[0] >= w[1]) {
            candle::bail!(
                "MultiStep: milestones {milestones:?} must be strictly increasing ({} then {}); sort them and drop duplicates",
                w[0],
                w[1]
            )
        }
        if !gamma.is_finite() || gamma <= 0.0 {
            candle::bail!("MultiStep: gamma ({gamma}) must be finite and positive; recipes use 0.1")
        }
        Ok(Self {
            base_lr,
            milestones,
            gamma,
        })
    }
}

impl LrSchedule for MultiStep {
    fn lr(&self, step: usize) -> f64 {
        let k = self.milestones.partition_point(|&m| m <= step);
        self.base_lr * self.gamma.powi(k as i32)
    }
}
