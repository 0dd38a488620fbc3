//! Warmup in front of any schedule: PyTorch's
//! `SequentialLR([LinearLR | ConstantLR, inner], milestones = [W])` (Goyal et al.,
//! "Accurate, Large Minibatch SGD", 2017), an exponential ramp, and detectron2's
//! multiplicative `WarmupParamScheduler` as a separately named alternative.

use super::{check_steps, LrSchedule};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ramp {
    Linear { start_factor: f64 },
    Constant { factor: f64 },
    Exponential { start_factor: f64 },
}

impl Ramp {
    fn factor(&self, step: usize, warmup_steps: usize) -> f64 {
        let t = step as f64 / warmup_steps as f64;
        match *self {
            Ramp::Linear { start_factor } => start_factor + (1.0 - start_factor) * t,
            Ramp::Constant { factor } => factor,
            Ramp::Exponential { start_factor } => start_factor.powf(1.0 - t),
        }
    }
}

/// A warmup phase of `warmup_steps` steps in front of an `inner` schedule.
///
/// The sequential constructors ([`Warmup::linear`], [`Warmup::constant`],
/// [`Warmup::exponential`]) follow PyTorch's `SequentialLR`: for `step < W` the LR is
/// `inner.lr(0) * factor(step)`, and from `W` on it is `inner.lr(step - W)`, so the inner
/// schedule starts fresh after the warmup and the run lasts `W + inner_total` steps.
///
/// [`Warmup::linear_multiplicative`] is detectron2's form instead: the warmup factor
/// multiplies the inner schedule on the same step axis, `inner.lr(step) * factor(step)`
/// for `step < W` and `inner.lr(step)` after, so the run lasts `inner_total` steps.
///
/// ```
/// use keel_optim::{Cosine, LrSchedule, Warmup};
/// let s = Warmup::linear(Cosine::new(0.1, 100, 0.0)?, 10, 0.001)?;
/// assert!((s.lr(0) - 0.1 * 0.001).abs() < 1e-15);
/// assert!((s.lr(5) - 0.1 * (0.001 + 0.999 * 0.5)).abs() < 1e-15);
/// assert_eq!(s.lr(10), 0.1); // the cosine starts at step 10
/// assert!(Warmup::linear(Cosine::new(0.1, 100, 0.0)?, 10, 0.0).is_err());
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Warmup<S> {
    inner: S,
    warmup_steps: usize,
    ramp: Ramp,
    multiplicative: bool,
}

fn check_factor(op: &str, name: &str, f: f64) -> candle::Result<()> {
    if !(f > 0.0 && f <= 1.0) {
        candle::bail!("{op}: {name} ({f}) must lie in (0, 1]; warmup recipes use 0.001 to 0.1")
    }
    Ok(())
}

impl<S: LrSchedule> Warmup<S> {
    fn build(
        op: &str,
        name: &str,
        inner: S,
        warmup_steps: usize,
        ramp: Ramp,
        f: f64,
        multiplicative: bool,
    ) -> candle::Result<Self> {
        check_steps(op, "warmup_steps", warmup_steps)?;
        check_factor(op, name, f)?;
        Ok(Self {
            inner,
            warmup_steps,
            ramp,
            multiplicative,
        })
    }

    /// Linear warmup (PyTorch `SequentialLR([LinearLR(start_factor, total_iters = W),
    /// inner], [W])`): `inner.lr(0) * (start_factor + (1 - start_factor) * step / W)` for
    /// `step < W`, then `inner.lr(step - W)`. Errors when `warmup_steps == 0` or
    /// `start_factor` is outside (0, 1].
    pub fn linear(inner: S, warmup_steps: usize, start_factor: f64) -> candle::Result<Self> {
        let ramp = Ramp::Linear { start_factor };
        Self::build(
            "Warmup::linear",
            "start_factor",
            inner,
            warmup_steps,
            ramp,
            start_factor,
            false,
        )
    }

    /// Constant warmup (PyTorch `SequentialLR([ConstantLR(factor, total_iters = W),
    /// inner], [W])`): `inner.lr(0) * factor` for `step < W`, then `inner.lr(step - W)`.
    /// Errors when `warmup_steps == 0` or `factor` is outside (0, 1].
    pub fn constant(inner: S, warmup_steps: usize, factor: f64) -> candle::Result<Self> {
        let ramp = Ramp::Constant { factor };
        Self::build(
            "Warmup::constant",
            "factor",
            inner,
            warmup_steps,
            ramp,
            factor,
            false,
        )
    }

    /// Exponential warmup: `inner.lr(0) * start_factor^(1 - step / W)` for `step < W`
    /// (a geometric ramp from `start_factor` to 1), then `inner.lr(step - W)`. Errors
    /// when `warmup_steps == 0` or `start_factor` is outside (0, 1].
    pub fn exponential(inner: S, warmup_steps: usize, start_factor: f64) -> candle::Result<Self> {
        let ramp = Ramp::Exponential { start_factor };
        Self::build(
            "Warmup::exponential",
            "start_factor",
            inner,
            warmup_steps,
            ramp,
            start_factor,
            false,
        )
    }

    /// detectron2's linear warmup (`WarmupParamScheduler` with `rescale_interval =
    /// False`): `inner.lr(step) * (start_factor + (1 - start_factor) * step / W)` for
    /// `step < W`, then `inner.lr(step)`; the warmup eats into the inner schedule
    /// instead of delaying it. Errors like [`Warmup::linear`].
    pub fn linear_multiplicative(
        inner: S,
        warmup_steps: usize,
        start_factor: f64,
    ) -> candle::Result<Self> {
        let ramp = Ramp::Linear { start_factor };
        Self::build(
            "Warmup::linear_multiplicative",
            "start_factor",
            inner,
            warmup_steps,
            ramp,
            start_factor,
            true,
        )
    }

    /// The wrapped schedule.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The number of warmup steps.
    pub fn warmup_steps(&self) -> usize {
        self.warmup_steps
    }
}

impl<S: LrSchedule> LrSchedule for Warmup<S> {
    fn lr(&self, step: usize) -> f64 {
        let w = self.warmup_steps;
        match (self.multiplicative, step < w) {
            (false, true) => self.inner.lr(0) * self.ramp.factor(step, w),
            (false, false) => self.inner.lr(step - w),
            (true, true) => self.inner.lr(step) * self.ramp.factor(step, w),
            (true, false) => self.inner.lr(step),
        }
    }
}
