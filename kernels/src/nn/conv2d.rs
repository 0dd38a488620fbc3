//! [`Conv2d`]: a drop-in for `candle_nn::Conv2d` that runs on [`crate::conv2d`] (keel's
//! im2col + GEMM CPU kernels and cuDNN kernels with dedicated backward passes), following
//! PyTorch's `torch.nn.Conv2d` (weight `(C_out, C_in / groups, k, k)`, optional bias).

use crate::Conv2dParams;
use candle::{bail, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, Init, VarBuilder};

/// A 2D convolution layer with PyTorch's parameter names (`weight`, `bias`).
///
/// # Shapes
/// - input: `(N, C_in, H, W)`; output: `(N, C_out, H_out, W_out)` (see [`crate::conv2d`]).
///
/// # Example
/// ```
/// use candle::{DType, Device, Module, Tensor};
/// use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let cfg = Conv2dConfig { padding: 1, stride: 2, ..Default::default() };
/// let conv = keel_kernels::nn::conv2d(3, 8, 3, cfg, vb.pp("stem"))?;
/// let y = conv.forward(&Tensor::zeros((2, 3, 7, 8), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(y.dims(), &[2, 8, 4, 4]);
/// assert!(vm.data().lock().unwrap().contains_key("stem.weight"));
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: Conv2dConfig,
}

impl Conv2d {
    /// A layer from its weight `(C_out, C_in / groups, kH, kW)`, optional bias `(C_out,)` and
    /// config. Errors (naming the values) on a weight that is not rank 4, a bias of the wrong
    /// shape, groups not dividing C_out, or a zero stride, dilation or groups.
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: Conv2dConfig) -> Result<Self> {
        let Ok((c_out, _, _, _)) = weight.dims4() else {
            bail!(
                "Conv2d: weight has shape {:?}, expected (C_out, C_in / groups, kH, kW)",
                weight.dims()
            )
        };
        if let Some(b) = &bias {
            if b.dims() != [c_out] {
                bail!(
                    "Conv2d: bias has shape {:?}, expected ({c_out},) (C_out)",
                    b.dims()
                )
            }
        }
        if config.stride == 0 || config.dilation == 0 || config.groups == 0 {
            bail!(
                "Conv2d: stride ({}), dilation ({}) and groups ({}) must all be >= 1",
                config.stride,
                config.dilation,
                config.groups
            )
        }
        if c_out % config.groups != 0 {
            bail!(
                "Conv2d: groups ({}) must divide the output channels ({c_out})",
                config.groups
            )
        }
        Ok(Self {
            weight,
            bias,
            config,
        })
    }

    /// The weight, `(C_out, C_in / groups, kH, kW)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `(C_out,)`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The stride, padding, dilation and groups.
    pub fn config(&self) -> &Conv2dConfig {
        &self.config
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::conv2d(
            x,
            &self.weight,
            self.bias.as_ref(),
            &Conv2dParams::from(self.config),
        )
    }
}

impl From<candle_nn::Conv2d> for Conv2d {
    fn from(c: candle_nn::Conv2d) -> Self {
        Self {
            weight: c.weight().clone(),
            bias: c.bias().cloned(),
            config: *c.config(),
        }
    }
}

fn weight(
    in_c: usize,
    out_c: usize,
    k: usize,
    cfg: &Conv2dConfig,
    vb: &VarBuilder,
) -> Result<Tensor> {
    if cfg.groups == 0 || !in_c.is_multiple_of(cfg.groups) {
        bail!(
            "Conv2d: groups ({}) must divide the input channels ({in_c})",
            cfg.groups
        )
    }
    vb.get_with_hints(
        (out_c, in_c / cfg.groups, k, k),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )
}

/// A [`Conv2d`] with bias, parameters `weight` and `bias` read from (or created in) `vb`,
/// initialized like candle_nn's `conv2d` (Kaiming-normal weight, bias uniform in
/// `±1 / sqrt(in_channels)`).
///
/// # Shapes
/// As [`Conv2d`]: `(N, in_channels, H, W) -> (N, out_channels, H_out, W_out)`.
///
/// # Example
/// ```
/// use candle::{DType, Device, Module, Tensor};
/// use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let conv = keel_kernels::nn::conv2d(4, 4, 3, Conv2dConfig { padding: 1, groups: 4, ..Default::default() }, vb)?;
/// assert_eq!(conv.weight().dims(), &[4, 1, 3, 3]);
/// let y = conv.forward(&Tensor::ones((1, 4, 5, 5), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(y.dims(), &[1, 4, 5, 5]);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let w = weight(in_channels, out_channels, kernel_size, &cfg, &vb)?;
    let bound = 1. / (in_channels as f64).sqrt();
    let b = vb.get_with_hints(
        out_channels,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Conv2d::new(w, Some(b), cfg)
}

/// A [`Conv2d`] without bias (parameter `weight` only), initialized like candle_nn's
/// `conv2d_no_bias`.
///
/// # Shapes
/// As [`Conv2d`].
///
/// # Example
/// ```
/// use candle::{DType, Device, Module, Tensor};
/// use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let conv = keel_kernels::nn::conv2d_no_bias(3, 2, 1, Conv2dConfig::default(), vb)?;
/// assert!(conv.bias().is_none());
/// assert_eq!(conv.forward(&Tensor::ones((1, 3, 4, 4), DType::F32, &Device::Cpu)?)?.dims(), &[1, 2, 4, 4]);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn conv2d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let w = weight(in_channels, out_channels, kernel_size, &cfg, &vb)?;
    Conv2d::new(w, None, cfg)
}
