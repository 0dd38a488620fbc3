//! One switch for models: [`NormKind`] picks the normalization of every conv+norm block, so a
//! model written once trains with BatchNorm, FrozenBatchNorm, GroupNorm or WS+GroupNorm.
use std::fmt;
use std::str::FromStr;

use candle::{Module, ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, Conv2dConfig, VarBuilder};

use crate::{
    frozen_batch_norm2d, group_count, group_norm, ws_conv2d_no_bias, FrozenBatchNorm2d,
    FrozenBatchNormConfig, GroupNorm, WsConfig, WsConv2d,
};

/// The group count GroupNorm uses when none is given: `group_count(C, 32)`.
pub const DEFAULT_GROUPS: usize = 32;

/// The epsilon every norm built by [`norm`] uses (PyTorch's default).
pub const NORM_EPS: f64 = 1e-5;

/// Which normalization a model's conv+norm blocks use.
///
/// Parsed from (and displayed as) the strings `bn`, `frozen-bn`, `gn`, `gn:G`, `ws-gn` and
/// `ws-gn:G`, where `G` is an explicit group count; without it each layer uses
/// [`group_count`]`(C, 32)`.
///
/// ```
/// use keel_norm::NormKind;
/// let kind: NormKind = "gn:16".parse().unwrap();
/// assert_eq!(kind, NormKind::GroupNorm { groups: Some(16) });
/// assert_eq!(kind.to_string(), "gn:16");
/// assert!("layernorm".parse::<NormKind>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormKind {
    /// candle-nn's trainable BatchNorm with running statistics (momentum 0.1). Unstable below
    /// a batch of ~16: the batch statistics are noise.
    BatchNorm,
    /// [`FrozenBatchNorm2d`]: pretrained statistics and affine parameters, fixed.
    FrozenBatchNorm,
    /// [`GroupNorm`] with `groups` groups, or `group_count(C, 32)` when `None`.
    GroupNorm {
        /// Explicit group count; must divide every normalized layer's width.
        groups: Option<usize>,
    },
    /// [`WsConv2d`] (mmcv convention) followed by [`GroupNorm`].
    WsGroupNorm {
        /// Explicit group count; must divide every normalized layer's width.
        groups: Option<usize>,
    },
}

impl NormKind {
    /// The group count this kind gives a layer of `channels` channels (`None` for the
    /// BatchNorm kinds). Errors when an explicit count does not divide `channels`.
    pub fn groups_for(&self, channels: usize) -> Result<Option<usize>> {
        match *self {
            NormKind::BatchNorm | NormKind::FrozenBatchNorm => Ok(None),
            NormKind::GroupNorm { groups } | NormKind::WsGroupNorm { groups } => {
                match groups {
                    None => Ok(Some(group_count(channels, DEFAULT_GROUPS))),
                    Some(g) if g > 0 && channels.is_multiple_of(g) => Ok(Some(g)),
                    Some(g) => {
                        candle::bail!(
                    "norm '{self}': {g} groups do not divide a layer of {channels} channels; \
                     use plain '{}' (group_count(C, 32) per layer) or a divisor such as {}",
                    if matches!(self, NormKind::WsGroupNorm { .. }) { "ws-gn" } else { "gn" },
                    group_count(channels, g.max(1))
                )
                    }
                }
            }
        }
    }

    /// Whether the convolutions before this norm are Weight-Standardized.
    pub fn uses_weight_standardization(&self) -> bool {
        matches!(self, NormKind::WsGroupNorm { .. })
    }

    /// Whether the norm's output depends on the other samples of the batch (and so differs
    /// between train and eval).
    pub fn depends_on_batch(&self) -> bool {
        matches!(self, NormKind::BatchNorm)
    }
}

impl fmt::Display for NormKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NormKind::BatchNorm => write!(f, "bn"),
            NormKind::FrozenBatchNorm => write!(f, "frozen-bn"),
            NormKind::GroupNorm { groups: None } => write!(f, "gn"),
            NormKind::GroupNorm { groups: Some(g) } => write!(f, "gn:{g}"),
            NormKind::WsGroupNorm { groups: None } => write!(f, "ws-gn"),
            NormKind::WsGroupNorm { groups: Some(g) } => write!(f, "ws-gn:{g}"),
        }
    }
}

