//! Group Normalization (Wu & He, 2018, <https://arxiv.org/abs/1803.08494>).
//!
//! GroupNorm normalizes each sample over groups of channels, so its output does not depend on
//! the batch size: batch 1 and batch 64 see the same statistics, and train and eval agree.
//! The forward pass runs on keel's fused, differentiable kernel
//! ([`keel_kernels::group_norm`]); [`GroupNorm::forward_silu`] runs the fused GroupNorm + SiLU.
use candle::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// The largest divisor of `num_channels` that is `<= preferred`: the group count keel uses when
/// a layer asks for "gn" without an explicit number of groups.
///
/// Starts at `min(preferred, num_channels)` and steps down until it divides `num_channels`,
/// so `group_count(64, 32) == 32`, `group_count(48, 32) == 24`, `group_count(30, 32) == 30`
/// and `group_count(7, 4) == 1`. Returns 1 when `num_channels` or `preferred` is 0 (a layer
/// with 0 channels is rejected later by the layer itself).
///
/// ```
/// use keel_norm::group_count;
/// assert_eq!(group_count(64, 32), 32);
/// assert_eq!(group_count(48, 32), 24);
/// assert_eq!(group_count(30, 32), 30);
/// assert_eq!(group_count(7, 4), 1);
/// ```
pub fn group_count(num_channels: usize, preferred: usize) -> usize {
    let mut g = preferred.min(num_channels);
    while g > 1 {
        if num_channels.is_multiple_of(g) {
            return g;
        }
        g -= 1;
    }
    1
}

fn check_config(num_channels: usize, num_groups: usize, eps: f64) -> Result<()> {
    if num_channels == 0 {
        candle::bail!("GroupNorm: num_channels must be > 0")
    }
    if num_groups == 0 || !num_channels.is_multiple_of(num_groups) {
        candle::bail!(
            "GroupNorm: num_groups ({num_groups}) must divide num_channels ({num_channels}); \
             try keel::norm::group_count({num_channels}, 32) = {}",
            group_count(num_channels, 32)
        )
    }
    if !(eps >= 0.0 && eps.is_finite()) {
        candle::bail!("GroupNorm: eps ({eps}) must be finite and >= 0; PyTorch's default is 1e-5")
    }
    Ok(())
}

/// Group Normalization over an input of shape `(N, C, *)`.
///
/// `y = (x - mean_g) / sqrt(var_g + eps) * weight + bias`, where the biased mean and variance
/// are taken per sample over each group of `C / num_groups` channels and all trailing
/// dimensions (PyTorch's `nn.GroupNorm`). f16 and bf16 inputs are normalized with f32
/// statistics and the output keeps the input dtype; `weight` and `bias` must have the input's
/// dtype (cast them with the mixed-precision helper of `keel::optim`).
///
/// # Shapes
/// - input: `(N, C, *)`, rank >= 3 (any number of trailing spatial dimensions)
/// - weight, bias: `(C,)`
/// - output: same as the input
///
/// ```
/// use candle::{Device, Module, Tensor};
/// use keel_norm::GroupNorm;
/// # fn main() -> candle::Result<()> {
/// let dev = Device::Cpu;
/// let gn = GroupNorm::new(Tensor::ones(6, candle::DType::F32, &dev)?,
///                         Tensor::zeros(6, candle::DType::F32, &dev)?, 6, 3, 1e-5)?;
/// let x = Tensor::randn(0f32, 1., (1, 6, 4, 4), &dev)?;
/// let y = gn.forward(&x)?;
/// assert_eq!(y.dims(), &[1, 6, 4, 4]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_channels: usize,
    num_groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Builds a GroupNorm from its affine parameters (candle-nn's argument order).
    ///
    /// Errors when `num_groups` is 0 or does not divide `num_channels`, when `eps` is negative
    /// or not finite, or when `weight`/`bias` are not of shape `(num_channels,)`.
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        num_channels: usize,
        num_groups: usize,
        eps: f64,
    ) -> Result<Self> {
        check_config(num_channels, num_groups, eps)?;
        for (name, t) in [("weight", &weight), ("bias", &bias)] {
            if t.dims() != [num_channels] {
                candle::bail!(
                    "GroupNorm: {name} has shape {:?}, expected [{num_channels}] (num_channels)",
                    t.dims()
                )
            }
        }
        Ok(Self {
            weight,
            bias,
            num_channels,
            num_groups,
            eps,
        })
    }

    /// The scale (`weight`, PyTorch key `weight`).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The shift (`bias`, PyTorch key `bias`).
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Number of channels `C`.
    pub fn num_channels(&self) -> usize {
        self.num_channels
    }

    /// Number of groups `G`.
    pub fn num_groups(&self) -> usize {
        self.num_groups
    }

    /// The epsilon added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        if x.rank() < 3 {
            candle::bail!(
                "GroupNorm: input must be (N, C, *) with rank >= 3, got shape {:?}; \
                 add a spatial dimension with x.unsqueeze(2)",
                x.dims()
            )
        }
        let c = x.dim(1)?;
        if c != self.num_channels {
            candle::bail!(
                "GroupNorm: input has {c} channels (shape {:?}) but the layer was built for {}",
                x.dims(),
                self.num_channels
            )
        }
        Ok(())
    }

    /// GroupNorm followed by SiLU (`y * sigmoid(y)`) in one fused, differentiable kernel
    /// ([`keel_kernels::group_norm_silu`]). Same shapes as [`Module::forward`].
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        keel_kernels::group_norm_silu(x, &self.weight, &self.bias, self.num_groups, self.eps)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        keel_kernels::group_norm(x, &self.weight, &self.bias, self.num_groups, self.eps)
    }
}

/// Builds a [`GroupNorm`] whose `weight` (init 1) and `bias` (init 0) come from `vb`, under the
/// PyTorch keys `weight` and `bias` (candle-nn's argument order).
///
/// ```
/// use candle::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use keel_norm::{group_count, group_norm};
/// # fn main() -> candle::Result<()> {
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let gn = group_norm(group_count(48, 32), 48, 1e-5, vb.pp("norm"))?;
/// assert_eq!(gn.num_groups(), 24);
/// assert!(vm.data().lock().unwrap().contains_key("norm.weight"));
/// # Ok(()) }
/// ```
pub fn group_norm(
    num_groups: usize,
    num_channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> Result<GroupNorm> {
    // Validate before creating variables, so a bad config leaves the VarMap untouched.
    check_config(num_channels, num_groups, eps)?;
    let weight = vb.get_with_hints(num_channels, "weight", Init::Const(1.))?;
    let bias = vb.get_with_hints(num_channels, "bias", Init::Const(0.))?;
    GroupNorm::new(weight, bias, num_channels, num_groups, eps)
}
