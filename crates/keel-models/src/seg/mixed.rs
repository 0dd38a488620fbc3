//! Mixed precision for [`SegNet`]: the f32 master weights live in a `VarMap` (the model
//! built on them is the master); an f16/bf16 forward runs a copy cast from them, so the
//! gradients land on the f32 master variables (keel-optim's `cast_var_builder`), and a
//! training forward writes the copy's BatchNorm running statistics back to the master.
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
        let vb = keel_optim::mixed::cast_var_builder(vm, dtype, device);
        Ok(Some(SegNet::new(cfg, vb)?))
    }

    /// The logits of `x` (cast to `dtype`) from this master model (built with `cfg` from
    /// `vm`), run in `dtype`: itself for F32, else a [`SegNet::cast_copy`], whose
    /// BatchNorm running statistics are written back to `vm` after a training forward.
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
        let cast = Self::cast_copy(cfg, vm, dtype, x.device())?;
        let logits = cast
            .as_ref()
            .unwrap_or(self)
            .forward(&x.to_dtype(dtype)?, train)?;
        if let Some(c) = cast.as_ref().filter(|_| train) {
            c.copy_bn_stats_to(vm)?;
        }
        Ok(logits)
    }
}
