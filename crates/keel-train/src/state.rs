//! The state of a training loop and its step: [`TrainState`] holds the optimizer, the loss
//! scaler, the weight EMA, the stability monitor, the gradient accumulator and the step
//! count; [`TrainState::step`] runs one optimizer step the way PyTorch's AMP recipe does
//! (<https://pytorch.org/docs/stable/notes/amp_examples.html>): forward, loss and backward
//! per micro-batch, unscale, clip (one global L2 norm), step unless a gradient or the loss
//! is not finite, EMA update, monitor record. [`TrainState::snapshot`] and
//! [`TrainState::restore`] turn it into a keel [`Checkpoint`] and back, so a resumed run
//! continues bit for bit.
//!
//! Windowed reads (issue 9): on a GPU, every host read of a tensor (the loss's
//! `to_scalar`, the gradient norm) waits for all the work queued before it, so a step that
//! reads its scalars cannot overlap with the next. [`TrainState::step`] reads at once (a
//! read per micro-batch loss plus one for the gradient norm, and one for the scaler's
//! overflow check with f16). With [`TrainConfig::read_every`] N, [`TrainState::launch`]
//! runs a step and keeps its scalars (losses, norm, skip flag, a guard's weights check) on
//! the device, and [`TrainState::flush`] (or [`crate::Guard::flush`]) reads the whole
//! window in one transfer and records every step in the monitor in order, so its history,
//! alarms and the health report stay per step. A loop cannot forget the flush: `launch`
//! returns true when the window is full and errors on the next call until it is read, and
//! [`TrainState::snapshot`] refuses unread steps. [`keel_optim::host_read`] counts keel's
//! reads (f32: `step` reads 2 per step with one micro-batch, a window of 20 reads once; f16
//! reads once per step, as PyTorch's `GradScaler.step` does). On the CPU a windowed run
//! equals a per-step run bit for bit (losses, norms, monitor, weights, guard rollbacks),
//! except after a step skipped on the device with an optimizer that has state (see
//! [`StepOutcome::skipped_on_device`]) and for a non-finite norm with skipping off
//! (clipped as PyTorch does, [`keel_optim::clip_grad_norm_device`]).
//!
//! Randomness: the state holds no RNG. Derive every random draw from `(seed, step)` (as
//! seg_train's loader does), and the step restored here is the whole RNG position.
use std::collections::HashMap;

use candle::backprop::GradStore;
use candle::{DType, Tensor, Var};
use keel_optim::{
    clip_grad_norm, host_read, DynOptimizer, Ema, EmaConfig, GradAccumulator, GradScaler,
    GradScalerConfig, Precision, StateDict,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Alarm, Checkpoint, MonitorConfig, StabilityMonitor, StepRecord};

mod window;
use window::Pending;

/// The `format` value in the meta of [`TrainState::snapshot`]'s checkpoints.
pub const TRAIN_STATE_FORMAT: &str = "keel train state v1";

/// How a [`TrainState`] is set up besides its parameters and optimizer.
#[derive(Clone, Debug, Default)]
pub struct TrainConfig {
    /// Compute precision; [`Precision::F16`] adds a [`GradScaler`].
    pub precision: Precision,
    /// The scaler's settings (used only with f16).
    pub scaler: GradScalerConfig,
    /// Micro-batches per optimizer step (0 counts as 1).
    pub accum_steps: usize,
    /// Keep an EMA of the weights with these settings.
    pub ema: Option<EmaConfig>,
    /// The stability monitor's settings.
    pub monitor: MonitorConfig,
    /// Read the step's scalars (loss, gradient norm, skip flag) on the host once per this
    /// many steps ([`TrainState::launch`] and [`TrainState::flush`]; see the module docs).
    /// 0 and 1 (the default) read every step: [`TrainState::step`] as before.
    pub read_every: usize,
}

