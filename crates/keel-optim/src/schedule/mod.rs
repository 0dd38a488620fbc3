//! Learning-rate schedules as pure functions of the step, after
//! `torch.optim.lr_scheduler` (closed forms) and burn-optim's `lr_scheduler`.
//!
//! A schedule never holds mutable state: `lr(step)` depends only on `step`, so a resumed
//! run needs nothing but the step count. Drive an optimizer with
//! `opt.set_learning_rate(schedule.lr(step))` before each `opt.step(..)`.

mod constant;
mod cosine;
mod multi_step;
mod poly;
mod warmup;

pub use constant::Constant;
pub use cosine::Cosine;
pub use multi_step::MultiStep;
pub use poly::Poly;
pub use warmup::Warmup;

/// A learning-rate schedule: the LR to use for optimizer step `step` (0-based).
///
/// ```
/// use keel_optim::{Cosine, LrSchedule};
/// let s = Cosine::new(0.1, 100, 0.0)?;
/// assert_eq!(s.lr(0), 0.1);
/// assert!(s.lr(100).abs() < 1e-12);
/// # Ok::<(), candle::Error>(())
/// ```
pub trait LrSchedule {
    /// The learning rate for step `step` (0-based).
    fn lr(&self, step: usize) -> f64;
}

impl<S: LrSchedule + ?Sized> LrSchedule for Box<S> {
    fn lr(&self, step: usize) -> f64 {
        (**self).lr(step)
    }
}

impl<S: LrSchedule + ?Sized> LrSchedule for &S {
    fn lr(&self, step: usize) -> f64 {
        (**self).lr(step)
    }
}

/// Validates a learning rate: finite and non-negative.
pub(crate) fn check_lr(op: &str, name: &str, lr: f64) -> candle::Result<()> {
    if !lr.is_finite() || lr < 0.0 {
        candle::bail!(
            "{op}: {name} ({lr}) must be a finite, non-negative learning rate; pass e.g. 0.1"
        )
    }
    Ok(())
}

/// Validates a step count: strictly positive.
pub(crate) fn check_steps(op: &str, name: &str, steps: usize) -> candle::Result<()> {
    if steps == 0 {
        candle::bail!(
            "{op}: {name} ({steps}) must be at least 1; pass the number of optimizer steps"
        )
    }
    Ok(())
}