impl FromStr for NormKind {
    type Err = candle::Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        let (name, groups) = match lower.split_once(':') {
            None => (lower.as_str(), None),
            Some((name, g)) => match g.parse::<usize>() {
                Ok(g) if g > 0 => (name, Some(g)),
                _ => candle::bail!(
                    "norm '{s}': the group count after ':' must be a positive integer, e.g. gn:16"
                ),
            },
        };
        let kind = match name {
            "bn" | "batchnorm" | "batch-norm" => NormKind::BatchNorm,
            "frozen-bn" | "frozenbn" | "frozen_bn" => NormKind::FrozenBatchNorm,
            "gn" | "groupnorm" | "group-norm" => NormKind::GroupNorm { groups },
            "ws-gn" | "wsgn" | "ws_gn" => NormKind::WsGroupNorm { groups },
            _ => candle::bail!(
                "unknown norm '{s}': expected one of bn, frozen-bn, gn, gn:G, ws-gn, ws-gn:G"
            ),
        };
        if groups.is_some()
            && !matches!(
                kind,
                NormKind::GroupNorm { .. } | NormKind::WsGroupNorm { .. }
            )
        {
            candle::bail!("norm '{s}': only gn and ws-gn take a group count")
        }
        Ok(kind)
    }
}

/// The activation that follows a norm in a [`ConvNormAct`] block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    /// No activation.
    #[default]
    Identity,
    /// SiLU / swish, `x * sigmoid(x)`; fused into GroupNorm's kernel when the norm is GN.
    Silu,
    /// ReLU.
    Relu,
}

impl Activation {
    /// Applies the activation.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Identity => Ok(x.clone()),
            Activation::Silu => candle_nn::ops::silu(x),
            Activation::Relu => x.relu(),
        }
    }
}

/// A normalization layer of any [`NormKind`], built by [`norm`].
#[derive(Clone, Debug)]
pub enum Norm {
    /// Trainable BatchNorm (candle-nn).
    Batch(BatchNorm),
    /// Frozen BatchNorm.
    Frozen(FrozenBatchNorm2d),
    /// GroupNorm (with or without WS in the preceding conv).
    Group(GroupNorm),
}

impl Norm {
    /// The norm followed by `act`. GroupNorm + SiLU runs as one fused kernel.
    pub fn forward_act(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        match (self, act) {
            (Norm::Group(gn), Activation::Silu) => gn.forward_silu(x),
            _ => act.apply(&self.forward_t(x, train)?),
        }
    }
}

impl ModuleT for Norm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Norm::Batch(bn) => {
                if train && x.rank() >= 2 && x.elem_count() / x.dim(1)?.max(1) < 2 {
                    // PyTorch raises here; candle-nn would divide by zero in the unbiased
                    // running variance and store inf.
                    candle::bail!(
                        "BatchNorm: training needs more than 1 value per channel, got input {:?}; \
                         at batch 1 use NormKind::GroupNorm or NormKind::FrozenBatchNorm (gn, frozen-bn)",
                        x.dims()
                    )
                }
                bn.forward_t(x, train)
            }
            Norm::Frozen(bn) => bn.forward(x),
            Norm::Group(gn) => gn.forward(x),
        }
    }
}

/// Builds the norm layer of `kind` for `channels` channels from `vb`, with PyTorch keys
/// (`weight`, `bias`, and for the BatchNorm kinds `running_mean`, `running_var`) and eps 1e-5.
///
/// ```
/// use candle::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use keel_norm::{norm, NormKind};
/// # fn main() -> candle::Result<()> {
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let gn = norm("gn".parse()?, 48, vb.pp("n1"))?;
/// let y = gn.forward_t(&Tensor::randn(0f32, 1., (1, 48, 4, 4), &Device::Cpu)?, true)?;
/// assert_eq!(y.dims(), &[1, 48, 4, 4]);
/// # Ok(()) }
/// ```
pub fn norm(kind: NormKind, channels: usize, vb: VarBuilder) -> Result<Norm> {
    match kind {
        NormKind::BatchNorm => Ok(Norm::Batch(candle_nn::batch_norm(
            channels,
            candle_nn::BatchNormConfig::from(NORM_EPS),
            vb,
        )?)),
        NormKind::FrozenBatchNorm => Ok(Norm::Frozen(frozen_batch_norm2d(
            channels,
            FrozenBatchNormConfig::default(),
            vb,
        )?)),
        NormKind::GroupNorm { .. } | NormKind::WsGroupNorm { .. } => {
            let groups = kind.groups_for(channels)?.unwrap_or(1);
            Ok(Norm::Group(group_norm(groups, channels, NORM_EPS, vb)?))
        }
    }
}