/// What one [`TrainState::step`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutcome {
    /// The step index (0-based) this outcome belongs to.
    pub step: usize,
    /// Mean loss over the micro-batches (unscaled).
    pub loss: f64,
    /// The learning rate of the step.
    pub lr: f64,
    /// Global L2 norm of the gradients before clipping (after unscaling). NaN when not
    /// measured: a windowed step ([`TrainState::launch`]) skips it when clipping,
    /// [`TrainState::skip_non_finite`] and the monitor's gradient checks
    /// ([`MonitorConfig::needs_grad_norm`]) are all off.
    pub grad_norm: f64,
    /// The loss scale after the step (f16 only).
    pub loss_scale: Option<f64>,
    /// True when the optimizer did not step (a non-finite gradient, norm or loss).
    pub skipped: bool,
    /// True when the step was skipped by the device-side gate of a windowed f32/bf16 step
    /// ([`TrainState::launch`]): the weights are unchanged, but the optimizer ran on zero
    /// gradients, so its state moved as for a zero gradient (SGD's momentum buffer decayed
    /// by the momentum and took the weight decay; AdamW's moments decayed and its step
    /// count advanced), and the EMA, if any, took its update. False for a host-side skip,
    /// which leaves everything untouched.
    pub skipped_on_device: bool,
    /// The weights-finite check run with this step by a windowed step for a
    /// [`crate::Guard`] (read with the step's scalars); `None` when none ran.
    pub weights_finite: Option<bool>,
    /// The monitor's alarms for this step.
    pub alarms: Vec<Alarm>,
}

/// The mutable state of a training loop: parameters (named, in a fixed order), optimizer,
/// optional loss scaler and EMA, the stability monitor, the gradient accumulator and the
/// number of optimizer steps taken. Parts, not a framework: the caller owns the model, the
/// data and the loop, and calls [`TrainState::step`] once per optimizer step.
pub struct TrainState {
    params: Vec<(String, Var)>,
    vars: Vec<Var>,
    /// The optimizer (any [`DynOptimizer`]).
    pub optimizer: Box<dyn DynOptimizer>,
    /// The dynamic loss scaler, present with f16.
    pub scaler: Option<GradScaler>,
    /// The weight EMA, when configured.
    pub ema: Option<Ema>,
    /// The stability monitor every step is recorded in.
    pub monitor: StabilityMonitor,
    /// Gradient accumulation over micro-batches.
    pub accumulator: GradAccumulator,
    /// The compute precision.
    pub precision: Precision,
    /// Optimizer steps taken (the index of the next step).
    pub step: usize,
    /// Skip the optimizer step when the loss, a gradient or the gradient norm is not finite
    /// (default true). A [`crate::Guard`] with [`crate::GuardPolicy::Off`] turns it off.
    /// With f16, GradScaler overflows are skipped either way (the scaler's protocol).
    pub skip_non_finite: bool,
    read_every: usize,
    pending: Vec<Pending>,
    /// Windows also end at multiples of these (a guard's snapshot interval).
    flush_periods: Vec<usize>,
    /// A windowed step sums the weights every this many steps (a guard's check).
    weight_check_every: Option<usize>,
}

impl TrainState {
    /// A fresh state at step 0 over `params` (name, variable); the names key the weights in
    /// checkpoints, and their order is the order gradients are reduced in (keep it fixed,
    /// e.g. sorted). `optimizer` must update the same variables.
    pub fn new(
        params: Vec<(String, Var)>,
        optimizer: Box<dyn DynOptimizer>,
        cfg: &TrainConfig,
    ) -> candle::Result<Self> {
        if params.is_empty() {
            candle::bail!("TrainState::new: no parameters; pass the model's (name, Var) pairs")
        }
        let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
        let scaler = if cfg.precision.needs_loss_scaling() {
            Some(GradScaler::new(cfg.scaler)?)
        } else {
            None
        };
        let ema = match &cfg.ema {
            Some(e) => Some(Ema::new(vars.clone(), *e)?),
            None => None,
        };
        Ok(Self {
            params,
            vars,
            optimizer,
            scaler,
            ema,
            monitor: StabilityMonitor::new(cfg.monitor.clone()),
            accumulator: GradAccumulator::new(cfg.accum_steps.max(1))?,
            precision: cfg.precision,
            step: 0,
            skip_non_finite: true,
            read_every: cfg.read_every.max(1),
            pending: Vec::new(),
            flush_periods: Vec::new(),
            weight_check_every: None,
        })
    }

