//! The FCOS head: `FCOSHead` of `fcos_core/modeling/rpn/fcos/fcos.py` (tianzhi0549/FCOS),
//! with the reference's state-dict names.
//!
//! Two towers of `num_convs` blocks (3x3 conv with bias + norm + activation; keys
//! `cls_tower.{3i}.weight/bias` for the conv and `cls_tower.{3i+1}.*` for the norm, as the
//! reference's `nn.Sequential(conv, GroupNorm, ReLU, ...)`), shared by all levels, then
//! `cls_logits` (bias `-log((1 - p) / p)`), `bbox_pred` and `centerness`. Convs are
//! initialised N(0, 0.01) with zero bias.
//!
//! Centerness runs on the classification tower by default, as the reference's
//! `MODEL.FCOS.CENTERNESS_ON_REG = False` (`fcos_core/config/defaults.py`, the ICCV paper);
//! [`FcosHeadConfig::centerness_on_reg`] moves it to the regression tower, as the
//! reference's "imprv" configs (`fcos_imprv_*`) do.
//!
//! Box regression: `exp(scale_l * bbox_pred)` with a learnable per-level `scales.{l}.scale`
//! (init 1), the reference's default (`NORM_REG_TARGETS = False`); its outputs are
//! `(l, t, r, b)` distances in input pixels, matching [`FcosTargetConfig`] with
//! `norm_reg_targets = false`.
//!
//! The reference's `NORM_REG_TARGETS = True` branch (used by the "imprv" configs together
//! with `CENTERNESS_ON_REG = True`) is **not** implemented: there the head outputs
//! `relu(scale_l * bbox_pred)` in strides while training and multiplies it by the stride at
//! test time. This head always outputs pixels, so with
//! [`FcosTargetConfig::norm_reg_targets`] `= true` the caller must divide each level's
//! `bbox_reg` by its stride before [`fcos_loss`] (as `tests/fcos.rs` does), and hand
//! [`fcos_detections`] pixel distances (i.e. not divide, or multiply back by the stride).
//!
//! [`FcosTargetConfig`]: super::FcosTargetConfig
//! [`FcosTargetConfig::norm_reg_targets`]: super::FcosTargetConfig::norm_reg_targets
//! [`fcos_loss`]: super::fcos_loss
//! [`fcos_detections`]: super::fcos_detections
use candle::{bail, Module, Result, Tensor};
use candle_nn::{init::Init, Conv2dConfig, VarBuilder};
use keel_norm::{conv_for, norm, Activation, Conv, Norm, NormKind};

/// The head outputs of a batch, one `(N, K, H_l, W_l)` tensor per level.
#[derive(Clone, Debug)]
pub struct FcosOutputs {
    /// Class logits, `K = num_classes`.
    pub cls_logits: Vec<Tensor>,
    /// `(l, t, r, b)` distances in pixels, positive, `K = 4`.
    pub bbox_reg: Vec<Tensor>,
    /// Centerness logits, `K = 1`.
    pub centerness: Vec<Tensor>,
}

impl FcosOutputs {
    /// The `(H_l, W_l)` of each level.
    pub fn feature_sizes(&self) -> Result<Vec<(usize, usize)>> {
        self.cls_logits
            .iter()
            .map(|x| Ok((x.dim(2)?, x.dim(3)?)))
            .collect()
    }
}

/// The configuration of an [`FcosHead`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FcosHeadConfig {
    /// Number of object classes (no background class).
    pub num_classes: usize,
    /// Channels of every input level (the FPN width) and of the towers.
    pub channels: usize,
    /// Conv blocks per tower (FCOS: 4).
    pub num_convs: usize,
    /// Number of levels (one scale each): 5 for P3-P7, 3 for P3-P5.
    pub num_levels: usize,
    /// The towers' norm (FCOS: GroupNorm with 32 groups, `gn`).
    pub norm: NormKind,
    /// The towers' activation: ReLU as FCOS, or SiLU (fused with GroupNorm).
    pub act: Activation,
    /// Prior probability of the classification bias (FCOS: 0.01).
    pub prior_prob: f64,
    /// Predict centerness from the regression tower instead of the classification tower
    /// (the reference's `CENTERNESS_ON_REG`, default `false`; `true` in its "imprv"
    /// configs, which also set `NORM_REG_TARGETS`, not implemented here: see the
    /// [module docs](self)).
    pub centerness_on_reg: bool,
}