/// A convolution without bias for a conv+norm block: plain for most kinds, Weight-Standardized
/// (mmcv convention) for `ws-gn`.
#[derive(Clone, Debug)]
pub enum Conv {
    /// A plain convolution: candle-nn's layer type (weights and config), run on keel's
    /// conv2d op ([`keel_kernels::conv2d`]), not candle's.
    Plain(candle_nn::Conv2d),
    /// Weight-Standardized convolution.
    Ws(WsConv2d),
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Conv::Plain(c) => crate::conv::conv2d("Conv2d", x, c.weight(), c.bias(), c.config()),
            Conv::Ws(c) => c.forward(x),
        }
    }
}

/// Builds the bias-free convolution that precedes a norm of `kind` (key `weight` under `vb`).
pub fn conv_for(
    kind: NormKind,
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv> {
    if cfg.groups == 0
        || !in_channels.is_multiple_of(cfg.groups)
        || !out_channels.is_multiple_of(cfg.groups)
    {
        candle::bail!(
            "conv: groups ({}) must divide in_channels ({in_channels}) and out_channels ({out_channels})",
            cfg.groups
        )
    }
    if kind.uses_weight_standardization() {
        Ok(Conv::Ws(ws_conv2d_no_bias(
            in_channels,
            out_channels,
            kernel_size,
            cfg,
            WsConfig::mmcv(),
            vb,
        )?))
    } else {
        Ok(Conv::Plain(candle_nn::conv2d_no_bias(
            in_channels,
            out_channels,
            kernel_size,
            cfg,
            vb,
        )?))
    }
}

/// conv (no bias) -> norm -> activation, the building block of detection and segmentation
/// backbones, with its norm chosen by a [`NormKind`]. Keys: `conv.weight` and `norm.*`.
#[derive(Clone, Debug)]
pub struct ConvNormAct {
    conv: Conv,
    norm: Norm,
    act: Activation,
}

impl ConvNormAct {
    /// Assembles a block from its parts.
    pub fn new(conv: Conv, norm: Norm, act: Activation) -> Self {
        Self { conv, norm, act }
    }

    /// The convolution.
    pub fn conv(&self) -> &Conv {
        &self.conv
    }

    /// The norm.
    pub fn norm(&self) -> &Norm {
        &self.norm
    }
}

impl ModuleT for ConvNormAct {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        self.norm.forward_act(&y, train, self.act)
    }
}

/// Builds a [`ConvNormAct`] from `vb` (keys `conv.weight`, `norm.weight`, `norm.bias`, and
/// `norm.running_mean`/`norm.running_var` for the BatchNorm kinds).
///
/// ```
/// use candle::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
/// use keel_norm::{conv_norm_act, Activation, NormKind};
/// # fn main() -> candle::Result<()> {
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let cfg = Conv2dConfig { padding: 1, ..Default::default() };
/// for kind in ["bn", "frozen-bn", "gn", "ws-gn"] {
///     let block = conv_norm_act(3, 32, 3, cfg, kind.parse()?, Activation::Silu, vb.pp(kind))?;
///     let y = block.forward_t(&Tensor::randn(0f32, 1., (2, 3, 8, 8), &Device::Cpu)?, true)?;
///     assert_eq!(y.dims(), &[2, 32, 8, 8]);
/// }
/// # Ok(()) }
/// ```
pub fn conv_norm_act(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    kind: NormKind,
    act: Activation,
    vb: VarBuilder,
) -> Result<ConvNormAct> {
    // Check the norm config first so a bad group count creates no variables.
    kind.groups_for(out_channels)?;
    let conv = conv_for(
        kind,
        in_channels,
        out_channels,
        kernel_size,
        cfg,
        vb.pp("conv"),
    )?;
    let norm = norm(kind, out_channels, vb.pp("norm"))?;
    Ok(ConvNormAct::new(conv, norm, act))
}

/// Serialized as its string form (`"gn:16"`, `"ws-gn"`, ...), the same text `--norm` takes.
impl serde::Serialize for NormKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for NormKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