    /// Steps per host read of a windowed loop ([`TrainConfig::read_every`]).
    pub fn read_every(&self) -> usize {
        self.read_every
    }

    /// Sets [`TrainConfig::read_every`] (0 counts as 1); errors while launched steps are
    /// unread.
    pub fn set_read_every(&mut self, read_every: usize) -> candle::Result<()> {
        if !self.pending.is_empty() {
            candle::bail!(
                "TrainState::set_read_every: {} launched steps are not read yet; call flush() first",
                self.pending.len()
            )
        }
        self.read_every = read_every.max(1);
        Ok(())
    }

    /// Launched steps whose scalars are not read yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Ends windows also at the steps whose count is a multiple of `period`: a
    /// [`crate::Guard`] registers its snapshot interval, so its snapshots are of the state
    /// at their step. 0 is ignored.
    pub(crate) fn flush_also_every(&mut self, period: usize) {
        if period > 0 && !self.flush_periods.contains(&period) {
            self.flush_periods.push(period);
        }
    }

    /// Makes windowed steps sum the weights every `every` steps and read the sum with
    /// their scalars (a [`crate::Guard`]'s check, [`StepOutcome::weights_finite`]).
    pub(crate) fn check_weights_every(&mut self, every: usize) {
        self.weight_check_every = Some(every.max(1));
    }

    /// The parameters, in their fixed order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The parameter variables, in the same order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Whether every variable is finite: one sum per variable, summed, one sync. Values so
    /// large that their f32 sum overflows count as non-finite (such a run has diverged).
    /// Non-finite weights are not a model: report them with
    /// [`crate::StabilityMonitor::record_weights_finite`].
    pub fn weights_finite(&self) -> candle::Result<bool> {
        host_read::note();
        Ok(self.weights_sum()?.to_scalar::<f32>()?.is_finite())
    }

    /// The f32 sum of every variable, on their device (finite when the weights are).
    fn weights_sum(&self) -> candle::Result<Tensor> {
        let sums = self
            .vars
            .iter()
            .map(|v| v.as_tensor().to_dtype(DType::F32)?.sum_all())
            .collect::<candle::Result<Vec<_>>>()?;
        Tensor::stack(&sums, 0)?.sum_all()
    }

    /// Runs `f` with the EMA weights in the variables (evaluate the averaged model), then
    /// puts the training weights back, also when `f` fails. `Ok(None)` without an EMA (`f`
    /// is not called).
    pub fn with_ema_weights<R>(
        &self,
        f: impl FnOnce() -> candle::Result<R>,
    ) -> candle::Result<Option<R>> {
        let Some(ema) = self.ema.as_ref() else {
            return Ok(None);
        };
        let backup = self
            .vars
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle::Result<Vec<_>>>()?;
        ema.copy_to_vars()?;
        let result = f();
        for (v, b) in self.vars.iter().zip(backup) {
            v.set(&b)?;
        }
        result.map(Some)
    }

