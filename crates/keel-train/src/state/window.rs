//! The windowed step of [`TrainState`]: [`TrainState::launch`] runs a step without reading
//! anything on the host and keeps its scalars on the device; [`TrainState::flush`] reads the
//! scalars of every launched step in one transfer and records them in the monitor in order.
use candle::backprop::GradStore;
use candle::Tensor;
use keel_optim::{clip_grad_norm_device, host_read};

use super::{mean_loss, Recorded, StepOutcome, TrainState};

/// One launched step whose scalars are still on the device.
pub(super) struct Pending {
    pub(super) step: usize,
    lr: f64,
    loss_scale: Option<f64>,
    scalars: Scalars,
    /// The sum of every weight after the step (a [`crate::Guard`]'s check), unread.
    weights: Option<Tensor>,
}

/// A launched step's scalars.
pub(super) enum Scalars {
    /// Read at launch (f16: the scaler's verdict is needed before the step).
    Known {
        loss: f64,
        grad_norm: f64,
        stepped: bool,
    },
    /// On the device: the micro-batch losses (f32), then the gradient norm when measured.
    Device {
        tensors: Vec<Tensor>,
        micro: usize,
        has_norm: bool,
        /// Whether the device gate skipped non-finite steps.
        gated: bool,
    },
}

impl Pending {
    /// The tensors this step reads at the flush, in order.
    fn unread(&self) -> impl Iterator<Item = &Tensor> {
        let device = match &self.scalars {
            Scalars::Device { tensors, .. } => tensors.as_slice(),
            Scalars::Known { .. } => &[],
        };
        device.iter().chain(self.weights.iter())
    }
}

impl TrainState {
    /// One optimizer step like [`TrainState::step`], without waiting for the device: the
    /// step's scalars stay on the device until [`TrainState::flush`] (or
    /// [`crate::Guard::flush`]) reads the whole window in one transfer. Returns true when
    /// the window is full (the step count is a multiple of [`TrainConfig::read_every`], or
    /// of a guard's snapshot interval): flush before the next launch, which otherwise
    /// errors, as [`TrainState::snapshot`] does while steps are unread. Flush also before
    /// logging, evaluating, checkpointing and at the end.
    ///
    /// What differs from [`TrainState::step`]:
    /// - f32/bf16: no host read at all. The gradient norm comes from
    ///   [`keel_optim::clip_grad_norm_device`] (PyTorch's clipping on the device), and is
    ///   skipped when `clip` is `None`, [`TrainState::skip_non_finite`] is off and the
    ///   monitor's gradient checks are off ([`MonitorConfig::needs_grad_norm`]). With
    ///   [`TrainState::skip_non_finite`], a step whose loss or norm is not finite is gated on
    ///   the device: its gradients are replaced by zeros (`where_cond`), the optimizer
    ///   steps, and the weights are put back (`where_cond` with a copy taken before), so
    ///   the weights are those of a skipped step but the optimizer state and the EMA move
    ///   as for a zero gradient ([`StepOutcome::skipped_on_device`]). The copy costs one
    ///   pass over the weights per step.
    /// - f16 with a GradScaler: one host read per step, of the losses, the norm and the
    ///   scaler's overflow probe together, as PyTorch's `GradScaler.step` reads `found_inf`
    ///   once per step; the decision is then [`TrainState::step`]'s. The outcome still
    ///   waits for the flush.
    ///
    /// [`TrainConfig::read_every`]: super::TrainConfig::read_every
    /// [`MonitorConfig::needs_grad_norm`]: crate::MonitorConfig::needs_grad_norm
    pub fn launch(
        &mut self,
        lr: f64,
        clip: Option<f64>,
        mut micro_batch: impl FnMut(usize) -> candle::Result<Tensor>,
    ) -> candle::Result<bool> {
        if self.window_full() {
            candle::bail!(
                "TrainState::launch: the window of {} steps is full; call flush() (or Guard::flush) when launch returns true",
                self.pending.len()
            )
        }
        self.optimizer.set_learning_rate(lr)?;
        let (losses, _, mut grads) = self.forward_backward(&mut micro_batch, false)?;
        let step = self.step;
        let scalars = if self.scaler.is_some() {
            self.launch_scaled(losses, &mut grads, clip)?
        } else {
            self.launch_gated(losses, &mut grads, clip)?
        };
        let weights = match self.weight_check_every {
            Some(n) if (step + 1).is_multiple_of(n) => Some(self.weights_sum()?),
            _ => None,
        };
        let loss_scale = self.scaler.as_ref().map(|s| s.current_scale());
        self.pending.push(Pending {
            step,
            lr,
            loss_scale,
            scalars,
            weights,
        });
        self.step += 1;
        Ok(self.window_full())
    }

    /// Whether the last launched step ends a window.
    fn window_full(&self) -> bool {
        let Some(last) = self.pending.last() else {
            return false;
        };
        let n = last.step + 1;
        n.is_multiple_of(self.read_every)
            || self.flush_periods.iter().any(|&p| n.is_multiple_of(p))
            || self.pending.len() >= self.read_every
    }

