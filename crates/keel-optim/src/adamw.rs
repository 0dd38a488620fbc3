//! AdamW, exactly as `torch.optim.AdamW` (Loshchilov & Hutter, "Decoupled Weight Decay
//! Regularization", 2019), with the moments always in f32.
//!
//! candle-nn's AdamW keeps the moments in the parameter dtype, where `eps = 1e-8`
//! underflows in f16; here f16/bf16/f32 params all get f32 moments and f32 arithmetic.

use candle::{Tensor, Var};

use crate::grouped::{GroupHparams, Grouped, ParamState, SavedState, UpdateRule};
use crate::state;

/// Hyper-parameters of [`AdamW`]; `Default` is PyTorch's (`lr = 1e-3`,
/// `betas = (0.9, 0.999)`, `eps = 1e-8`, `weight_decay = 1e-2`).
///
/// ```
/// use keel_optim::AdamWConfig;
/// let cfg = AdamWConfig { lr: 3e-4, weight_decay: 0.05, ..Default::default() };
/// assert_eq!(cfg.beta2, 0.999);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment (running mean of the gradient).
    pub beta1: f64,
    /// Decay of the second moment (running mean of the squared gradient).
    pub beta2: f64,
    /// Added to the bias-corrected RMS of the gradient for stability.
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies params by `1 - lr * weight_decay`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl UpdateRule for AdamWConfig {
    const NAME: &'static str = "AdamW";
    type State = AdamWState;

    fn hparams(&self) -> GroupHparams {
        GroupHparams {
            lr: self.lr,
            weight_decay: self.weight_decay,
        }
    }

    fn validate(&self) -> candle::Result<()> {
        for (name, b, typical) in [("beta1", self.beta1, "0.9"), ("beta2", self.beta2, "0.999")] {
            if !(0.0..1.0).contains(&b) {
                candle::bail!(
                    "AdamW: {name} ({b}) must lie in [0, 1); the usual value is {typical}"
                )
            }
        }
        if !self.eps.is_finite() || self.eps < 0.0 {
            candle::bail!(
                "AdamW: eps ({}) must be finite and non-negative; the usual value is 1e-8",
                self.eps
            )
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            candle::bail!(
                "AdamW: weight_decay ({}) must be finite and non-negative; recipes use 1e-2 to 5e-2",
                self.weight_decay
            )
        }
        Ok(())
    }

    fn step(
        &self,
        hparams: &GroupHparams,
        param: Tensor,
        g: Tensor,
        state: &mut Option<AdamWState>,
    ) -> candle::Result<Tensor> {
        let (m, v, step) = match state.take() {
            Some(s) => (s.exp_avg, s.exp_avg_sq, s.step + 1),
            None => (g.zeros_like()?, g.zeros_like()?, 1),
        };
        let lr = hparams.lr;
        let mut param = param;
        if hparams.weight_decay != 0.0 {
            param = param.affine(1.0 - lr * hparams.weight_decay, 0.0)?;
        }
        // torch: exp_avg.lerp_(grad, 1 - beta1) == m + (1 - beta1) * (g - m)
        let m = (&m + (&g - &m)?.affine(1.0 - self.beta1, 0.0)?)?;
        let v = (v.affine(self.beta2, 0.0)? + g.sqr()?.affine(1.0 - self.beta2, 0.0)?)?;
        let bias_correction1 = 1.0 - self.beta1.powf(step as f64);
        let bias_correction2 = 1.0 - self.beta2.powf(step as f64);
        let step_size = lr / bias_correction1;
        let denom = (v.sqrt()? / bias_correction2.sqrt())?.affine(1.0, self.eps)?;
        let new = (param - (m.div(&denom)?).affine(step_size, 0.0)?)?;
        *state = Some(AdamWState {
            exp_avg: m,
            exp_avg_sq: v,
            step,
        });
        Ok(new)
    }

    /// The one-pass CPU form of [`UpdateRule::step`] ([`crate::fused`]).
    fn step_fused(
        &self,
        hparams: &GroupHparams,
        var: &Var,
        grad: &Tensor,
        state: &mut Option<AdamWState>,
    ) -> candle::Result<bool> {
        crate::fused::adamw(self, hparams, var, grad, state)
    }
}

/// The per-parameter state of [`AdamW`], saved as `state.{i}.step`, `state.{i}.exp_avg`
/// and `state.{i}.exp_avg_sq` (PyTorch's names).
#[derive(Clone, Debug)]
pub struct AdamWState {
    /// The first moment (running mean of the gradient), f32 (f64 for f64 params).
    pub exp_avg: Tensor,
    /// The second moment (running mean of the squared gradient).
    pub exp_avg_sq: Tensor,
    /// The number of steps this parameter has taken (its bias correction's `t`).
    pub step: usize,
}

impl ParamState for AdamWState {
    fn save(&self) -> candle::Result<Vec<(&'static str, Tensor)>> {
        Ok(vec![
            ("step", state::scalar(self.step as f64)?),
            ("exp_avg", self.exp_avg.clone()),
            ("exp_avg_sq", self.exp_avg_sq.clone()),
        ])
    }

    fn load(saved: &SavedState<'_>) -> candle::Result<Option<Self>> {
        if !saved.has("step") {
            return Ok(None);
        }
        Ok(Some(Self {
            step: saved.count("step")?,
            exp_avg: saved.tensor("exp_avg")?,
            exp_avg_sq: saved.tensor("exp_avg_sq")?,
        }))
    }
}

/// AdamW with PyTorch semantics: the [`Grouped`] core running [`AdamWConfig`]'s rule,
/// so it implements [`candle_nn::Optimizer`] (`AdamW::new(vars, cfg)`),
/// [`crate::StateDict`] (`lr`, `num_params`, `state.{i}.step`, `state.{i}.exp_avg`,
/// `state.{i}.exp_avg_sq`) and [`crate::DynOptimizer`], and has
/// `AdamW::with_groups(groups, cfg)` and `config()`.
///
/// Per parameter with a gradient `g` (params without one are skipped, and their step
/// count does not advance, as in PyTorch): `t += 1`; `p *= 1 - lr * wd`;
/// `m = lerp(m, g, 1 - beta1)`; `v = beta2 * v + (1 - beta2) * g^2`;
/// `p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`.
///
/// ```
/// use candle::{Device, Var};
/// use candle_nn::Optimizer;
/// use keel_optim::{AdamW, AdamWConfig};
/// let w = Var::new(&[1f32, -2.0], &Device::Cpu)?;
/// let cfg = AdamWConfig { lr: 0.1, weight_decay: 0.0, ..Default::default() };
/// let mut opt = AdamW::new(vec![w.clone()], cfg)?;
/// opt.backward_step(&w.as_tensor().sqr()?.sum_all()?)?;
/// // The first Adam step moves every coordinate by about lr against its gradient sign.
/// let v = w.to_vec1::<f32>()?;
/// assert!((v[0] - 0.9).abs() < 1e-5 && (v[1] + 1.9).abs() < 1e-5);
/// # Ok::<(), candle::Error>(())
/// ```
pub type AdamW = Grouped<AdamWConfig>;
