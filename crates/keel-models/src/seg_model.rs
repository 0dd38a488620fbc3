//! [`SegModel`]: the segmentation network a training loop builds from a [`SegModelConfig`],
//! either keel's twin ([`SegNet`]) or [`ResNetSeg`], a torchvision ResNet backbone
//! ([`ResNet`]: C2-C5) under SegNet's FPN-lite decoder and head (Lin et al., 2017,
//! arXiv:1612.03144), so the loop does not care which.
//!
//! [`ResNetSeg`]'s parameter names: the backbone under `backbone.` with torchvision's
//! `state_dict` names (`backbone.conv1.weight`, `backbone.layer1.0.bn1.weight`,
//! `backbone.layer4.1.downsample.1.running_var`, ...), the decoder and head at the root with
//! SegNet's names (`lat.{0..3}.{weight,bias}` the 1x1 laterals, `smooth.0.weight` the 3x3
//! conv, `smooth.1.*` its norm, `head.{weight,bias}` the classifier). A torchvision
//! checkpoint loads into the backbone with [`ResNetSeg::load_backbone`].
//!
//! Inputs are normalized with torchvision's ImageNet mean and standard deviation, which is
//! what `keel-data`'s batches already hold (`(pixel / 255 - mean) / std`), so a pretrained
//! backbone sees the inputs it was trained on; the model itself does not normalize.
//!
//! # Fine-tuning at small batch
//! [`keel_norm::recommend_plan`] is the decision table: at batch < 16 a pretrained backbone
//! keeps its BatchNorm statistics frozen (`frozen-bn`) and the new head uses GroupNorm;
//! `freeze_at: 2` (detectron2's default) keeps the stem and `layer1` fixed, and
//! [`SegModel::param_groups`] gives the rest of the backbone a lower learning rate.
//!
//! ```
//! use candle::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use keel_models::resnet::ResNetDepth;
//! use keel_models::seg::init_weights;
//! use keel_models::seg_model::{ResNetSegConfig, SegModel, SegModelConfig};
//! let cfg = SegModelConfig::ResNet(ResNetSegConfig {
//!     depth: ResNetDepth::R18,
//!     backbone_norm: "frozen-bn".parse()?,
//!     head_norm: "gn:8".parse()?,
//!     freeze_at: 2,
//!     fpn: 16,
//!     num_classes: 3,
//! });
//! let vm = VarMap::new();
//! let model = SegModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
//! init_weights(&vm, 0)?;
//! let logits = model.forward(&Tensor::randn(0f32, 1.0, (1, 3, 45, 38), &Device::Cpu)?, true)?;
//! assert_eq!(logits.dims(), &[1, 3, 45, 38]);
//! // The head at the base LR, the trainable backbone (layer2-layer4) at a tenth of it.
//! let groups = model.param_groups(&vm, 0.1, keel_optim::NoDecay::Rank)?;
//! assert_eq!(groups.iter().map(|g| g.lr_mult).collect::<Vec<_>>(), [1.0, 1.0, 0.1, 0.1]);
//! # Ok::<(), candle::Error>(())
//! ```

use candle::{bail, DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use keel_norm::convert::StateDict;
use keel_norm::NormKind;
use keel_optim::{split_no_decay_with, NoDecay, ParamGroup};
use serde::{Deserialize, Serialize};

use crate::backbone::backbone_param_groups;
use crate::resnet::{ResNet, ResNetConfig, ResNetDepth, ResNetLoadReport};
use crate::seg::decoder::FpnDecoder;
use crate::seg::{ModelConfig, SegNet, StepNet};

pub use crate::backbone::BACKBONE_PREFIX;

/// [`ResNetSeg`]'s shape. Serialized with serde (depth as a number, norms as their text
/// forms).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResNetSegConfig {
    /// The torchvision ResNet of the backbone.
    pub depth: ResNetDepth,
    /// The backbone's norm (a frozen stage's `bn` becomes `frozen-bn`, as in [`ResNet`]).
    pub backbone_norm: NormKind,
    /// The norm of the decoder's smoothing block.
    pub head_norm: NormKind,
    /// detectron2's `freeze_at` for the backbone, 0..=5 (see [`ResNetConfig`]).
    pub freeze_at: usize,
    /// Channels of the FPN decoder, >= 1.
    pub fpn: usize,
    /// Number of output classes, >= 2.
    pub num_classes: usize,
}