impl FcosHeadConfig {
    /// FCOS's defaults: 4 GN(32)+ReLU convs per tower, 5 levels, prior 0.01, centerness on
    /// the classification tower.
    pub fn new(num_classes: usize, channels: usize) -> Self {
        Self {
            num_classes,
            channels,
            num_convs: 4,
            num_levels: 5,
            norm: NormKind::GroupNorm { groups: None },
            act: Activation::Relu,
            prior_prob: 0.01,
            centerness_on_reg: false,
        }
    }
}

/// One tower block: conv (with bias, unless Weight-Standardized) + norm + activation.
#[derive(Clone, Debug)]
struct TowerBlock {
    conv: Conv,
    norm: Norm,
}

/// A learnable scalar multiplier (the reference's `Scale`, key `scale`, init 1).
#[derive(Clone, Debug)]
pub struct Scale {
    scale: Tensor,
}

impl Scale {
    /// Builds a scale with key `scale` (shape `(1,)`, init `init`).
    pub fn new(init: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            scale: vb.get_with_hints(1, "scale", Init::Const(init))?,
        })
    }

    /// The scale parameter, `(1,)`.
    pub fn scale(&self) -> &Tensor {
        &self.scale
    }
}

impl Module for Scale {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&self.scale.to_dtype(x.dtype())?)
    }
}

/// A 3x3 (padding 1) conv with bias, N(0, 0.01) weights and constant bias.
fn head_conv(cin: usize, cout: usize, bias: f64, vb: VarBuilder) -> Result<Conv> {
    let w = vb.get_with_hints(
        (cout, cin, 3, 3),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: 0.01,
        },
    )?;
    let b = vb.get_with_hints(cout, "bias", Init::Const(bias))?;
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    Ok(Conv::Plain(candle_nn::Conv2d::new(w, Some(b), cfg)))
}

/// The FCOS head, shared by all levels (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct FcosHead {
    cls_tower: Vec<TowerBlock>,
    bbox_tower: Vec<TowerBlock>,
    cls_logits: Conv,
    bbox_pred: Conv,
    centerness: Conv,
    scales: Vec<Scale>,
    cfg: FcosHeadConfig,
}

fn tower(cfg: &FcosHeadConfig, vb: VarBuilder) -> Result<Vec<TowerBlock>> {
    let c = cfg.channels;
    (0..cfg.num_convs)
        .map(|i| {
            let conv = if cfg.norm.uses_weight_standardization() {
                let pad = Conv2dConfig {
                    padding: 1,
                    ..Default::default()
                };
                conv_for(cfg.norm, c, c, 3, pad, vb.pp(3 * i))?
            } else {
                head_conv(c, c, 0.0, vb.pp(3 * i))?
            };
            let norm = norm(cfg.norm, c, vb.pp(3 * i + 1))?;
            Ok(TowerBlock { conv, norm })
        })
        .collect()
}

