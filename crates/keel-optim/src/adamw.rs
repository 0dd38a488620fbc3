//! AdamW, exactly as `torch.optim.AdamW` (Loshchilov & Hutter, "Decoupled Weight Decay
//! Regularization", 2019), with the moments always in f32.
//!
//! candle-nn's AdamW keeps the moments in the parameter dtype, where `eps = 1e-8`
//! underflows in f16; here f16/bf16/f32 params all get f32 moments and f32 arithmetic.

use std::collections::HashMap;

use candle::backprop::GradStore;
use candle::{Tensor, Var};

use crate::param_group::ParamGroup;
use crate::state;
use crate::traits::StateDict;

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

impl AdamWConfig {
    fn validate(&self) -> candle::Result<()> {
        crate::schedule::check_lr("AdamW", "lr", self.lr)?;
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
}

#[derive(Debug)]
struct Param {
    var: Var,
    /// `(exp_avg, exp_avg_sq)`, created on the first step like PyTorch's lazy state.
    moments: Option<(Tensor, Tensor)>,
    step: usize,
}

#[derive(Debug)]
struct Group {
    lr_mult: f64,
    weight_decay: f64,
    params: Vec<Param>,
}

/// AdamW with PyTorch semantics, implementing [`candle_nn::Optimizer`].
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
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    groups: Vec<Group>,
}

impl AdamW {
    /// AdamW over parameter groups (per-group LR multiplier and weight decay).
    pub fn with_groups(groups: Vec<ParamGroup>, cfg: AdamWConfig) -> candle::Result<Self> {
        cfg.validate()?;
        let mut out = Vec::with_capacity(groups.len());
        for (i, g) in groups.into_iter().enumerate() {
            g.validate("AdamW", i)?;
            out.push(Group {
                lr_mult: g.lr_mult,
                weight_decay: g.weight_decay.unwrap_or(cfg.weight_decay),
                params: g
                    .vars
                    .into_iter()
                    .filter(|v| v.dtype().is_float())
                    .map(|var| Param {
                        var,
                        moments: None,
                        step: 0,
                    })
                    .collect(),
            });
        }
        Ok(Self { cfg, groups: out })
    }

    /// The configuration (its `lr` follows `set_learning_rate`).
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    fn params(&self) -> impl Iterator<Item = &Param> {
        self.groups.iter().flat_map(|g| g.params.iter())
    }
}

impl StateDict for AdamW {
    /// The state: `lr`, `num_params`, and for every param (flat index across groups)
    /// that has stepped, `state.{i}.step`, `state.{i}.exp_avg`, `state.{i}.exp_avg_sq`.
    fn state_dict(&self) -> candle::Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        out.insert("lr".to_string(), state::scalar(self.cfg.lr)?);
        out.insert(
            "num_params".to_string(),
            state::scalar(self.params().count() as f64)?,
        );
        for (i, p) in self.params().enumerate() {
            if let Some((m, v)) = &p.moments {
                out.insert(format!("state.{i}.step"), state::scalar(p.step as f64)?);
                out.insert(format!("state.{i}.exp_avg"), m.clone());
                out.insert(format!("state.{i}.exp_avg_sq"), v.clone());
            }
        }
        Ok(out)
    }

    /// Restores a state from [`AdamW::state_dict`]; the optimizer must be built over the
    /// same parameters in the same order.
    fn load_state_dict(&mut self, st: &HashMap<String, Tensor>) -> candle::Result<()> {
        state::check_count("AdamW", st, self.params().count())?;
        let lr = state::get_scalar("AdamW", st, "lr")?;
        let mut loaded = Vec::new();
        for (i, p) in self.params().enumerate() {
            let key = format!("state.{i}.step");
            if !st.contains_key(&key) {
                loaded.push((None, 0));
                continue;
            }
            let step = state::get_count("AdamW", st, &key)?;
            let dtype = state::compute_dtype(p.var.dtype());
            let like = p.var.as_tensor();
            let m = state::get_like("AdamW", st, &format!("state.{i}.exp_avg"), like, dtype)?;
            let v = state::get_like("AdamW", st, &format!("state.{i}.exp_avg_sq"), like, dtype)?;
            loaded.push((Some((m, v)), step));
        }
        let params = self.groups.iter_mut().flat_map(|g| g.params.iter_mut());
        for (p, (moments, step)) in params.zip(loaded) {
            p.moments = moments;
            p.step = step;
        }
        self.cfg.lr = lr;
        Ok(())
    }
}

impl candle_nn::Optimizer for AdamW {
    type Config = AdamWConfig;

    fn new(vars: Vec<Var>, config: AdamWConfig) -> candle::Result<Self> {
        Self::with_groups(vec![ParamGroup::new(vars)], config)
    }

    fn step(&mut self, grads: &GradStore) -> candle::Result<()> {
        let cfg = self.cfg;
        for group in self.groups.iter_mut() {
            let lr = cfg.lr * group.lr_mult;
            for p in group.params.iter_mut() {
                let Some(grad) = grads.get(&p.var) else {
                    continue;
                };
                let dtype = state::compute_dtype(p.var.dtype());
                let g = grad.detach().to_dtype(dtype)?;
                let (m, v) = match &p.moments {
                    Some((m, v)) => (m.clone(), v.clone()),
                    None => (g.zeros_like()?, g.zeros_like()?),
                };
                let step = p.step + 1;
                let mut param = p.var.as_tensor().detach().to_dtype(dtype)?;
                if group.weight_decay != 0.0 {
                    param = param.affine(1.0 - lr * group.weight_decay, 0.0)?;
                }
                // torch: exp_avg.lerp_(grad, 1 - beta1) == m + (1 - beta1) * (g - m)
                let m = (&m + (&g - &m)?.affine(1.0 - cfg.beta1, 0.0)?)?;
                let v = (v.affine(cfg.beta2, 0.0)? + g.sqr()?.affine(1.0 - cfg.beta2, 0.0)?)?;
                let bias_correction1 = 1.0 - cfg.beta1.powf(step as f64);
                let bias_correction2 = 1.0 - cfg.beta2.powf(step as f64);
                let step_size = lr / bias_correction1;
                let denom = (v.sqrt()? / bias_correction2.sqrt())?.affine(1.0, cfg.eps)?;
                let new = (param - (m.div(&denom)?).affine(step_size, 0.0)?)?;
                p.var.set(&new.to_dtype(p.var.dtype())?)?;
                p.moments = Some((m, v));
                p.step = step;
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
}
