//! Weight Standardization (Qiao et al., 2019, "Micro-Batch Training with Batch-Channel
//! Normalization and Weight Standardization", <https://arxiv.org/abs/1903.10520>).
//!
//! Each output channel's filter is standardized to zero mean and unit variance on every
//! forward pass; gradients flow through the standardization to the raw weight. Paired with
//! GroupNorm it closes most of the gap to large-batch BatchNorm at 1-2 images per GPU.
use candle::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, Init, VarBuilder};

/// Which published formula standardizes the weight. Checkpoints exist for both, and they are
/// not interchangeable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WsConvention {
    /// `(w - mean) / (std_unbiased + eps)`: mmcv's `ConvWS2d`, the original WS code.
    Mmcv,
    /// `(w - mean) / sqrt(var_biased + eps)`: timm's `StdConv2d` (BiT, NFNet-style models).
    Timm,
}

/// How [`WsConv2d`] standardizes its weight. Use [`WsConfig::mmcv`] or [`WsConfig::timm`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WsConfig {
    /// The formula.
    pub convention: WsConvention,
    /// Added to the standard deviation (mmcv) or to the variance (timm).
    pub eps: f64,
}

impl WsConfig {
    /// mmcv `ConvWS2d`: `(w - mean) / (std_unbiased + 1e-5)`.
    pub fn mmcv() -> Self {
        Self {
            convention: WsConvention::Mmcv,
            eps: 1e-5,
        }
    }

    /// timm `StdConv2d`: `(w - mean) / sqrt(var_biased + 1e-6)`.
    pub fn timm() -> Self {
        Self {
            convention: WsConvention::Timm,
            eps: 1e-6,
        }
    }
}

impl Default for WsConfig {
    /// [`WsConfig::mmcv`], the original formulation.
    fn default() -> Self {
        Self::mmcv()
    }
}

/// A 2D convolution whose weight is standardized per output channel on every forward.
///
/// Parameters keep the PyTorch keys `weight` and `bias`, so mmcv and timm checkpoints load
/// unchanged. The standardization runs in f32 and the standardized weight is cast to the
/// input's dtype.
///
/// # Shapes
/// - input: `(N, C_in, H, W)`
/// - weight: `(C_out, C_in / groups, kH, kW)`; bias: `(C_out,)`
/// - output: `(N, C_out, H_out, W_out)`
///
/// ```
/// use candle::{Device, Module, Tensor};
/// use candle_nn::Conv2dConfig;
/// use keel_norm::{WsConfig, WsConv2d};
/// # fn main() -> candle::Result<()> {
/// let dev = Device::Cpu;
/// let w = Tensor::randn(0f32, 1., (4, 3, 3, 3), &dev)?;
/// let cfg = Conv2dConfig { padding: 1, ..Default::default() };
/// let conv = WsConv2d::new(w, None, cfg, WsConfig::timm())?;
/// let y = conv.forward(&Tensor::randn(0f32, 1., (1, 3, 8, 8), &dev)?)?;
/// assert_eq!(y.dims(), &[1, 4, 8, 8]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct WsConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    conv: Conv2dConfig,
    ws: WsConfig,
}

