//! The detector: a backbone's C3-C5, either keel-models' [`SegEncoder`] (the twin encoder,
//! the default) or a torchvision [`ResNet`] (R18/34: 128/256/512 channels, R50/101:
//! 512/1024/2048), + keel-det's FPN (P3-P5: strides 8, 16, 32, enough levels for images of
//! 128-256 pixels; P6/P7 would be 4x4 and smaller) + the FCOS head (GroupNorm + SiLU towers,
//! keel's fused GN kernel). Names: `backbone.*` (SegNet's encoder names, or torchvision's
//! ResNet names), `fpn.*`, `head.*` (FCOS's).
use candle::{bail, DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use keel::det::fcos::{
    fcos_head, fpn, seeded_init, FcosHead, FcosHeadConfig, FcosOutputs, Fpn, FpnConfig,
};
use keel::models::backbone::{backbone_param_groups, BACKBONE_PREFIX};
use keel::models::resnet::{ResNet, ResNetConfig};
use keel::models::seg::{copy_bn_stats, init_weights, SegEncoder};
use keel::norm::{group_count, Activation, NormKind};
use keel::optim::{split_no_decay_with, NoDecay, ParamGroup};
use serde::{Deserialize, Serialize};

/// The strides of P3, P4, P5.
pub const STRIDES: [usize; 3] = [8, 16, 32];

/// The detector's shape.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetModelConfig {
    /// Base width of the encoder (C3-C5 have 2w, 4w, 8w channels).
    pub width: usize,
    /// Width of the FPN levels and the head towers.
    pub fpn: usize,
    /// Conv blocks per head tower (FCOS: 4).
    pub head_convs: usize,
    /// Object classes (no background).
    pub num_classes: usize,
    /// The twin encoder's norm (the FPN has none and the head always GroupNorm with 8
    /// channels per group, as FCOS's GN(32) of 256 channels).
    pub norm: NormKind,
    /// A torchvision ResNet backbone instead of the twin encoder (`width` and `norm` unused).
    pub resnet: Option<ResNetConfig>,
}

impl DetModelConfig {
    /// The head towers' norm: FCOS's GN(32) on 256 channels has 8 channels per group, so
    /// does the head here.
    pub fn head_norm(&self) -> NormKind {
        NormKind::GroupNorm {
            groups: Some(group_count(self.fpn, self.fpn.div_ceil(8))),
        }
    }

    /// Whether the detector runs in `dtype`: a ResNet backbone with a trainable BatchNorm
    /// trains in f32 only (a cast copy's running statistics are not written back to the
    /// master weights, as in keel-models' SegModel); the twin runs in any dtype.
    pub fn check_dtype(&self, dtype: DType) -> Result<()> {
        match self.resnet {
            Some(r) if dtype != DType::F32 && r.norm == NormKind::BatchNorm && r.freeze_at < 5 => {
                bail!(
                    "FcosNet: a ResNet backbone with trainable BatchNorm (backbone norm {}, \
                     freeze_at {}) trains in f32 only, not {dtype:?}; use frozen-bn or gn (the \
                     recommended fine-tuning norms), or f32",
                    r.norm,
                    r.freeze_at
                )
            }
            _ => Ok(()),
        }
    }
}

/// The feature extractor: C3-C5 of the twin encoder or of a ResNet.
enum Backbone {
    Twin(SegEncoder),
    ResNet(ResNet),
}

/// The FCOS detector (see the module docs).
pub struct FcosNet {
    encoder: Backbone,
    fpn: Fpn,
    head: FcosHead,
}

impl FcosNet {
    /// Builds the detector under `vb`.
    pub fn new(cfg: &DetModelConfig, vb: VarBuilder) -> Result<Self> {
        let vbb = vb.pp(BACKBONE_PREFIX);
        let (encoder, c) = match &cfg.resnet {
            None => {
                let e = SegEncoder::new(cfg.width, cfg.norm, vbb)?;
                let w = e.widths();
                (Backbone::Twin(e), [w[1], w[2], w[3]])
            }
            Some(r) => {
                let c = r.out_channels();
                (Backbone::ResNet(ResNet::new(r, vbb)?), [c[1], c[2], c[3]])
            }
        };
        let fpn_cfg = FpnConfig {
            in_channels: c,
            out_channels: cfg.fpn,
            norm: None,
            extra_levels: 0,
        };
        let head_cfg = FcosHeadConfig {
            num_convs: cfg.head_convs,
            norm: cfg.head_norm(),
            num_levels: STRIDES.len(),
            act: Activation::Silu,
            ..FcosHeadConfig::new(cfg.num_classes, cfg.fpn)
        };
        Ok(Self {
            encoder,
            fpn: fpn(&fpn_cfg, vb.pp("fpn"))?,
            head: fcos_head(head_cfg, vb.pp("head"))?,
        })
    }

