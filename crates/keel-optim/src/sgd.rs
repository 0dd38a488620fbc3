//! Stochastic gradient descent with momentum, dampening, Nesterov momentum and
//! L2 weight decay, exactly as `torch.optim.SGD` (Sutskever et al. 2013 for Nesterov).

use candle::{Tensor, Var};

use crate::grouped::{GroupHparams, Grouped, ParamState, SavedState, UpdateRule};

/// Hyper-parameters of [`Sgd`]; `Default` is PyTorch's (`lr = 1e-3`, everything else 0).
///
/// ```
/// use keel_optim::SgdConfig;
/// let cfg = SgdConfig { lr: 0.02, momentum: 0.9, weight_decay: 1e-4, ..Default::default() };
/// assert!(!cfg.nesterov);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 disables the momentum buffer).
    pub momentum: f64,
    /// Dampening for momentum: the gradient enters the buffer with weight `1 - dampening`.
    pub dampening: f64,
    /// L2 penalty added to the gradient (`grad + weight_decay * param`).
    pub weight_decay: f64,
    /// Nesterov momentum (requires `momentum > 0` and `dampening == 0`).
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

impl UpdateRule for SgdConfig {
    const NAME: &'static str = "Sgd";
    type State = SgdState;

    fn hparams(&self) -> GroupHparams {
        GroupHparams {
            lr: self.lr,
            weight_decay: self.weight_decay,
        }
    }

    fn validate(&self) -> candle::Result<()> {
        if !self.momentum.is_finite() || self.momentum < 0.0 {
            candle::bail!(
                "Sgd: momentum ({}) must be finite and non-negative; recipes use 0.9",
                self.momentum
            )
        }
        if !self.dampening.is_finite() {
            candle::bail!(
                "Sgd: dampening ({}) must be finite; use 0.0",
                self.dampening
            )
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            candle::bail!(
                "Sgd: weight_decay ({}) must be finite and non-negative; recipes use 1e-4 to 5e-4",
                self.weight_decay
            )
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            candle::bail!(
                "Sgd: nesterov needs momentum > 0 and dampening == 0 (got momentum {}, dampening {}); set momentum 0.9, dampening 0.0",
                self.momentum,
                self.dampening
            )
        }
        Ok(())
    }

    fn step(
        &self,
        hparams: &GroupHparams,
        param: Tensor,
        grad: Tensor,
        state: &mut Option<SgdState>,
    ) -> candle::Result<Tensor> {
        let mut d_p = grad;
        if hparams.weight_decay != 0.0 {
            d_p = (d_p + param.affine(hparams.weight_decay, 0.0)?)?;
        }
        if self.momentum != 0.0 {
            let buf = match state {
                None => d_p.copy()?,
                Some(s) => {
                    (s.momentum_buffer.affine(self.momentum, 0.0)?
                        + d_p.affine(1.0 - self.dampening, 0.0)?)?
                }
            };
            d_p = if self.nesterov {
                (d_p + buf.affine(self.momentum, 0.0)?)?
            } else {
                buf.clone()
            };
            *state = Some(SgdState {
                momentum_buffer: buf,
            });
        }
        param - d_p.affine(hparams.lr, 0.0)?
    }

    /// The one-pass CPU form of [`UpdateRule::step`] ([`crate::fused`]).
    fn step_fused(
        &self,
        hparams: &GroupHparams,
        var: &Var,
        grad: &Tensor,
        state: &mut Option<SgdState>,
    ) -> candle::Result<bool> {
        crate::fused::sgd(self, hparams, var, grad, state)
    }
}

/// The per-parameter state of [`Sgd`], saved as `state.{i}.momentum_buffer`.
#[derive(Clone, Debug)]
pub struct SgdState {
    /// The momentum buffer (f32, or f64 for f64 params); only with `momentum > 0`.
    pub momentum_buffer: Tensor,
}

impl ParamState for SgdState {
    fn save(&self) -> candle::Result<Vec<(&'static str, Tensor)>> {
        Ok(vec![("momentum_buffer", self.momentum_buffer.clone())])
    }

    fn load(saved: &SavedState<'_>) -> candle::Result<Option<Self>> {
        if !saved.has("momentum_buffer") {
            return Ok(None);
        }
        let momentum_buffer = saved.tensor("momentum_buffer")?;
        Ok(Some(Self { momentum_buffer }))
    }
}

/// SGD with PyTorch semantics: the [`Grouped`] core running [`SgdConfig`]'s rule, so it
/// implements [`candle_nn::Optimizer`] (`Sgd::new(vars, cfg)`), [`crate::StateDict`]
/// (`lr`, `num_params`, `state.{i}.momentum_buffer`) and [`crate::DynOptimizer`], and
/// has `Sgd::with_groups(groups, cfg)` and `config()`.
///
/// Per parameter with a gradient `g` (params without one are skipped):
/// `g += wd * p`; with momentum the buffer is `g` on the first step and
/// `momentum * buf + (1 - dampening) * g` after; the update direction is the buffer, or
/// `g + momentum * buf` with Nesterov; `p -= lr * direction`. Arithmetic and the
/// momentum buffer are f32 for f16/bf16/f32 params (f64 for f64 params).
///
/// ```
/// use candle::{Device, Var};
/// use candle_nn::Optimizer;
/// use keel_optim::{Sgd, SgdConfig};
/// let w = Var::new(&[1f32, -1.0], &Device::Cpu)?;
/// let cfg = SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() };
/// let mut opt = Sgd::new(vec![w.clone()], cfg)?;
/// for _ in 0..2 {
///     let loss = w.as_tensor().sqr()?.sum_all()?; // grad 2w
///     opt.backward_step(&loss)?;
/// }
/// // step 1: buf = 2, w = 0.8; step 2: buf = 0.9 * 2 + 1.6 = 3.4, w = 0.8 - 0.34
/// assert!((w.to_vec1::<f32>()?[0] - 0.46).abs() < 1e-6);
/// # Ok::<(), candle::Error>(())
/// ```
pub type Sgd = Grouped<SgdConfig>;