impl ResNetSegConfig {
    /// The backbone's [`ResNetConfig`] (no classifier).
    pub fn backbone(&self) -> ResNetConfig {
        ResNetConfig {
            freeze_at: self.freeze_at,
            ..ResNetConfig::backbone(self.depth, self.backbone_norm)
        }
    }

    /// Whether any BatchNorm trains (its running statistics update in a training forward):
    /// a `bn` backbone with a stage above `freeze_at`, or a `bn` head.
    pub fn has_trainable_batch_norm(&self) -> bool {
        let backbone = self.backbone_norm == NormKind::BatchNorm && self.freeze_at < 5;
        backbone || self.head_norm == NormKind::BatchNorm
    }

    /// Checks the config before any variable is created; errors name the field, the value
    /// and the fix.
    pub fn validate(&self) -> Result<()> {
        self.backbone().validate()?;
        if self.fpn == 0 {
            bail!("ResNetSegConfig: fpn must be at least 1, got 0")
        }
        if self.num_classes < 2 {
            bail!(
                "ResNetSegConfig: num_classes {} must be at least 2 (background and one class)",
                self.num_classes
            )
        }
        if let Err(e) = self.head_norm.groups_for(self.fpn) {
            bail!(
                "ResNetSegConfig: head_norm {} at smooth.1 ({} channels): {e}",
                self.head_norm,
                self.fpn
            )
        }
        Ok(())
    }
}

/// A torchvision ResNet backbone with SegNet's FPN-lite decoder and head (names and
/// inputs in the [module docs](self)).
pub struct ResNetSeg {
    cfg: ResNetSegConfig,
    backbone: ResNet,
    decoder: FpnDecoder,
}

impl ResNetSeg {
    /// Builds the network from `vb` after [`ResNetSegConfig::validate`]: the backbone under
    /// `vb.pp("backbone")`, the decoder under `vb`.
    pub fn new(cfg: &ResNetSegConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let backbone = ResNet::new(&cfg.backbone(), vb.pp(BACKBONE_PREFIX))?;
        let bb = cfg.backbone();
        let decoder = FpnDecoder::new(
            bb.out_channels(),
            cfg.fpn,
            cfg.num_classes,
            cfg.head_norm,
            &vb,
        )?;
        Ok(Self {
            cfg: *cfg,
            backbone,
            decoder,
        })
    }

    /// The config the network was built with.
    pub fn config(&self) -> &ResNetSegConfig {
        &self.cfg
    }

    /// The backbone (its [`ResNet::trainable_names`] carry the `backbone.` prefix).
    pub fn backbone(&self) -> &ResNet {
        &self.backbone
    }

    /// Loads a torchvision checkpoint into the backbone's variables in `vm` (the VarMap the
    /// network was built from, with `vb` its root builder): [`ResNet::from_state_dict`]'s
    /// checks and conversions (`num_batches_tracked` dropped, BatchNorms kept, frozen or
    /// converted to GroupNorm for the backbone's norm, the first missing, misshapen or
    /// unexpected key named) all run before any variable changes. The decoder and head keep
    /// their values. Returns what was loaded and converted.
    pub fn load_backbone(
        &self,
        sd: StateDict,
        vm: &VarMap,
        vb: VarBuilder,
    ) -> Result<ResNetLoadReport> {
        let bb = self.cfg.backbone();
        // from_state_dict sets the existing variables in place; the network it builds on them
        // is the same as self.backbone.
        let (_, report) = ResNet::from_state_dict(&bb, sd, vm, vb.pp(BACKBONE_PREFIX))?;
        Ok(report)
    }

    /// Logits for images (already normalized, see the module docs); `train` selects batch
    /// statistics for trainable BatchNorm.
    ///
    /// # Shapes
    /// - x: `(N, 3, H, W)`, any `H, W >= 1`.
    /// - output: `(N, num_classes, H, W)`, x's dtype.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let out = self.backbone.forward(x, train)?;
        self.decoder.forward(&out.features, (h, w), train)
    }
}

