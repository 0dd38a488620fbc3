//! Building seg_train's model from its `--backbone` flags (keel's
//! [`keel::models::backbone`]: the flags, their defaults and checks): keel's twin (the
//! default) or a torchvision ResNet backbone under the FPN-lite decoder
//! (`keel::models::seg_model`), seeded, then `--init` weights loaded (twin names for the
//! twin, a torchvision checkpoint from `scripts/torchvision_to_safetensors.py` for a ResNet),
//! before anything is written.
//!
//! Inputs are normalized with torchvision's ImageNet mean/std for every model (keel-data
//! does it), which is what a torchvision backbone expects.
use std::path::Path;

use anyhow::{bail, Context};
use candle::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use keel::models::backbone::{load_torchvision_init, BACKBONE_PREFIX};
use keel::models::seg::{init_weights, load_pretrained};
use keel::models::seg_model::{ResNetSegConfig, SegModel, SegModelConfig};
use keel::norm::NormKind;

use super::cli::RunConfig;

impl RunConfig {
    /// This config with the backbone defaults resolved for its `--init` (a fresh run's
    /// config.json records the values used).
    pub fn with_backbone_defaults(self) -> Self {
        let backbone = self.backbone.resolved(self.init.is_some(), self.norm);
        Self { backbone, ..self }
    }

    /// The model: the twin, or a ResNet backbone with the decoder (`--fpn`, `--norm` for the
    /// head).
    pub fn seg_model(&self) -> SegModelConfig {
        let b = self.backbone.resolved(self.init.is_some(), self.norm);
        match b.backbone.depth() {
            None => SegModelConfig::Twin(self.model()),
            Some(depth) => SegModelConfig::ResNet(ResNetSegConfig {
                depth,
                backbone_norm: b.backbone_norm.unwrap_or(self.norm),
                head_norm: self.norm,
                freeze_at: b.freeze_at.unwrap_or(0),
                fpn: self.fpn,
                num_classes: self.num_classes(),
            }),
        }
    }

    /// The backbone's LR multiplier (1 for the twin, whose parameters form one model).
    pub fn backbone_lr_mult(&self) -> f64 {
        self.backbone
            .resolved(self.init.is_some(), self.norm)
            .lr_mult()
    }

    /// The backbone's norm when the model has a separate backbone (for the health report).
    pub fn backbone_norm(&self) -> Option<NormKind> {
        match self.seg_model() {
            SegModelConfig::Twin(_) => None,
            SegModelConfig::ResNet(c) => Some(c.backbone_norm),
        }
    }

    /// The model's checks (`--backbone` flags, norms, sizes, `--amp`), before anything is
    /// built.
    pub fn validate_model(&self) -> anyhow::Result<()> {
        let b = &self.backbone;
        b.validate()?;
        let model = self.seg_model();
        model.validate()?;
        model.check_dtype(self.train.amp.compute_dtype())?;
        // The smallest BN input is the last stage's: 5 stride-2 convs, each ceil(n / 2).
        let bn = match model {
            SegModelConfig::Twin(c) => c.norm == NormKind::BatchNorm,
            SegModelConfig::ResNet(c) => c.backbone_norm == NormKind::BatchNorm && c.freeze_at < 5,
        };
        let side = (0..5).fold(self.image_size, |n, _| n.div_ceil(2));
        if bn && self.batch_size * side * side < 2 {
            let flag = if b.backbone.is_twin() {
                "--norm"
            } else {
                "--backbone-norm"
            };
            bail!(
                "{flag} bn cannot train at --batch-size {} with --image-size {}: the last stage is {side}x{side}, one value per channel; use {flag} gn or frozen-bn, a larger batch or image",
                self.batch_size,
                self.image_size
            )
        }
        Ok(())
    }
}

/// Builds the run's model on `vm` (seeded init, then `--init` weights if any); returns the
/// lines to print about the backbone and `--init`.
pub fn build(
    cfg: &RunConfig,
    vm: &VarMap,
    dev: &Device,
) -> anyhow::Result<(SegModel, Option<String>)> {
    let model_cfg = cfg.seg_model();
    let vb = VarBuilder::from_varmap(vm, DType::F32, dev);
    let model = SegModel::new(&model_cfg, vb.clone())?;
    init_weights(vm, cfg.seed)?;
    let init = match (&model, &cfg.init) {
        (_, None) => None,
        (SegModel::Twin(_), Some(p)) => Some(load_twin(vm, p, cfg.norm, dev)?),
        (SegModel::ResNet(m), Some(p)) => Some(load_torchvision_init(
            p,
            &m.config().backbone(),
            vm,
            vb.pp(BACKBONE_PREFIX),
            dev,
        )?),
    };
    let msg = match &model_cfg {
        SegModelConfig::Twin(_) => init,
        SegModelConfig::ResNet(c) => {
            let line = format!(
                "backbone {}: norm {}, freeze_at {}, lr x{}; head: norm {}, fpn {}",
                c.depth,
                c.backbone_norm,
                c.freeze_at,
                cfg.backbone_lr_mult(),
                c.head_norm,
                c.fpn
            );
            Some(init.map_or(line.clone(), |i| format!("{line}\n{i}")))
        }
    };
    Ok((model, msg))
}

/// Loads twin-named `--init` weights with keel's [`load_pretrained`]; returns the line to
/// print.
fn load_twin(vm: &VarMap, path: &Path, kind: NormKind, device: &Device) -> anyhow::Result<String> {
    let shown = path.display();
    let sd = candle::safetensors::load(path, device)
        .with_context(|| format!("--init {shown}: cannot read safetensors"))?;
    let report = load_pretrained(vm, sd, kind).with_context(|| format!("--init {shown}"))?;
    Ok(format!("--init: {report}"))
}
