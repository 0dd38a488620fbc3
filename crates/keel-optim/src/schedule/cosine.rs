//! Cosine annealing, the closed form of PyTorch's `CosineAnnealingLR`
//! (Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", 2017).

use super::{check_lr, check_steps, LrSchedule};

/// Cosine annealing from `base_lr` at step 0 to `min_lr` at `total_steps`:
/// `min_lr + (base_lr - min_lr) * (1 + cos(pi * step / total_steps)) / 2`.
///
/// Past `total_steps` the LR stays at `min_lr` (PyTorch's closed form would rise again,
/// which no recipe wants; the two agree on `0..=total_steps`).
///
/// ```
/// use keel_optim::{Cosine, LrSchedule};
/// let s = Cosine::new(0.1, 10, 0.001)?;
/// assert_eq!(s.lr(0), 0.1);
/// assert!((s.lr(5) - 0.0505).abs() < 1e-12);
/// assert_eq!(s.lr(10), 0.001);
/// assert_eq!(s.lr(50), 0.001);
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cosine {
    base_lr: f64,
    total_steps: usize,
    min_lr: f64,
}

impl Cosine {
    /// A cosine schedule; errors on a negative or non-finite LR, `total_steps == 0`, or
    /// `min_lr > base_lr`.
    pub fn new(base_lr: f64, total_steps: usize, min_lr: f64) -> candle::Result<Self> {
        check_lr("Cosine", "base_lr", base_lr)?;
        check_lr("Cosine", "min_lr", min_lr)?;
        check_steps("Cosine", "total_steps", total_steps)?;
        if min_lr > base_lr {
            candle::bail!(
                "Cosine: min_lr ({min_lr}) must not exceed base_lr ({base_lr}); swap them or lower min_lr"
            )
        }
        Ok(Self {
            base_lr,
            total_steps,
            min_lr,
        })
    }
}

impl LrSchedule for Cosine {
    fn lr(&self, step: usize) -> f64 {
        if step >= self.total_steps {
            return self.min_lr;
        }
        let t = step as f64 / self.total_steps as f64;
        self.min_lr + (self.base_lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0
    }
}