impl WsConv2d {
    /// Builds the layer. Errors when the weight is not 4-D, the bias is not `(C_out,)`, the
    /// groups do not divide `C_out`, `eps` is negative, or the mmcv convention gets a fan-in
    /// of 1 (its unbiased standard deviation is undefined there).
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        conv: Conv2dConfig,
        ws: WsConfig,
    ) -> Result<Self> {
        let (c_out, c_in_g, kh, kw) = match weight.dims() {
            &[o, i, h, w] => (o, i, h, w),
            d => candle::bail!(
                "WsConv2d: weight has shape {d:?}, expected (C_out, C_in / groups, kH, kW)"
            ),
        };
        if c_out == 0 || c_in_g == 0 || kh == 0 || kw == 0 {
            candle::bail!(
                "WsConv2d: weight shape {:?} has a zero dimension",
                weight.dims()
            )
        }
        if let Some(b) = &bias {
            if b.dims() != [c_out] {
                candle::bail!(
                    "WsConv2d: bias has shape {:?}, expected [{c_out}] (C_out)",
                    b.dims()
                )
            }
        }
        if conv.groups == 0 || c_out % conv.groups != 0 {
            candle::bail!(
                "WsConv2d: groups ({}) must divide the output channels ({c_out})",
                conv.groups
            )
        }
        if conv.stride == 0 || conv.dilation == 0 {
            candle::bail!(
                "WsConv2d: stride ({}) and dilation ({}) must be >= 1",
                conv.stride,
                conv.dilation
            )
        }
        if !(ws.eps >= 0.0 && ws.eps.is_finite()) {
            candle::bail!(
                "WsConv2d: eps ({}) must be finite and >= 0; use WsConfig::mmcv() or WsConfig::timm()",
                ws.eps
            )
        }
        let fan_in = c_in_g * kh * kw;
        if ws.convention == WsConvention::Mmcv && fan_in < 2 {
            candle::bail!(
                "WsConv2d: the mmcv convention divides by the unbiased std of each filter, which \
                 needs a fan-in >= 2 (got {c_in_g}x{kh}x{kw}); use WsConfig::timm() for this layer"
            )
        }
        Ok(Self {
            weight,
            bias,
            conv,
            ws,
        })
    }

    /// The raw (unstandardized) weight, PyTorch key `weight`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, PyTorch key `bias`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The convolution's stride, padding, dilation and groups.
    pub fn conv_config(&self) -> &Conv2dConfig {
        &self.conv
    }

    /// The standardization's formula and epsilon.
    pub fn ws_config(&self) -> &WsConfig {
        &self.ws
    }

    /// The standardized weight (f32, the raw weight's shape), differentiable w.r.t. the raw
    /// weight.
    pub fn standardized_weight(&self) -> Result<Tensor> {
        let shape = self.weight.shape().clone();
        let c_out = shape.dims()[0];
        let w = self.weight.to_dtype(DType::F32)?.reshape((c_out, ()))?;
        let fan_in = w.dim(1)?;
        let centered = w.broadcast_sub(&w.mean_keepdim(1)?)?;
        let sum_sq = centered.sqr()?.sum_keepdim(1)?;
        let denom = match self.ws.convention {
            WsConvention::Mmcv => ((sum_sq / (fan_in - 1) as f64)?.sqrt()? + self.ws.eps)?,
            WsConvention::Timm => ((sum_sq / fan_in as f64)? + self.ws.eps)?.sqrt()?,
        };
        centered.broadcast_div(&denom)?.reshape(shape)
    }
}

impl Module for WsConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.standardized_weight()?.to_dtype(x.dtype())?;
        crate::conv::conv2d("WsConv2d", x, &w, self.bias.as_ref(), &self.conv)
    }
}

fn ws_conv2d_impl(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    conv: Conv2dConfig,
    ws: WsConfig,
    with_bias: bool,
    vb: VarBuilder,
) -> Result<WsConv2d> {
    if conv.groups == 0
        || !in_channels.is_multiple_of(conv.groups)
        || !out_channels.is_multiple_of(conv.groups)
    {
        candle::bail!(
            "ws_conv2d: groups ({}) must divide in_channels ({in_channels}) and out_channels ({out_channels})",
            conv.groups
        )
    }
    let weight = vb.get_with_hints(
        (
            out_channels,
            in_channels / conv.groups,
            kernel_size,
            kernel_size,
        ),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    let bias = if with_bias {
        let bound = 1. / ((in_channels / conv.groups * kernel_size * kernel_size) as f64).sqrt();
        Some(vb.get_with_hints(
            out_channels,
            "bias",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?)
    } else {
        None
    };
    WsConv2d::new(weight, bias, conv, ws)
}

/// Builds a [`WsConv2d`] with a bias from `vb` (keys `weight`, `bias`), candle-nn's
/// `conv2d` argument order plus the standardization config.
///
/// ```
/// use candle::{DType, Device};
/// use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
/// use keel_norm::{ws_conv2d, WsConfig};
/// # fn main() -> candle::Result<()> {
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let conv = ws_conv2d(3, 16, 3, Conv2dConfig::default(), WsConfig::mmcv(), vb.pp("conv"))?;
/// assert_eq!(conv.weight().dims(), &[16, 3, 3, 3]);
/// # Ok(()) }
/// ```
pub fn ws_conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    conv: Conv2dConfig,
    ws: WsConfig,
    vb: VarBuilder,
) -> Result<WsConv2d> {
    ws_conv2d_impl(in_channels, out_channels, kernel_size, conv, ws, true, vb)
}

/// Like [`ws_conv2d`] without a bias (the usual case: a norm layer follows).
pub fn ws_conv2d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    conv: Conv2dConfig,
    ws: WsConfig,
    vb: VarBuilder,
) -> Result<WsConv2d> {
    ws_conv2d_impl(in_channels, out_channels, kernel_size, conv, ws, false, vb)
}
