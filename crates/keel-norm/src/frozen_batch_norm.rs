//! Frozen Batch Normalization: BatchNorm with fixed statistics, for fine-tuning pretrained
//! backbones at small batch (torchvision's `ops.FrozenBatchNorm2d`, as used by Detectron2 and
//! torchvision's detection models).
//!
//! At batch 1-2 the batch statistics that trainable BatchNorm normalizes with are noise. A
//! pretrained backbone already carries good running statistics: freezing them turns BN into a
//! per-channel affine map `y = x * scale + shift` that is identical in train and eval.
use candle::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// Configuration of [`frozen_batch_norm2d`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FrozenBatchNormConfig {
    /// Added to the running variance. torchvision's default is `1e-5`; old Detectron
    /// checkpoints use `0.0`, which is allowed.
    pub eps: f64,
    /// When true, `weight` and `bias` stay in the autograd graph (they are the VarBuilder's
    /// variables and receive gradients); the statistics are frozen either way.
    pub trainable_affine: bool,
}

impl Default for FrozenBatchNormConfig {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            trainable_affine: false,
        }
    }
}

/// BatchNorm with frozen statistics: `y = x * scale + shift` with
/// `scale = weight * rsqrt(running_var + eps)` and `shift = bias - running_mean * scale`
/// (torchvision semantics).
///
/// The statistics are plain tensors, never variables, and never change. The affine part is
/// frozen too ([`FrozenBatchNorm2d::new`]) unless built with
/// [`FrozenBatchNorm2d::new_trainable_affine`] (or `trainable_affine` in the builder's config),
/// in which case `weight` and `bias` receive gradients. `scale` and `shift` are computed in f32
/// and cast to the input's dtype.
///
/// # Shapes
/// - input: `(N, C, *)`, rank >= 2
/// - weight, bias, running_mean, running_var: `(C,)`
/// - output: same as the input
///
/// ```
/// use candle::{Device, Module, Tensor};
/// use keel_norm::FrozenBatchNorm2d;
/// # fn main() -> candle::Result<()> {
/// let dev = Device::Cpu;
/// let t = |v: &[f32]| Tensor::new(v, &dev);
/// // weight 2, bias 1, mean 3, var 4, eps 0: y = (x - 3) / 2 * 2 + 1 = x - 2
/// let bn = FrozenBatchNorm2d::new(t(&[2.])?, t(&[1.])?, t(&[3.])?, t(&[4.])?, 0.0)?;
/// let y = bn.forward(&Tensor::new(&[[[[5f32]]]], &dev)?)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [3.0]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct FrozenBatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
    /// `Some((scale, shift))` precomputed in f32 when the affine part is frozen.
    frozen: Option<(Tensor, Tensor)>,
}