/// Which segmentation network: keel's twin or a ResNet backbone. Serialized with serde as
/// `{"twin": {..}}` or `{"resnet": {..}}`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SegModelConfig {
    /// [`SegNet`], the PyTorch twin.
    Twin(ModelConfig),
    /// [`ResNetSeg`].
    ResNet(ResNetSegConfig),
}

impl SegModelConfig {
    /// Checks the config before any variable is created.
    pub fn validate(&self) -> Result<()> {
        match self {
            SegModelConfig::Twin(c) => c.validate(),
            SegModelConfig::ResNet(c) => c.validate(),
        }
    }

    /// Number of output classes.
    pub fn num_classes(&self) -> usize {
        match self {
            SegModelConfig::Twin(c) => c.num_classes,
            SegModelConfig::ResNet(c) => c.num_classes,
        }
    }

    /// Whether [`SegModel::forward_in`] can run in `dtype`: a ResNet model with a trainable
    /// BatchNorm trains in f32 only (a cast copy's running statistics are not written back to
    /// the master weights); the twin runs in any dtype.
    pub fn check_dtype(&self, dtype: DType) -> Result<()> {
        match self {
            SegModelConfig::ResNet(c) if dtype != DType::F32 && c.has_trainable_batch_norm() => {
                bail!(
                    "SegModel: a ResNet backbone with trainable BatchNorm (backbone norm {}, \
                     freeze_at {}, head norm {}) trains in f32 only, not {dtype:?}; use \
                     frozen-bn or gn (the recommended fine-tuning norms), or f32",
                    c.backbone_norm,
                    c.freeze_at,
                    c.head_norm
                )
            }
            _ => Ok(()),
        }
    }
}

/// A segmentation network built from a [`SegModelConfig`] (see the [module docs](self)).
pub enum SegModel {
    /// keel's twin.
    Twin(SegNet),
    /// A ResNet backbone with the FPN-lite decoder.
    ResNet(ResNetSeg),
}

impl SegModel {
    /// Builds the network from `vb` after validating `cfg`.
    pub fn new(cfg: &SegModelConfig, vb: VarBuilder) -> Result<Self> {
        Ok(match cfg {
            SegModelConfig::Twin(c) => SegModel::Twin(SegNet::new(c, vb)?),
            SegModelConfig::ResNet(c) => SegModel::ResNet(ResNetSeg::new(c, vb)?),
        })
    }

