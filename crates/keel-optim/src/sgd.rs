//! Stochastic gradient descent with momentum, dampening, Nesterov momentum and
//! L2 weight decay, exactly as `torch.optim.SGD` (Sutskever et al. 2013 for Nesterov).

use std::collections::HashMap;

use candle::backprop::GradStore;
use candle::{Tensor, Var};

use crate::param_group::ParamGroup;
use crate::state;
use crate::traits::StateDict;

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

impl SgdConfig {
    fn validate(&self) -> candle::Result<()> {
        crate::schedule::check_lr("Sgd", "lr", self.lr)?;
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
}

#[derive(Debug)]
struct Param {
    var: Var,
    buf: Option<Tensor>,
}

#[derive(Debug)]
struct Group {
    lr_mult: f64,
    weight_decay: f64,
    params: Vec<Param>,
}

/// SGD with PyTorch semantics, implementing [`candle_nn::Optimizer`].
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
#[derive(Debug)]
pub struct Sgd {
    cfg: SgdConfig,
    groups: Vec<Group>,
}

impl Sgd {
    /// SGD over parameter groups (per-group LR multiplier and weight decay).
    pub fn with_groups(groups: Vec<ParamGroup>, cfg: SgdConfig) -> candle::Result<Self> {
        cfg.validate()?;
        let mut out = Vec::with_capacity(groups.len());
        for (i, g) in groups.into_iter().enumerate() {
            g.validate("Sgd", i)?;
            out.push(Group {
                lr_mult: g.lr_mult,
                weight_decay: g.weight_decay.unwrap_or(cfg.weight_decay),
                params: g
                    .vars
                    .into_iter()
                    .filter(|v| v.dtype().is_float())
                    .map(|var| Param { var, buf: None })
                    .collect(),
            });
        }
        Ok(Self { cfg, groups: out })
    }

    /// The configuration (its `lr` follows `set_learning_rate`).
    pub fn config(&self) -> &SgdConfig {
        &self.cfg
    }

    fn params(&self) -> impl Iterator<Item = &Param> {
        self.groups.iter().flat_map(|g| g.params.iter())
    }
}

impl StateDict for Sgd {
    /// The state: `lr`, `num_params`, and `state.{i}.momentum_buffer` for every param
    /// (flat index across groups) that has one.
    fn state_dict(&self) -> candle::Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        out.insert("lr".to_string(), state::scalar(self.cfg.lr)?);
        out.insert(
            "num_params".to_string(),
            state::scalar(self.params().count() as f64)?,
        );
        for (i, p) in self.params().enumerate() {
            if let Some(buf) = &p.buf {
                out.insert(format!("state.{i}.momentum_buffer"), buf.clone());
            }
        }
        Ok(out)
    }

    /// Restores a state from [`Sgd::state_dict`]; the optimizer must be built over the
    /// same parameters in the same order.
    fn load_state_dict(&mut self, st: &HashMap<String, Tensor>) -> candle::Result<()> {
        state::check_count("Sgd", st, self.params().count())?;
        let lr = state::get_scalar("Sgd", st, "lr")?;
        let mut bufs = Vec::new();
        for (i, p) in self.params().enumerate() {
            let key = format!("state.{i}.momentum_buffer");
            let dtype = state::compute_dtype(p.var.dtype());
            bufs.push(match st.contains_key(&key) {
                true => Some(state::get_like("Sgd", st, &key, p.var.as_tensor(), dtype)?),
                false => None,
            });
        }
        let params = self.groups.iter_mut().flat_map(|g| g.params.iter_mut());
        for (p, buf) in params.zip(bufs) {
            p.buf = buf;
        }
        self.cfg.lr = lr;
        Ok(())
    }
}

impl candle_nn::Optimizer for Sgd {
    type Config = SgdConfig;

    fn new(vars: Vec<Var>, config: SgdConfig) -> candle::Result<Self> {
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
                let param = p.var.as_tensor().detach().to_dtype(dtype)?;
                let mut d_p = grad.detach().to_dtype(dtype)?;
                if group.weight_decay != 0.0 {
                    d_p = (d_p + param.affine(group.weight_decay, 0.0)?)?;
                }
                if cfg.momentum != 0.0 {
                    let buf = match &p.buf {
                        None => d_p.copy()?,
                        Some(buf) => {
                            (buf.affine(cfg.momentum, 0.0)?
                                + d_p.affine(1.0 - cfg.dampening, 0.0)?)?
                        }
                    };
                    d_p = if cfg.nesterov {
                        (d_p + buf.affine(cfg.momentum, 0.0)?)?
                    } else {
                        buf.clone()
                    };
                    p.buf = Some(buf);
                }
                let new = (param - d_p.affine(lr, 0.0)?)?;
                p.var.set(&new.to_dtype(p.var.dtype())?)?;
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