    /// The optimizer's parameter groups over `vm` (the VarMap the detector was built from):
    /// the twin's [`split_no_decay_with`] `no_decay` (the run config's rule), or with a
    /// ResNet the head (FPN and FCOS head) at the base LR and the backbone's trainable
    /// variables at `lr * backbone_lr_mult` (frozen stages and FrozenBatchNorm tensors in no
    /// group; biases and norm parameters never decay: [`backbone_param_groups`]).
    pub fn param_groups(
        &self,
        vm: &VarMap,
        backbone_lr_mult: f64,
        no_decay: NoDecay,
    ) -> Result<Vec<ParamGroup>> {
        match &self.encoder {
            Backbone::Twin(_) => Ok(split_no_decay_with(vm, no_decay)),
            Backbone::ResNet(r) => backbone_param_groups(vm, r, backbone_lr_mult),
        }
    }

    /// Seeded init of every variable of `vm` (built by [`FcosNet::new`]): the backbone by
    /// keel-models' PyTorch rules, the FPN and head by FCOS's (keel-det's `seeded_init`).
    pub fn init(vm: &VarMap, seed: u64) -> Result<()> {
        let params = keel::train::named_vars(vm);
        let backbone = VarMap::new();
        {
            let mut data = backbone.data().lock().unwrap_or_else(|e| e.into_inner());
            for (k, v) in params.iter().filter(|(k, _)| k.starts_with("backbone.")) {
                data.insert(k.clone(), v.clone());
            }
        }
        init_weights(&backbone, seed)?;
        seeded_init(&params, "fpn", "head", seed.wrapping_add(1))
    }

    /// The head outputs of images `x`; `train` selects BatchNorm's batch statistics.
    ///
    /// # Shapes
    /// x: `(N, 3, H, W)`; outputs P3-P5 as [`FcosOutputs`] (`bbox_reg` in input pixels).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<FcosOutputs> {
        let p = match &self.encoder {
            Backbone::Twin(e) => self.fpn.forward_t(&e.forward(x, train)?[1..], train)?,
            Backbone::ResNet(r) => self
                .fpn
                .forward_t(&r.forward(x, train)?.features[1..], train)?,
        };
        self.head.forward_t(&p, train)
    }

    /// [`FcosNet::forward`] in `dtype`: the master model for F32, else a copy cast from the
    /// f32 master weights of `vm` (the gradients reach them), whose twin encoder's BatchNorm
    /// statistics are written back after a training forward (a ResNet with trainable
    /// BatchNorm is refused: [`DetModelConfig::check_dtype`]). Outputs are f32.
    pub fn forward_in(
        &self,
        cfg: &DetModelConfig,
        vm: &VarMap,
        x: &Tensor,
        dtype: DType,
        train: bool,
    ) -> Result<FcosOutputs> {
        let cast = Self::cast_copy(cfg, vm, dtype, x.device())?;
        let net = cast.as_ref().unwrap_or(self);
        let out = net.forward(&x.to_dtype(dtype)?, train)?;
        if let Some(Backbone::Twin(e)) = cast.as_ref().filter(|_| train).map(|c| &c.encoder) {
            let bns: Vec<_> = e
                .batch_norms()
                .into_iter()
                .map(|(k, bn)| (format!("backbone.{k}"), bn))
                .collect();
            copy_bn_stats("FcosNet::forward_in", &bns, vm)?;
        }
        let f32s = |v: Vec<Tensor>| -> Result<Vec<Tensor>> {
            v.iter().map(|t| t.to_dtype(DType::F32)).collect()
        };
        Ok(FcosOutputs {
            cls_logits: f32s(out.cls_logits)?,
            bbox_reg: f32s(out.bbox_reg)?,
            centerness: f32s(out.centerness)?,
        })
    }

    /// `cfg`'s detector in `dtype` on the f32 master weights of `vm`; `None` for F32.
    /// Errors as [`DetModelConfig::check_dtype`].
    pub fn cast_copy(
        cfg: &DetModelConfig,
        vm: &VarMap,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<FcosNet>> {
        cfg.check_dtype(dtype)?;
        if dtype == DType::F32 {
            return Ok(None);
        }
        let vb = keel::optim::mixed::cast_var_builder(vm, dtype, device);
        Ok(Some(FcosNet::new(cfg, vb)?))
    }
}