    /// One optimizer step at learning rate `lr`, clipping the global gradient norm to
    /// `clip` (`None`: measured, not clipped). `micro_batch(i)` runs the forward pass of
    /// micro-batch `i` (of [`GradAccumulator::k`]) and returns its scalar loss (any float
    /// dtype); the state scales it (by `1/k`, and by the loss scale with f16), runs the
    /// backward pass and sums the gradients. The optimizer steps unless a gradient, the
    /// gradient norm or the loss is not finite (unless [`TrainState::skip_non_finite`] is
    /// off); then the scaler updates, the EMA follows
    /// (only after a real step) and the monitor records the step.
    ///
    /// # Shapes
    /// `micro_batch` returns a tensor with one element.
    pub fn step(
        &mut self,
        lr: f64,
        clip: Option<f64>,
        mut micro_batch: impl FnMut(usize) -> candle::Result<Tensor>,
    ) -> candle::Result<StepOutcome> {
        if !self.pending.is_empty() {
            candle::bail!(
                "TrainState::step: {} launched steps are not read yet; call flush() (or Guard::flush) before a step that reads at once",
                self.pending.len()
            )
        }
        self.optimizer.set_learning_rate(lr)?;
        let (_, losses, mut grads) = self.forward_backward(&mut micro_batch, true)?;
        let loss = mean_loss(&losses);
        let found_inf = match self.scaler.as_mut() {
            Some(s) => s.unscale(&mut grads, &self.vars)?,
            None => false,
        };
        let max_norm = clip.unwrap_or(f32::MAX as f64);
        let grad_norm = clip_grad_norm(&mut grads, &self.vars, max_norm)?;
        let stepped = self.apply(&mut grads, found_inf, loss, grad_norm)?;
        let loss_scale = self.scaler.as_ref().map(|s| s.current_scale());
        let out = self.record(Recorded {
            step: self.step,
            lr,
            loss,
            grad_norm: Some(grad_norm),
            loss_scale,
            skipped: !stepped,
            skipped_on_device: false,
            weights_finite: None,
        });
        self.step += 1;
        Ok(out)
    }

    /// The host-side decision and update of a step whose scalars are known: the optimizer
    /// steps unless the scaler found an overflow or (with [`TrainState::skip_non_finite`])
    /// the loss or the norm is not finite; the scaler updates; the EMA follows a real step.
    /// Returns whether the optimizer stepped.
    fn apply(
        &mut self,
        grads: &mut GradStore,
        found_inf: bool,
        loss: f64,
        grad_norm: f64,
    ) -> candle::Result<bool> {
        let non_finite = !grad_norm.is_finite() || !loss.is_finite();
        let skipped = found_inf || (self.skip_non_finite && non_finite);
        let stepped = match self.scaler.as_mut() {
            Some(s) => {
                let stepped = !skipped && s.step(self.optimizer.as_mut(), grads, &self.vars)?;
                s.update(!stepped);
                stepped
            }
            None => {
                if !skipped {
                    self.optimizer.step(grads)?;
                }
                !skipped
            }
        };
        if stepped {
            if let Some(e) = self.ema.as_mut() {
                e.update()?;
            }
        }
        Ok(stepped)
    }

    /// Records a step whose values are known in the monitor and returns its outcome.
    fn record(&mut self, r: Recorded) -> StepOutcome {
        let rec = StepRecord {
            step: r.step,
            loss: r.loss,
            grad_norm: r.grad_norm,
            loss_scale: r.loss_scale,
            skipped: r.skipped,
        };
        let alarms = self.monitor.record_step(&rec);
        StepOutcome {
            step: r.step,
            loss: r.loss,
            lr: r.lr,
            grad_norm: r.grad_norm.unwrap_or(f64::NAN),
            loss_scale: r.loss_scale,
            skipped: r.skipped,
            skipped_on_device: r.skipped_on_device,
            weights_finite: r.weights_finite,
            alarms,
        }
    }

    /// Runs the micro-batches, returning their losses (f32 scalars on the device), the
    /// losses read on the host when `read_now` (one read per micro-batch, before its
    /// backward pass) and the summed gradients. A failure resets the accumulator, so no
    /// half-accumulated gradients leak into a retry.
    fn forward_backward(
        &mut self,
        micro_batch: &mut impl FnMut(usize) -> candle::Result<Tensor>,
        read_now: bool,
    ) -> candle::Result<(Vec<Tensor>, Vec<f32>, GradStore)> {
        let res = self.forward_backward_inner(micro_batch, read_now);
        if res.is_err() {
            self.accumulator.reset();
        }
        res
    }

