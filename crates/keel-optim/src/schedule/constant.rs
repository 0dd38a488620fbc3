//! Constant learning rate (PyTorch: no scheduler).

use super::{check_lr, LrSchedule};

/// A constant learning rate: `lr(step) = lr` for every step.
///
/// ```
/// use keel_optim::{Constant, LrSchedule};
/// let s = Constant::new(0.01)?;
/// assert_eq!(s.lr(0), 0.01);
/// assert_eq!(s.lr(1_000_000), 0.01);
/// assert!(Constant::new(-1.0).is_err());
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Constant {
    lr: f64,
}

impl Constant {
    /// A constant schedule; errors when `lr` is negative or not finite.
    pub fn new(lr: f64) -> candle::Result<Self> {
        check_lr("Constant", "lr", lr)?;
        Ok(Self { lr })
    }
}

impl LrSchedule for Constant {
    fn lr(&self, _step: usize) -> f64 {
        self.lr
    }
}
