//! The detector: keel-models' [`SegEncoder`] (C3-C5 of the twin encoder) + keel-det's FPN
//! (P3-P5: strides 8, 16, 32, enough levels for images of 128-256 pixels; P6/P7 would be
//! 4x4 and smaller) + the FCOS head (GroupNorm + SiLU towers, keel's fused GN kernel).
//! Names: `backbone.*` (SegNet's encoder names), `fpn.*`, `head.*` (FCOS's).
use candle::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use keel::det::fcos::{
    fcos_head, fpn, seeded_init, FcosHead, FcosHeadConfig, FcosOutputs, Fpn, FpnConfig,
};
use keel::models::seg::{copy_bn_stats, init_weights, SegEncoder};
use keel::norm::{group_count, Activation, NormKind};
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
    /// The backbone's norm (the FPN has none and the head always GroupNorm with 8 channels
    /// per group, as FCOS's GN(32) of 256 channels).
    pub norm: NormKind,
}

/// The FCOS detector (see the module docs).
pub struct FcosNet {
    encoder: SegEncoder,
    fpn: Fpn,
    head: FcosHead,
}

impl FcosNet {
    /// Builds the detector under `vb`.
    pub fn new(cfg: &DetModelConfig, vb: VarBuilder) -> Result<Self> {
        let encoder = SegEncoder::new(cfg.width, cfg.norm, vb.pp("backbone"))?;
        let w = encoder.widths();
        let fpn_cfg = FpnConfig {
            in_channels: [w[1], w[2], w[3]],
            out_channels: cfg.fpn,
            norm: None,
            extra_levels: 0,
        };
        // FCOS's GN(32) on 256 channels has 8 channels per group: so does the head here.
        let head_cfg = FcosHeadConfig {
            num_convs: cfg.head_convs,
            norm: NormKind::GroupNorm {
                groups: Some(group_count(cfg.fpn, cfg.fpn.div_ceil(8))),
            },
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
        let c = self.encoder.forward(x, train)?;
        let p = self.fpn.forward_t(&c[1..], train)?;
        self.head.forward_t(&p, train)
    }

    /// [`FcosNet::forward`] in `dtype`: the master model for F32, else a copy cast from the
    /// f32 master weights of `vm` (the gradients reach them), whose backbone BatchNorm
    /// statistics are written back after a training forward. Outputs are f32.
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
        if let Some(c) = cast.as_ref().filter(|_| train) {
            let bns: Vec<_> = c
                .encoder
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
    pub fn cast_copy(
        cfg: &DetModelConfig,
        vm: &VarMap,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<FcosNet>> {
        if dtype == DType::F32 {
            return Ok(None);
        }
        let vb = keel::optim::mixed::cast_var_builder(vm, dtype, device);
        Ok(Some(FcosNet::new(cfg, vb)?))
    }
}