impl FrozenBatchNorm2d {
    /// A fully frozen BatchNorm: statistics and affine parameters are detached from autograd.
    ///
    /// Errors when the four tensors are not all of shape `(C,)` or when `eps` is negative or
    /// not finite.
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        eps: f64,
    ) -> Result<Self> {
        let mut bn = Self::new_trainable_affine(
            weight.detach(),
            bias.detach(),
            running_mean,
            running_var,
            eps,
        )?;
        bn.frozen = Some(bn.scale_shift()?);
        Ok(bn)
    }

    /// Frozen statistics with a trainable affine part: `weight` and `bias` are used as given
    /// (pass variables to train them) and `scale`/`shift` are recomputed on every forward, so
    /// optimizer updates of the variables take effect.
    pub fn new_trainable_affine(
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        eps: f64,
    ) -> Result<Self> {
        if !(eps >= 0.0 && eps.is_finite()) {
            candle::bail!(
                "FrozenBatchNorm2d: eps ({eps}) must be finite and >= 0; torchvision's default is 1e-5"
            )
        }
        let c = weight.elem_count();
        for (name, t) in [
            ("weight", &weight),
            ("bias", &bias),
            ("running_mean", &running_mean),
            ("running_var", &running_var),
        ] {
            if t.dims() != [c] {
                candle::bail!(
                    "FrozenBatchNorm2d: {name} has shape {:?}, expected [{c}] like weight",
                    t.dims()
                )
            }
        }
        Ok(Self {
            weight,
            bias,
            running_mean: running_mean.detach(),
            running_var: running_var.detach(),
            eps,
            frozen: None,
        })
    }

    /// Number of channels `C`.
    pub fn num_features(&self) -> usize {
        self.weight.elem_count()
    }

    /// The epsilon added to the running variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Whether `weight` and `bias` receive gradients.
    pub fn is_affine_trainable(&self) -> bool {
        self.frozen.is_none()
    }

    /// The PyTorch state_dict tensors: `weight`, `bias`, `running_mean`, `running_var`.
    pub fn tensors(&self) -> [(&'static str, &Tensor); 4] {
        [
            ("weight", &self.weight),
            ("bias", &self.bias),
            ("running_mean", &self.running_mean),
            ("running_var", &self.running_var),
        ]
    }

    /// `(scale, shift)` of shape `(C,)` in f32: `y = x * scale + shift`.
    pub fn scale_shift(&self) -> Result<(Tensor, Tensor)> {
        if let Some((scale, shift)) = &self.frozen {
            return Ok((scale.clone(), shift.clone()));
        }
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let scale = (f(&self.weight)? * (f(&self.running_var)? + self.eps)?.sqrt()?.recip()?)?;
        let shift = (f(&self.bias)? - (f(&self.running_mean)? * &scale)?)?;
        Ok((scale, shift))
    }

    /// Folds this BatchNorm into the convolution that precedes it, for inference:
    /// returns `(weight', bias')` with `weight'[o] = weight[o] * scale[o]` and
    /// `bias'[o] = bias[o] * scale[o] + shift[o]` (a missing conv bias counts as 0), in the
    /// conv weight's dtype. `conv_weight` is `(C, ...)` with `C` output channels.
    pub fn fold_into_conv(
        &self,
        conv_weight: &Tensor,
        conv_bias: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let c = self.num_features();
        if conv_weight.rank() < 2 || conv_weight.dim(0)? != c {
            candle::bail!(
                "FrozenBatchNorm2d::fold_into_conv: conv weight has shape {:?}, expected {c} \
                 output channels first (the conv that feeds this BatchNorm)",
                conv_weight.dims()
            )
        }
        if let Some(b) = conv_bias {
            if b.dims() != [c] {
                candle::bail!(
                    "FrozenBatchNorm2d::fold_into_conv: conv bias has shape {:?}, expected [{c}]",
                    b.dims()
                )
            }
        }
        let (scale, shift) = self.scale_shift()?;
        let dtype = conv_weight.dtype();
        let mut bshape = vec![1; conv_weight.rank()];
        bshape[0] = c;
        let weight = conv_weight
            .to_dtype(DType::F32)?
            .broadcast_mul(&scale.reshape(bshape)?)?
            .to_dtype(dtype)?;
        let bias = match conv_bias {
            Some(b) => ((b.to_dtype(DType::F32)? * &scale)? + &shift)?,
            None => shift,
        };
        Ok((weight, bias.to_dtype(dtype)?))
    }

    /// Folds this BatchNorm into a candle-nn convolution, see [`Self::fold_into_conv`].
    pub fn fold_into(&self, conv: &candle_nn::Conv2d) -> Result<candle_nn::Conv2d> {
        let (w, b) = self.fold_into_conv(conv.weight(), conv.bias())?;
        Ok(candle_nn::Conv2d::new(w, Some(b), *conv.config()))
    }
}

impl Module for FrozenBatchNorm2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.num_features();
        if x.rank() < 2 || x.dim(1)? != c {
            candle::bail!(
                "FrozenBatchNorm2d: input has shape {:?}, expected (N, {c}, *)",
                x.dims()
            )
        }
        let (scale, shift) = self.scale_shift()?;
        let mut shape = vec![1; x.rank()];
        shape[1] = c;
        let scale = scale.to_dtype(x.dtype())?.reshape(shape.as_slice())?;
        let shift = shift.to_dtype(x.dtype())?.reshape(shape.as_slice())?;
        x.broadcast_mul(&scale)?.broadcast_add(&shift)
    }
}

/// Builds a [`FrozenBatchNorm2d`] from `vb` with the PyTorch keys `weight`, `bias`,
/// `running_mean` and `running_var` (`num_batches_tracked` is ignored), so a BatchNorm2d
/// checkpoint loads unchanged.
///
/// ```
/// use candle::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use keel_norm::{frozen_batch_norm2d, FrozenBatchNormConfig};
/// # fn main() -> candle::Result<()> {
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let bn = frozen_batch_norm2d(8, FrozenBatchNormConfig::default(), vb.pp("bn1"))?;
/// let x = Tensor::ones((1, 8, 2, 2), DType::F32, &Device::Cpu)?;
/// // Fresh statistics (mean 0, var 1): the layer is the identity up to eps.
/// let y = bn.forward(&x)?;
/// assert!((y.mean_all()?.to_scalar::<f32>()? - 1.0).abs() < 1e-4);
/// # Ok(()) }
/// ```
pub fn frozen_batch_norm2d(
    num_features: usize,
    cfg: FrozenBatchNormConfig,
    vb: VarBuilder,
) -> Result<FrozenBatchNorm2d> {
    if !(cfg.eps >= 0.0 && cfg.eps.is_finite()) {
        candle::bail!(
            "FrozenBatchNorm2d: eps ({}) must be finite and >= 0; torchvision's default is 1e-5",
            cfg.eps
        )
    }
    let weight = vb.get_with_hints(num_features, "weight", Init::Const(1.))?;
    let bias = vb.get_with_hints(num_features, "bias", Init::Const(0.))?;
    let running_mean = vb.get_with_hints(num_features, "running_mean", Init::Const(0.))?;
    let running_var = vb.get_with_hints(num_features, "running_var", Init::Const(1.))?;
    if cfg.trainable_affine {
        FrozenBatchNorm2d::new_trainable_affine(weight, bias, running_mean, running_var, cfg.eps)
    } else {
        FrozenBatchNorm2d::new(weight, bias, running_mean, running_var, cfg.eps)
    }
}