    /// The f16 step: unscale, clip on the device, one read of the losses, the norm and the
    /// overflow probe, then the host decision of [`TrainState::step`].
    fn launch_scaled(
        &mut self,
        losses: Vec<Tensor>,
        grads: &mut GradStore,
        clip: Option<f64>,
    ) -> candle::Result<Scalars> {
        let Some(scaler) = self.scaler.as_mut() else {
            candle::bail!("TrainState::launch: no scaler for an f16 step")
        };
        let probe = scaler.unscale_deferred(grads, &self.vars)?;
        let norm = clip_grad_norm_device(grads, &self.vars, clip)?;
        let k = losses.len();
        let mut parts = losses;
        parts.extend(norm.iter().cloned());
        parts.extend(probe.iter().cloned());
        host_read::note();
        let vals = Tensor::stack(&parts, 0)?.to_vec1::<f32>()?;
        let loss = mean_loss(&vals[..k]);
        let grad_norm = norm.map_or(0.0, |_| vals[k] as f64);
        let found_inf = probe.is_some() && !vals[vals.len() - 1].is_finite();
        if let Some(s) = self.scaler.as_mut() {
            s.set_found_inf(found_inf)?;
        }
        let stepped = self.apply(grads, found_inf, loss, grad_norm)?;
        Ok(Scalars::Known {
            loss,
            grad_norm,
            stepped,
        })
    }

    /// The f32/bf16 step without a host read (see [`TrainState::launch`]).
    fn launch_gated(
        &mut self,
        losses: Vec<Tensor>,
        grads: &mut GradStore,
        clip: Option<f64>,
    ) -> candle::Result<Scalars> {
        let gated = self.skip_non_finite;
        let need_norm = clip.is_some() || gated || self.monitor.config().needs_grad_norm();
        let norm = match need_norm {
            true => clip_grad_norm_device(grads, &self.vars, clip)?,
            false => None,
        };
        if gated {
            // (x - x) is 0 for a finite x and NaN otherwise: ok when the sum is 0.
            #[allow(clippy::eq_op)] // reason: x - x is the finiteness probe described above
            let probes = losses
                .iter()
                .chain(norm.iter())
                .map(|t| t - t)
                .collect::<candle::Result<Vec<_>>>()?;
            let probe = Tensor::stack(&probes, 0)?.sum_all()?;
            let ok = probe.eq(&probe.zeros_like()?)?;
            self.gated_optimizer_step(grads, &ok)?;
        } else {
            self.optimizer.step(grads)?;
        }
        if let Some(e) = self.ema.as_mut() {
            e.update()?;
        }
        let (micro, has_norm) = (losses.len(), norm.is_some());
        let mut tensors = losses;
        tensors.extend(norm);
        Ok(Scalars::Device {
            tensors,
            micro,
            has_norm,
            gated,
        })
    }

    /// The optimizer step gated by `ok` (a u8 scalar on the device): zero gradients and
    /// the weights put back where `ok` is 0.
    fn gated_optimizer_step(&mut self, grads: &mut GradStore, ok: &Tensor) -> candle::Result<()> {
        let keep = |t: &Tensor, other: &Tensor| -> candle::Result<Tensor> {
            ok.broadcast_as(t.shape())?.where_cond(t, other)
        };
        for var in &self.vars {
            if let Some(g) = grads.get(var) {
                let zeroed = keep(g, &g.zeros_like()?)?;
                grads.insert(var.as_tensor(), zeroed);
            }
        }
        let before = self
            .vars
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle::Result<Vec<_>>>()?;
        self.optimizer.step(grads)?;
        for (var, old) in self.vars.iter().zip(before) {
            var.set(&keep(var.as_tensor(), &old)?)?;
        }
        Ok(())
    }

    /// Reads the scalars of every launched step in one transfer, records the steps in the
    /// monitor in order and returns their outcomes (empty when nothing was launched).
    pub fn flush(&mut self) -> candle::Result<Vec<StepOutcome>> {
        self.flush_with(|_, _| Ok(true))
    }

    /// [`TrainState::flush`], calling `each` after recording each step; when it returns
    /// false (a guard rolled the state back), the later steps of the window are discarded
    /// unrecorded. Returns the outcomes recorded.
    pub(crate) fn flush_with(
        &mut self,
        mut each: impl FnMut(&mut Self, &StepOutcome) -> candle::Result<bool>,
    ) -> candle::Result<Vec<StepOutcome>> {
        let pending = std::mem::take(&mut self.pending);
        let unread: Vec<Tensor> = pending.iter().flat_map(Pending::unread).cloned().collect();
        let vals = match unread.is_empty() {
            true => Vec::new(),
            false => {
                host_read::note();
                Tensor::stack(&unread, 0)?.to_vec1::<f32>()?
            }
        };
        let (mut at, mut outs) = (0, Vec::with_capacity(pending.len()));
        for p in pending {
            let n = p.unread().count();
            let out = self.record(p.recorded(&vals[at..at + n]));
            at += n;
            let go_on = each(self, &out)?;
            outs.push(out);
            if !go_on {
                break;
            }
        }
        Ok(outs)
    }
}

impl Pending {
    /// The step's values, from its `vals` read at the flush (in [`Pending::unread`] order).
    fn recorded(&self, vals: &[f32]) -> Recorded {
        let weights_finite = self
            .weights
            .as_ref()
            .map(|_| vals[vals.len() - 1].is_finite());
        let (loss, grad_norm, skipped, on_device) = match &self.scalars {
            Scalars::Known {
                loss,
                grad_norm,
                stepped,
            } => (*loss, Some(*grad_norm), !stepped, false),
            Scalars::Device {
                micro,
                has_norm,
                gated,
                ..
            } => {
                let loss = mean_loss(&vals[..*micro]);
                let norm = has_norm.then(|| vals[*micro] as f64);
                let non_finite = !loss.is_finite() || norm.is_some_and(|g| !g.is_finite());
                let skipped = *gated && non_finite;
                (loss, norm, skipped, skipped)
            }
        };
        Recorded {
            step: self.step,
            lr: self.lr,
            loss,
            grad_norm,
            loss_scale: self.loss_scale,
            skipped,
            skipped_on_device: on_device,
            weights_finite,
        }
    }
}
