//! Polynomial decay, the closed form of PyTorch's `PolynomialLR` (the "poly" policy of
//! DeepLab, Chen et al. 2017, whose default power is 0.9).

use super::{check_lr, check_steps, LrSchedule};

/// Polynomial decay: `base_lr * (1 - min(step, total_steps) / total_steps)^power`.
///
/// ```
/// use keel_optim::{LrSchedule, Poly};
/// let s = Poly::new(0.01, 100, 0.9)?;
/// assert_eq!(s.lr(0), 0.01);
/// assert!((s.lr(50) - 0.01 * 0.5f64.powf(0.9)).abs() < 1e-15);
/// assert_eq!(s.lr(100), 0.0);
/// assert_eq!(s.lr(500), 0.0);
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Poly {
    base_lr: f64,
    total_steps: usize,
    power: f64,
}

impl Poly {
    /// A polynomial schedule; errors on a negative or non-finite LR, `total_steps == 0`,
    /// or a negative or non-finite `power`.
    pub fn new(base_lr: f64, total_steps: usize, power: f64) -> candle::Result<Self> {
        check_lr("Poly", "base_lr", base_lr)?;
        check_steps("Poly", "total_steps", total_steps)?;
        if !power.is_finite() || power < 0.0 {
            candle::bail!("Poly: power ({power}) must be finite and non-negative; segmentation recipes use 0.9")
        }
        Ok(Self {
            base_lr,
            total_steps,
            power,
        })
    }
}

impl LrSchedule for Poly {
    fn lr(&self, step: usize) -> f64 {
        let t = step.min(self.total_steps) as f64 / self.total_steps as f64;
        self.base_lr * (1.0 - t).powf(self.power)
    }
}