/// Builds an [`FcosHead`] under `vb` with the reference's keys.
///
/// # Errors
/// Zero classes/channels/levels, a prior outside (0, 1), a group count that does not
/// divide `channels`.
///
/// ```
/// use candle::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use keel_det::fcos::{fcos_head, FcosHeadConfig};
/// # fn main() -> candle::Result<()> {
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let cfg = FcosHeadConfig { num_convs: 1, num_levels: 2, ..FcosHeadConfig::new(3, 32) };
/// let head = fcos_head(cfg, vb)?;
/// let p3 = Tensor::randn(0f32, 1., (2, 32, 4, 4), &Device::Cpu)?;
/// let p4 = Tensor::randn(0f32, 1., (2, 32, 2, 2), &Device::Cpu)?;
/// let out = head.forward_t(&[p3, p4], true)?;
/// assert_eq!(out.cls_logits[0].dims(), &[2, 3, 4, 4]);
/// assert_eq!(out.bbox_reg[1].dims(), &[2, 4, 2, 2]);
/// # Ok(()) }
/// ```
pub fn fcos_head(cfg: FcosHeadConfig, vb: VarBuilder) -> Result<FcosHead> {
    const OP: &str = "FcosHead";
    if cfg.num_classes == 0 || cfg.channels == 0 || cfg.num_levels == 0 {
        bail!(
            "{OP}: num_classes ({}), channels ({}) and num_levels ({}) must be positive",
            cfg.num_classes,
            cfg.channels,
            cfg.num_levels
        )
    }
    if !(cfg.prior_prob > 0.0 && cfg.prior_prob < 1.0) {
        bail!(
            "{OP}: prior_prob ({}) must be in (0, 1); FCOS uses 0.01",
            cfg.prior_prob
        )
    }
    cfg.norm.groups_for(cfg.channels)?;
    let c = cfg.channels;
    let prior_bias = -((1.0 - cfg.prior_prob) / cfg.prior_prob).ln();
    Ok(FcosHead {
        cls_tower: tower(&cfg, vb.pp("cls_tower"))?,
        bbox_tower: tower(&cfg, vb.pp("bbox_tower"))?,
        cls_logits: head_conv(c, cfg.num_classes, prior_bias, vb.pp("cls_logits"))?,
        bbox_pred: head_conv(c, 4, 0.0, vb.pp("bbox_pred"))?,
        centerness: head_conv(c, 1, 0.0, vb.pp("centerness"))?,
        scales: (0..cfg.num_levels)
            .map(|l| Scale::new(1.0, vb.pp("scales").pp(l)))
            .collect::<Result<_>>()?,
        cfg,
    })
}

impl FcosHead {
    /// The configuration.
    pub fn config(&self) -> &FcosHeadConfig {
        &self.cfg
    }

    /// The per-level regression scales.
    pub fn scales(&self) -> &[Scale] {
        &self.scales
    }

    fn run_tower(&self, blocks: &[TowerBlock], x: &Tensor, train: bool) -> Result<Tensor> {
        blocks.iter().try_fold(x.clone(), |x, b| {
            b.norm
                .forward_act(&b.conv.forward(&x)?, train, self.cfg.act)
        })
    }

    /// Runs the head on every level.
    ///
    /// # Shapes
    /// `features[l]`: `(N, channels, H_l, W_l)`, `num_levels` of them; outputs as
    /// [`FcosOutputs`].
    pub fn forward_t(&self, features: &[Tensor], train: bool) -> Result<FcosOutputs> {
        if features.len() != self.cfg.num_levels {
            bail!("FcosHead: got {} feature levels, the head was built for {}; set FcosHeadConfig::num_levels", features.len(), self.cfg.num_levels)
        }
        let mut out = FcosOutputs {
            cls_logits: vec![],
            bbox_reg: vec![],
            centerness: vec![],
        };
        for (x, scale) in features.iter().zip(&self.scales) {
            let c = x.dim(1)?;
            if x.rank() != 4 || c != self.cfg.channels {
                bail!(
                    "FcosHead: features must be (N, {}, H, W), got {:?}",
                    self.cfg.channels,
                    x.dims()
                )
            }
            let cls = self.run_tower(&self.cls_tower, x, train)?;
            let reg = self.run_tower(&self.bbox_tower, x, train)?;
            out.cls_logits.push(self.cls_logits.forward(&cls)?);
            let ctr_in = if self.cfg.centerness_on_reg {
                &reg
            } else {
                &cls
            };
            out.centerness.push(self.centerness.forward(ctr_in)?);
            out.bbox_reg
                .push(scale.forward(&self.bbox_pred.forward(&reg)?)?.exp()?);
        }
        Ok(out)
    }
}