    /// Logits for images; `train` selects batch statistics for trainable BatchNorm.
    ///
    /// # Shapes
    /// - x: `(N, 3, H, W)`, any `H, W >= 1`.
    /// - output: `(N, num_classes, H, W)`, x's dtype.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            SegModel::Twin(m) => m.forward(x, train),
            SegModel::ResNet(m) => m.forward(x, train),
        }
    }

    /// `cfg`'s network in `dtype`, built on the f32 master weights of `vm` (casts the
    /// gradients flow back through); `None` for F32. Errors as
    /// [`SegModelConfig::check_dtype`].
    pub fn cast_copy(
        cfg: &SegModelConfig,
        vm: &VarMap,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<SegModel>> {
        cfg.check_dtype(dtype)?;
        match cfg {
            SegModelConfig::Twin(c) => Ok(SegNet::cast_copy(c, vm, dtype, device)?.map(Self::Twin)),
            SegModelConfig::ResNet(_) if dtype == DType::F32 => Ok(None),
            SegModelConfig::ResNet(c) => {
                let vb = keel_optim::mixed::cast_var_builder(vm, dtype, device);
                Ok(Some(SegModel::ResNet(ResNetSeg::new(c, vb)?)))
            }
        }
    }

    /// The network that one optimizer step runs in `dtype`, built once: the master itself
    /// for F32, else a [`SegModel::cast_copy`] of `vm`'s current weights, which every
    /// micro-batch of the step runs (see [`SegNet::for_step`]). Errors as
    /// [`SegModelConfig::check_dtype`], and when `cfg` is not this model's kind.
    pub fn for_step<'a>(
        &'a self,
        cfg: &SegModelConfig,
        vm: &'a VarMap,
        dtype: DType,
        device: &Device,
    ) -> Result<SegModelStep<'a>> {
        cfg.check_dtype(dtype)?;
        match (self, cfg) {
            (SegModel::Twin(m), SegModelConfig::Twin(c)) => {
                Ok(SegModelStep::Twin(m.for_step(c, vm, dtype, device)?))
            }
            (SegModel::ResNet(_), SegModelConfig::ResNet(_)) => Ok(SegModelStep::ResNet {
                master: self,
                cast: Self::cast_copy(cfg, vm, dtype, device)?,
                dtype,
            }),
            _ => bail!("SegModel::for_step: cfg is not the config this model was built with"),
        }
    }

    /// The logits of `x` (cast to `dtype`) from this master model (built with `cfg` from
    /// `vm`), run in `dtype`: itself for F32, else a [`SegModel::cast_copy`] (the twin's
    /// BatchNorm running statistics are written back to `vm` after a training forward).
    /// Builds the copy on every call: a step of several micro-batches uses
    /// [`SegModel::for_step`] once instead.
    ///
    /// # Shapes
    /// As [`SegModel::forward`]; the logits are in `dtype`.
    pub fn forward_in(
        &self,
        cfg: &SegModelConfig,
        vm: &VarMap,
        x: &Tensor,
        dtype: DType,
        train: bool,
    ) -> Result<Tensor> {
        self.for_step(cfg, vm, dtype, x.device())?.forward(x, train)
    }

    /// The optimizer's parameter groups over the variables of `vm` (the VarMap the model was
    /// built from), in a fixed order.
    ///
    /// - Twin: [`split_no_decay_with`] `no_decay` (`[decay, no_decay]`), `backbone_lr_mult`
    ///   unused. [`NoDecay::Rank`] exempts every bias and norm parameter; the twin names its
    ///   norms by position (`n1`, `skip.1`), so [`NoDecay::Names`] (runs before 2026-12-01)
    ///   decays its norm weights.
    /// - ResNet: `[head decay, head no_decay, backbone decay, backbone no_decay]`. The head is
    ///   every variable outside `backbone.`; the backbone groups hold only
    ///   [`ResNet::trainable_names`] (frozen stages and FrozenBatchNorm tensors are in no
    ///   group, so the optimizer keeps no state for them) at `lr * backbone_lr_mult`. Conv
    ///   weights decay; biases and norm parameters (rank <= 1) get no weight decay, whatever
    ///   `no_decay` says.
    ///
    /// Errors when `backbone_lr_mult` is negative or not finite.
    pub fn param_groups(
        &self,
        vm: &VarMap,
        backbone_lr_mult: f64,
        no_decay: NoDecay,
    ) -> Result<Vec<ParamGroup>> {
        if !(backbone_lr_mult.is_finite() && backbone_lr_mult >= 0.0) {
            bail!(
                "SegModel::param_groups: backbone_lr_mult {backbone_lr_mult} must be finite and \
                 non-negative (1.0 = the base LR)"
            )
        }
        match self {
            SegModel::Twin(_) => Ok(split_no_decay_with(vm, no_decay)),
            SegModel::ResNet(m) => backbone_param_groups(vm, &m.backbone, backbone_lr_mult),
        }
    }
}

/// The network of one optimizer step ([`SegModel::for_step`]).
pub enum SegModelStep<'a> {
    /// The twin's step network (a cast copy writes its BatchNorm statistics back).
    Twin(StepNet<'a>),
    /// A ResNet model: the master itself for F32, else its cast copy (no trainable
    /// BatchNorm under mixed precision: [`SegModelConfig::check_dtype`]).
    ResNet {
        /// The f32 master model.
        master: &'a SegModel,
        /// The copy in the step's dtype, `None` for F32.
        cast: Option<SegModel>,
        /// The step's compute dtype.
        dtype: DType,
    },
}

impl SegModelStep<'_> {
    /// The logits of `x` (cast to the step's dtype).
    ///
    /// # Shapes
    /// As [`SegModel::forward`]; the logits are in the step's dtype.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            SegModelStep::Twin(n) => n.forward(x, train),
            SegModelStep::ResNet {
                master,
                cast,
                dtype,
            } => cast
                .as_ref()
                .unwrap_or(master)
                .forward(&x.to_dtype(*dtype)?, train),
        }
    }
}
