//! Dynamic loss scaling for f16 training, exactly as `torch.amp.GradScaler`
//! (Micikevicius et al., "Mixed Precision Training", 2018).
//!
//! f16 has 5 exponent bits: gradients below ~6e-8 flush to zero. Scaling the loss by a
//! large factor moves the backward pass into range; the gradients are unscaled (in f32,
//! on the f32 master weights) before the optimizer step. When a scaled gradient
//! overflows to inf/NaN the step is skipped and the scale backs off; after
//! `growth_interval` clean steps it grows again.
//!
//! bf16 has f32's 8 exponent bits, so bf16 training needs no scaler: run the forward in
//! bf16 ([`crate::mixed`]) and step the f32 master weights directly.

use std::collections::HashMap;

use candle::backprop::GradStore;
use candle::{DType, Tensor, Var};

use crate::state;
use crate::traits::{DynOptimizer, StateDict};

/// Hyper-parameters of [`GradScaler`]; `Default` is PyTorch's (65536, 2.0, 0.5, 2000).
///
/// ```
/// use keel_optim::GradScalerConfig;
/// let cfg = GradScalerConfig { init_scale: 1024.0, ..Default::default() };
/// assert_eq!(cfg.growth_interval, 2000);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradScalerConfig {
    /// The initial loss scale (stored in f32, like PyTorch's scale tensor).
    pub init_scale: f64,
    /// The scale is multiplied by this after `growth_interval` consecutive clean steps.
    pub growth_factor: f64,
    /// The scale is multiplied by this on every step with an inf/NaN gradient.
    pub backoff_factor: f64,
    /// Number of consecutive clean steps before the scale grows.
    pub growth_interval: usize,
}

impl Default for GradScalerConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// Dynamic loss scaler with `torch.amp.GradScaler` semantics.
///
/// One iteration: `let loss = scaler.scale(&loss)?; let mut grads = loss.backward()?;`
/// optionally [`GradScaler::unscale`] then clip, then
/// `let stepped = scaler.step(&mut opt, &mut grads, &vars)?; scaler.update(!stepped);`.
/// A skipped step leaves the weights AND the optimizer state untouched.
///
/// Note: the scale multiplies the loss in f32, so compute the loss in f32 (cast the
/// logits up first); the scaled gradient enters the f16 graph through that cast.
///
/// ```
/// use candle::{DType, Device, Var};
/// use candle_nn::Optimizer;
/// use keel_optim::{GradScaler, GradScalerConfig, Sgd, SgdConfig};
/// let w = Var::new(&[1f32, 2.0], &Device::Cpu)?;
/// let mut opt = Sgd::new(vec![w.clone()], SgdConfig { lr: 0.1, ..Default::default() })?;
/// let mut scaler = GradScaler::new(GradScalerConfig { init_scale: 1024.0, ..Default::default() })?;
/// // forward in f16 from the f32 master weights, loss in f32
/// let loss = w.as_tensor().to_dtype(DType::F16)?.sqr()?.sum_all()?.to_dtype(DType::F32)?;
/// let mut grads = scaler.scale(&loss)?.backward()?;
/// let stepped = scaler.step(&mut opt, &mut grads, std::slice::from_ref(&w))?;
/// scaler.update(!stepped);
/// assert!(stepped);
/// assert_eq!(w.to_vec1::<f32>()?, vec![0.8, 1.6]);
/// assert_eq!(scaler.current_scale(), 1024.0);
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct GradScaler {
    cfg: GradScalerConfig,
    scale: f32,
    growth_tracker: usize,
    /// `Some(found_inf)` once this iteration's gradients have been unscaled; `Some(None)`
    /// while a deferred unscale waits for its verdict.
    unscaled: Option<Option<bool>>,
}

