//! Exponential moving average of the weights (Polyak averaging; the decay warmup of
//! TensorFlow's `ExponentialMovingAverage(num_updates=..)` and timm's `ModelEmaV3`, or
//! YOLOv5's exponential ramp), kept in f32, for stable evaluation of small-batch runs.

use std::collections::HashMap;

use candle::{Tensor, Var};

use crate::state;
use crate::traits::StateDict;

/// How the effective decay ramps up over the first updates (`n` = updates done so far).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EmaWarmup {
    /// No warmup: always `decay`.
    None,
    /// TensorFlow / timm: `min(decay, (1 + n) / (10 + n))`.
    Tf,
    /// YOLOv5: `decay * (1 - exp(-n / tau))` with `tau` in updates (YOLOv5 uses 2000).
    Exponential {
        /// The ramp's time constant, in updates.
        tau: f64,
    },
}

/// Configuration of [`Ema`].
///
/// ```
/// use keel_optim::{EmaConfig, EmaWarmup};
/// let cfg = EmaConfig { decay: 0.999, warmup: EmaWarmup::Exponential { tau: 2000.0 } };
/// assert_eq!(EmaConfig::default().warmup, EmaWarmup::Tf);
/// # let _ = cfg;
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmaConfig {
    /// The decay once warmed up: `shadow = decay * shadow + (1 - decay) * param`.
    pub decay: f64,
    /// The decay warmup.
    pub warmup: EmaWarmup,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            decay: 0.9999,
            warmup: EmaWarmup::Tf,
        }
    }
}

/// An f32 shadow copy of some vars, updated after each optimizer step.
///
/// ```
/// use candle::{Device, Var};
/// use keel_optim::{Ema, EmaConfig, EmaWarmup};
/// let w = Var::new(&[0f32], &Device::Cpu)?;
/// let mut ema = Ema::new(vec![w.clone()], EmaConfig { decay: 0.5, warmup: EmaWarmup::None })?;
/// w.set(&candle::Tensor::new(&[1f32], &Device::Cpu)?)?;
/// ema.update()?;
/// assert_eq!(ema.shadow()[0].to_vec1::<f32>()?, vec![0.5]);
/// ema.copy_to_vars()?; // evaluate with the averaged weights
/// assert_eq!(w.to_vec1::<f32>()?, vec![0.5]);
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Debug)]
pub struct Ema {
    cfg: EmaConfig,
    vars: Vec<Var>,
    shadow: Vec<Tensor>,
    updates: usize,
}

impl Ema {
    /// Starts the average at the vars' current values; errors when `decay` is outside
    /// [0, 1] or `tau` is not finite and positive.
    pub fn new(vars: Vec<Var>, cfg: EmaConfig) -> candle::Result<Self> {
        if !(0.0..=1.0).contains(&cfg.decay) {
            candle::bail!(
                "Ema: decay ({}) must lie in [0, 1]; typical values are 0.999 to 0.9999",
                cfg.decay
            )
        }
        if let EmaWarmup::Exponential { tau } = cfg.warmup {
            if !(tau.is_finite() && tau > 0.0) {
                candle::bail!(
                    "Ema: warmup tau ({tau}) must be finite and positive; YOLOv5 uses 2000"
                )
            }
        }
        let shadow = vars
            .iter()
            .map(|v| {
                v.as_tensor()
                    .detach()
                    .to_dtype(state::compute_dtype(v.dtype()))?
                    .copy()
            })
            .collect::<candle::Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            vars,
            shadow,
            updates: 0,
        })
    }

    /// The decay the next [`Ema::update`] will use.
    pub fn current_decay(&self) -> f64 {
        let n = self.updates as f64;
        match self.cfg.warmup {
            EmaWarmup::None => self.cfg.decay,
            EmaWarmup::Tf => self.cfg.decay.min((1.0 + n) / (10.0 + n)),
            EmaWarmup::Exponential { tau } => self.cfg.decay * (1.0 - (-n / tau).exp()),
        }
    }

    /// Number of updates so far.
    pub fn updates(&self) -> usize {
        self.updates
    }

    /// Folds the vars' current values into the average.
    pub fn update(&mut self) -> candle::Result<()> {
        let d = self.current_decay();
        for (s, v) in self.shadow.iter_mut().zip(&self.vars) {
            let p = v.as_tensor().detach().to_dtype(s.dtype())?;
            // lerp(shadow, p, 1 - d), as timm / torch._foreach_lerp_
            *s = (&*s + (p - &*s)?.affine(1.0 - d, 0.0)?)?;
        }
        self.updates += 1;
        Ok(())
    }

    /// The averaged weights (f32, or f64 for f64 vars), in the order of the vars.
    pub fn shadow(&self) -> &[Tensor] {
        &self.shadow
    }

    /// Writes the averaged weights into the vars (back them up first to resume training).
    pub fn copy_to_vars(&self) -> candle::Result<()> {
        for (s, v) in self.shadow.iter().zip(&self.vars) {
            v.set(&s.to_dtype(v.dtype())?)?;
        }
        Ok(())
    }
}

impl StateDict for Ema {
    /// The state: `updates`, `num_params` and `shadow.{i}`.
    fn state_dict(&self) -> candle::Result<HashMap<String, Tensor>> {
        let mut out = state::scalars(&[
            ("updates", self.updates as f64),
            ("num_params", self.shadow.len() as f64),
        ])?;
        for (i, s) in self.shadow.iter().enumerate() {
            out.insert(format!("shadow.{i}"), s.clone());
        }
        Ok(out)
    }

    /// Restores a state from [`Ema::state_dict`] for the same vars.
    fn load_state_dict(&mut self, st: &HashMap<String, Tensor>) -> candle::Result<()> {
        state::check_count("Ema", st, self.shadow.len())?;
        let updates = state::get_count("Ema", st, "updates")?;
        let shadow = self
            .shadow
            .iter()
            .enumerate()
            .map(|(i, s)| state::get_like("Ema", st, &format!("shadow.{i}"), s, s.dtype()))
            .collect::<candle::Result<Vec<_>>>()?;
        self.shadow = shadow;
        self.updates = updates;
        Ok(())
    }
}