    fn forward_backward_inner(
        &mut self,
        micro_batch: &mut impl FnMut(usize) -> candle::Result<Tensor>,
        read_now: bool,
    ) -> candle::Result<(Vec<Tensor>, Vec<f32>, GradStore)> {
        let k = self.accumulator.k();
        let (mut tensors, mut read) = (Vec::with_capacity(k), Vec::new());
        let mut grads = None;
        for i in 0..k {
            let loss = micro_batch(i)?;
            let l32 = loss.to_dtype(DType::F32)?.reshape(())?;
            if read_now {
                host_read::note();
                read.push(l32.to_scalar::<f32>()?);
            }
            tensors.push(l32);
            let mut l = self.accumulator.scale_loss(&loss)?;
            if let Some(s) = &self.scaler {
                l = s.scale(&l)?;
            }
            grads = self.accumulator.accumulate(l.backward()?)?;
        }
        match grads {
            Some(g) => Ok((tensors, read, g)),
            None => candle::bail!(
                "TrainState::step: gradient accumulation did not complete after {k} micro-batches (the accumulator held a partial sum from elsewhere); call accumulator.reset() first"
            ),
        }
    }

    /// The state as a checkpoint at [`TrainState::step`]: the weights under their plain
    /// names (a PyTorch twin's `load_state_dict(strict=False)` takes the file as is), the
    /// optimizer under `optim.`, the scaler under `scaler.`, the EMA under `ema.`; the meta
    /// holds the monitor, the precision and `user` (your config, curves...) under `"user"`.
    /// Errors while launched steps are unread ([`TrainState::flush`] first): their
    /// outcomes are not in the monitor yet.
    pub fn snapshot(&self, user: &impl Serialize) -> candle::Result<Checkpoint> {
        if !self.pending.is_empty() {
            candle::bail!(
                "TrainState::snapshot: {} launched steps (from step {}) are not read yet, so the monitor misses them; call flush() (or Guard::flush) first",
                self.pending.len(),
                self.pending[0].step
            )
        }
        let mut ck = Checkpoint::new(self.step);
        ck.extend_prefixed(
            "",
            self.params
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone())),
        );
        ck.extend_prefixed("optim.", self.optimizer.state_dict()?);
        if let Some(s) = &self.scaler {
            ck.extend_prefixed("scaler.", s.state_dict()?);
        }
        if let Some(e) = &self.ema {
            ck.extend_prefixed("ema.", e.state_dict()?);
        }
        let json = |what: &str, e: serde_json::Error| {
            candle::Error::Msg(format!(
                "TrainState::snapshot: cannot serialize {what}: {e}"
            ))
        };
        ck.meta = serde_json::json!({
            "format": TRAIN_STATE_FORMAT,
            "precision": self.precision,
            "monitor": serde_json::to_value(&self.monitor).map_err(|e| json("the monitor", e))?,
            "user": serde_json::to_value(user).map_err(|e| json("the user meta", e))?,
        });
        Ok(ck)
    }

    /// Restores a [`TrainState::snapshot`] into this state (built like the one that wrote
    /// it: same parameters, optimizer kind, precision, EMA) and returns the user meta.
    /// Launched steps not read yet are discarded.
    /// Parameter names and shapes are checked before anything changes; a mismatch is an
    /// error naming the tensor. The optimizer, scaler and EMA states load together: when one
    /// fails, the others are put back as they were and the weights are untouched.
    pub fn restore<T: DeserializeOwned>(&mut self, ck: &Checkpoint) -> candle::Result<T> {
        let bad = |what: String| candle::Error::Msg(format!("TrainState::restore: {what}"));
        if ck.meta["format"] != TRAIN_STATE_FORMAT {
            return Err(bad(format!(
                "the checkpoint meta is not a `{TRAIN_STATE_FORMAT}` (format {}); was it written by TrainState::snapshot?",
                ck.meta["format"]
            )));
        }
        let precision = ck.meta["precision"].clone();
        if serde_json::from_value::<keel_optim::Precision>(precision).ok() != Some(self.precision) {
            return Err(bad(format!(
                "the checkpoint was trained at precision {}, this state is {}; build the state with the saved precision",
                ck.meta["precision"], self.precision
            )));
        }
        let mut weights = Vec::with_capacity(self.params.len());
        for (k, v) in &self.params {
            let t = ck.tensors.get(k).ok_or_else(|| {
                bad(format!(
                    "no tensor '{k}': was it written for another model?"
                ))
            })?;
            if t.dims() != v.dims() {
                return Err(bad(format!(
                    "'{k}' has shape {:?}, the model's is {:?}",
                    t.dims(),
                    v.dims()
                )));
            }
            weights.push(t.to_dtype(v.dtype())?.to_device(v.device())?);
        }
        let monitor: StabilityMonitor = serde_json::from_value(ck.meta["monitor"].clone())
            .map_err(|e| bad(format!("meta `monitor`: {e}")))?;
        let user: T = serde_json::from_value(ck.meta["user"].clone())
            .map_err(|e| bad(format!("meta `user`: {e}")))?;
        // Optimizer, scaler and EMA each load all-or-nothing; if a later one fails, the
        // earlier ones go back to their state before this call.
        let before = self.optim_states()?;
        if let Err(e) = self.load_optim_states([
            ck.prefixed("optim."),
            ck.prefixed("scaler."),
            ck.prefixed("ema."),
        ]) {
            self.load_optim_states(before)?;
            return Err(e);
        }
        for ((_, v), t) in self.params.iter().zip(weights) {
            v.set(&t)?;
        }
        self.monitor = monitor;
        self.accumulator.reset();
        self.pending.clear();
        self.step = ck.step;
        Ok(user)
    }

    /// The state dicts of the optimizer, the scaler and the EMA (empty when absent).
    fn optim_states(&self) -> candle::Result<[HashMap<String, Tensor>; 3]> {
        Ok([
            self.optimizer.state_dict()?,
            match &self.scaler {
                Some(s) => s.state_dict()?,
                None => HashMap::new(),
            },
            match &self.ema {
                Some(e) => e.state_dict()?,
                None => HashMap::new(),
            },
        ])
    }

    /// Loads [`TrainState::optim_states`]-shaped state dicts, in that order.
    fn load_optim_states(
        &mut self,
        [optim, scaler, ema]: [HashMap<String, Tensor>; 3],
    ) -> candle::Result<()> {
        self.optimizer.load_state_dict(&optim)?;
        if let Some(s) = self.scaler.as_mut() {
            s.load_state_dict(&scaler)?;
        }
        if let Some(e) = self.ema.as_mut() {
            e.load_state_dict(&ema)?;
        }
        Ok(())
    }
}

/// The variables of `varmap` as (name, variable) pairs sorted by name: the fixed order
/// [`TrainState::new`] wants.
pub fn named_vars(varmap: &candle_nn::VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// What [`TrainState::record`] records.
struct Recorded {
    step: usize,
    lr: f64,
    loss: f64,
    grad_norm: Option<f64>,
    loss_scale: Option<f64>,
    skipped: bool,
    skipped_on_device: bool,
    weights_finite: Option<bool>,
}

/// The mean of the micro-batch losses, summed in f64 in order from 0.0.
fn mean_loss(losses: &[f32]) -> f64 {
    losses.iter().fold(0.0f64, |a, &l| a + l as f64) / losses.len().max(1) as f64
}