impl GradScaler {
    /// A scaler; errors when `init_scale` is not finite and positive in f32,
    /// `growth_factor <= 1`, `backoff_factor` is outside (0, 1), or
    /// `growth_interval == 0`.
    pub fn new(cfg: GradScalerConfig) -> candle::Result<Self> {
        let s = cfg.init_scale as f32;
        if !(s.is_finite() && s > 0.0) {
            candle::bail!(
                "GradScaler: init_scale ({}) must be finite and positive in f32; PyTorch's default is 65536",
                cfg.init_scale
            )
        }
        if !(cfg.growth_factor.is_finite() && cfg.growth_factor > 1.0) {
            candle::bail!(
                "GradScaler: growth_factor ({}) must be finite and > 1; the default is 2.0",
                cfg.growth_factor
            )
        }
        if !(cfg.backoff_factor > 0.0 && cfg.backoff_factor < 1.0) {
            candle::bail!(
                "GradScaler: backoff_factor ({}) must lie in (0, 1); the default is 0.5",
                cfg.backoff_factor
            )
        }
        if cfg.growth_interval == 0 {
            candle::bail!("GradScaler: growth_interval (0) must be at least 1; the default is 2000")
        }
        Ok(Self {
            cfg,
            scale: s,
            growth_tracker: 0,
            unscaled: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &GradScalerConfig {
        &self.cfg
    }

    /// The current loss scale.
    pub fn current_scale(&self) -> f64 {
        self.scale as f64
    }

    /// Consecutive clean steps since the last growth or backoff.
    pub fn growth_tracker(&self) -> usize {
        self.growth_tracker
    }

    /// The loss multiplied by the current scale, in f32 (the loss is cast to f32 first).
    pub fn scale(&self, loss: &Tensor) -> candle::Result<Tensor> {
        loss.to_dtype(DType::F32)?.affine(self.scale as f64, 0.0)
    }

    /// Divides the gradients of `vars` by the scale in place (torch's
    /// `unscale_`), and returns whether any of them holds an inf or NaN. Call it before
    /// clipping; [`GradScaler::step`] then does not unscale a second time. The
    /// multiplier is `1 / scale` rounded to f32, as in PyTorch. Reads one scalar on the
    /// host (as PyTorch's `GradScaler.step` reads `found_inf` once per step).
    pub fn unscale(&mut self, grads: &mut GradStore, vars: &[Var]) -> candle::Result<bool> {
        let probe = self.unscale_deferred(grads, vars)?;
        let found_inf = match probe {
            Some(p) => {
                crate::host_read::note();
                !p.to_scalar::<f32>()?.is_finite()
            }
            None => false,
        };
        self.set_found_inf(found_inf)?;
        Ok(found_inf)
    }

    /// [`GradScaler::unscale`] without the host read: unscales the gradients and returns
    /// the finiteness probe, an f32 scalar on the gradients' device that is finite exactly
    /// when every gradient is (`None` without gradients: nothing can overflow). Read it
    /// together with the step's other scalars (one transfer) and pass the verdict to
    /// [`GradScaler::set_found_inf`] before [`GradScaler::step`].
    pub fn unscale_deferred(
        &mut self,
        grads: &mut GradStore,
        vars: &[Var],
    ) -> candle::Result<Option<Tensor>> {
        if let Some(found) = self.unscaled {
            candle::bail!(
                "GradScaler: unscale was already called since the last update (found_inf = {found:?}); call update() after each step"
            )
        }
        let inv = (1.0f64 / self.scale as f64) as f32 as f64;
        let mut checks = Vec::new();
        for var in vars {
            if let Some(g) = grads.get(var) {
                // (x - x) is 0 for every finite x and NaN for inf/NaN, so the sum is NaN
                // exactly when some entry is non-finite (no overflow from large values).
                let g32 = g.to_dtype(DType::F32)?;
                #[allow(clippy::eq_op)] // reason: x - x is the finiteness probe described above
                let probe = (&g32 - &g32)?;
                checks.push(probe.sum_all()?);
                let unscaled = g.affine(inv, 0.0)?;
                grads.insert(var.as_tensor(), unscaled);
            }
        }
        self.unscaled = Some(None);
        crate::clip::stacked_sum(checks)
    }

    /// The verdict on the probe of [`GradScaler::unscale_deferred`]: whether a gradient
    /// was inf or NaN. Errors unless a deferred unscale is waiting for it.
    pub fn set_found_inf(&mut self, found_inf: bool) -> candle::Result<()> {
        if self.unscaled != Some(None) {
            candle::bail!(
                "GradScaler::set_found_inf: no unscale_deferred is waiting for its verdict (state {:?}); call unscale_deferred first, once per step",
                self.unscaled
            )
        }
        self.unscaled = Some(Some(found_inf));
        Ok(())
    }

    /// Unscales (unless [`GradScaler::unscale`] already ran) and calls `opt.step`
    /// unless a gradient is inf/NaN. Returns whether the optimizer stepped; pass
    /// `!stepped` to [`GradScaler::update`].
    pub fn step(
        &mut self,
        opt: &mut dyn DynOptimizer,
        grads: &mut GradStore,
        vars: &[Var],
    ) -> candle::Result<bool> {
        let found_inf = match self.unscaled {
            Some(Some(found)) => found,
            Some(None) => candle::bail!(
                "GradScaler::step: the deferred unscale has no verdict; read its probe and call set_found_inf first"
            ),
            None => self.unscale(grads, vars)?,
        };
        if found_inf {
            return Ok(false);
        }
        opt.step(grads)?;
        Ok(true)
    }

    /// Updates the scale after a step, exactly like `torch._amp_update_scale_`: on
    /// overflow the scale is multiplied by `backoff_factor` and the tracker reset;
    /// otherwise after `growth_interval` consecutive clean steps it is multiplied by
    /// `growth_factor` (kept only if finite in f32) and the tracker reset.
    pub fn update(&mut self, found_inf: bool) {
        self.unscaled = None;
        if found_inf {
            self.scale = (self.scale as f64 * self.cfg.backoff_factor) as f32;
            self.growth_tracker = 0;
            return;
        }
        let successful = self.growth_tracker + 1;
        if successful == self.cfg.growth_interval {
            let grown = (self.scale as f64 * self.cfg.growth_factor) as f32;
            if grown.is_finite() {
                self.scale = grown;
            }
            self.growth_tracker = 0;
        } else {
            self.growth_tracker = successful;
        }
    }
}

impl StateDict for GradScaler {
    /// The state, like PyTorch's `GradScaler.state_dict()`: `scale`, `growth_tracker`,
    /// `growth_factor`, `backoff_factor` and `growth_interval`.
    fn state_dict(&self) -> candle::Result<HashMap<String, Tensor>> {
        state::scalars(&[
            ("scale", self.scale as f64),
            ("growth_tracker", self.growth_tracker as f64),
            ("growth_factor", self.cfg.growth_factor),
            ("backoff_factor", self.cfg.backoff_factor),
            ("growth_interval", self.cfg.growth_interval as f64),
        ])
    }

    /// Restores a state from [`GradScaler::state_dict`], config included (as PyTorch's
    /// `load_state_dict` does); the loaded values are validated like [`GradScaler::new`].
    fn load_state_dict(&mut self, st: &HashMap<String, Tensor>) -> candle::Result<()> {
        let op = "GradScaler";
        let cfg = GradScalerConfig {
            init_scale: state::get_scalar(op, st, "scale")?,
            growth_factor: state::get_scalar(op, st, "growth_factor")?,
            backoff_factor: state::get_scalar(op, st, "backoff_factor")?,
            growth_interval: state::get_count(op, st, "growth_interval")?,
        };
        let growth_tracker = state::get_count(op, st, "growth_tracker")?;
        let loaded = Self::new(cfg)?;
        *self = Self {
            cfg: GradScalerConfig {
                init_scale: self.cfg.init_scale,
                ..cfg
            },
            growth_tracker,
            ..loaded
        };
        Ok(())
    }
}
