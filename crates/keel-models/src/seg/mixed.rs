//! Mixed precision for [`SegNet`]: the f32 master weights live in a `VarMap` (the model
//! built on them is the master); an f16/bf16 forward runs a copy cast from them, so the
//! gradients land on the f32 master variables (keel-optim's `cast_var_builder`), and a
//! training forward writes the copy's BatchNorm running statistics back to the master.
//! [`SegNet::for_step`] builds the copy once per optimizer step: with gradient accumulation
//! every micro-batch runs the same copy (the weights change only at the optimizer step).
use std::cell::Cell;

use candle::{DType, Device, Result, Tensor};
use candle_nn::VarMap;

use super::{ModelConfig, SegNet};

impl SegNet {
    /// `cfg`'s network in `dtype`, built on the f32 master weights of `vm` (casts the
    /// gradients flow back through); `None` for F32, where the master model itself runs.
    pub fn cast_copy(
        cfg: &ModelConfig,
        vm: &VarMap,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<SegNet>> {
        if dtype == DType::F32 {
            return Ok(None);
        }
        CAST_COPIES.with(|c| c.set(c.get() + 1));
        let vb = keel_optim::mixed::cast_var_builder(vm, dtype, device);
        Ok(Some(SegNet::new(cfg, vb)?))
    }

    /// The network that one optimizer step runs in `dtype`, built once: the master itself
    /// for F32, else a [`SegNet::cast_copy`] of `vm`'s current weights. Build it after the
    /// previous optimizer step and run every micro-batch of the step through
    /// [`StepNet::forward`] (the weights do not change between micro-batches, so one copy
    /// serves them all: one cast of every weight per optimizer step instead of one per
    /// micro-batch).
    ///
    /// ```
    /// use candle::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use keel_models::seg::{cast_copies, init_weights, ModelConfig, SegNet};
    /// use keel_norm::NormKind;
    /// let (dev, vm) = (Device::Cpu, VarMap::new());
    /// let cfg = ModelConfig { width: 8, fpn: 8, num_classes: 3, norm: NormKind::GroupNorm { groups: Some(2) } };
    /// let master = SegNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    /// init_weights(&vm, 0)?;
    /// let before = cast_copies();
    /// let net = master.for_step(&cfg, &vm, DType::F16, &dev)?;
    /// for _micro in 0..4 {
    ///     let x = Tensor::randn(0f32, 1.0, (1, 3, 32, 32), &dev)?;
    ///     let logits = net.forward(&x, true)?;
    ///     logits.to_dtype(DType::F32)?.sum_all()?.backward()?;
    /// }
    /// assert_eq!(cast_copies() - before, 1);
    /// # Ok::<(), candle::Error>(())
    /// ```
    pub fn for_step<'a>(
        &'a self,
        cfg: &ModelConfig,
        vm: &'a VarMap,
        dtype: DType,
        device: &Device,
    ) -> Result<StepNet<'a>> {
        Ok(StepNet {
            master: self,
            vm,
            cast: Self::cast_copy(cfg, vm, dtype, device)?,
            dtype,
        })
    }

    /// The logits of `x` (cast to `dtype`) from this master model (built with `cfg` from
    /// `vm`), run in `dtype`: itself for F32, else a [`SegNet::cast_copy`], whose
    /// BatchNorm running statistics are written back to `vm` after a training forward.
    /// Builds the copy on every call: a step of several micro-batches uses
    /// [`SegNet::for_step`] once instead.
    ///
    /// # Shapes
    /// As [`SegNet::forward`]; the logits are in `dtype`.
    ///
    /// ```
    /// use candle::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use keel_models::seg::{init_weights, ModelConfig, SegNet};
    /// use keel_norm::NormKind;
    /// let (dev, vm) = (Device::Cpu, VarMap::new());
    /// let cfg = ModelConfig { width: 8, fpn: 8, num_classes: 3, norm: NormKind::GroupNorm { groups: Some(2) } };
    /// let master = SegNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    /// init_weights(&vm, 0)?;
    /// let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev)?;
    /// let logits = master.forward_in(&cfg, &vm, &x, DType::F16, true)?;
    /// assert_eq!((logits.dims(), logits.dtype()), (&[2, 3, 32, 32][..], DType::F16));
    /// // The gradients land on the f32 master variables.
    /// let grads = logits.to_dtype(DType::F32)?.sum_all()?.backward()?;
    /// assert!(vm.all_vars().iter().any(|v| grads.get(v).is_some()));
    /// # Ok::<(), candle::Error>(())
    /// ```
    pub fn forward_in(
        &self,
        cfg: &ModelConfig,
        vm: &VarMap,
        x: &Tensor,
        dtype: DType,
        train: bool,
    ) -> Result<Tensor> {
        self.for_step(cfg, vm, dtype, x.device())?.forward(x, train)
    }
}

thread_local! {
    static CAST_COPIES: Cell<u64> = const { Cell::new(0) };
}

/// How many [`SegNet::cast_copy`] networks this thread built (each casts every weight):
/// tests and benchmarks take the difference around a step.
pub fn cast_copies() -> u64 {
    CAST_COPIES.with(Cell::get)
}

/// The network of one optimizer step ([`SegNet::for_step`]).
pub struct StepNet<'a> {
    master: &'a SegNet,
    vm: &'a VarMap,
    cast: Option<SegNet>,
    dtype: DType,
}

impl StepNet<'_> {
    /// The logits of `x` (cast to the step's dtype); a training forward of a cast copy
    /// writes its BatchNorm running statistics back to the master variables.
    ///
    /// # Shapes
    /// As [`SegNet::forward`]; the logits are in the step's dtype.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let net = self.cast.as_ref().unwrap_or(self.master);
        let logits = net.forward(&x.to_dtype(self.dtype)?, train)?;
        if let Some(c) = self.cast.as_ref().filter(|_| train) {
            c.copy_bn_stats_to(self.vm)?;
        }
        Ok(logits)
    }
}
