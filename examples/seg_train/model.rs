//! `--backbone` and its flags, and building the run's model: keel's twin (the default) or a
//! torchvision ResNet backbone under the FPN-lite decoder (`keel::models::seg_model`),
//! seeded, then `--init` weights loaded (twin names for the twin, a torchvision checkpoint
//! from `scripts/torchvision_to_safetensors.py` for a ResNet), before anything is written.
//!
//! Defaults for a ResNet backbone (the flags left out), after detectron2 and torchvision's
//! detection fine-tuning recipes:
//!
//! | flag | with `--init` (pretrained) | from scratch |
//! |---|---|---|
//! | `--backbone-norm` | `frozen-bn` (keep the pretrained statistics) | the head's `--norm` |
//! | `--freeze-at` | 2 (stem + `layer1`, detectron2's default) | 0 (nothing) |
//! | `--backbone-lr-mult` | 0.1 | 1.0 |
//!
//! Inputs are normalized with torchvision's ImageNet mean/std for every model (keel-data
//! does it), which is what a torchvision backbone expects.
use std::fmt;
use std::path::Path;

use anyhow::{bail, Context};
use candle::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use clap::{Args, ValueEnum};
use keel::models::resnet::ResNetDepth;
use keel::models::seg::{init_weights, load_pretrained};
use keel::models::seg_model::{ResNetSegConfig, SegModel, SegModelConfig};
use keel::norm::NormKind;
use serde::{Deserialize, Serialize};

use super::cli::{parse_norm, RunConfig};

/// `--backbone`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackboneChoice {
    /// keel's twin network (its own ResNet-18-style encoder; `--width` sets its size).
    #[default]
    Twin,
    /// torchvision ResNet-18.
    Resnet18,
    /// torchvision ResNet-34.
    Resnet34,
    /// torchvision ResNet-50.
    Resnet50,
    /// torchvision ResNet-101.
    Resnet101,
}

impl BackboneChoice {
    /// The ResNet, `None` for the twin.
    pub fn depth(self) -> Option<ResNetDepth> {
        match self {
            BackboneChoice::Twin => None,
            BackboneChoice::Resnet18 => Some(ResNetDepth::R18),
            BackboneChoice::Resnet34 => Some(ResNetDepth::R34),
            BackboneChoice::Resnet50 => Some(ResNetDepth::R50),
            BackboneChoice::Resnet101 => Some(ResNetDepth::R101),
        }
    }

    fn is_twin(&self) -> bool {
        *self == BackboneChoice::Twin
    }
}

impl fmt::Display for BackboneChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.depth() {
            Some(d) => write!(f, "{d}"),
            None => f.write_str("twin"),
        }
    }
}

/// The backbone flags, shared by a run, `compare` and `bench`, and part of [`RunConfig`]
/// (flattened: configs saved before they existed read as the twin; a twin run's config.json
/// does not list them).
#[derive(Args, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackboneArgs {
    /// The network: twin (keel's own encoder, the default) or a torchvision ResNet backbone
    /// with the FPN-lite decoder and head (--init takes a checkpoint that
    /// scripts/torchvision_to_safetensors.py wrote).
    #[arg(long, value_enum, default_value_t = BackboneChoice::Twin)]
    #[serde(default, skip_serializing_if = "BackboneChoice::is_twin")]
    pub backbone: BackboneChoice,
    /// A ResNet backbone's norm, separate from the head's --norm: frozen-bn, gn, gn:G, bn,
    /// ws-gn (default: frozen-bn with --init, else --norm). A checkpoint's BatchNorms are
    /// kept, frozen or converted to it.
    #[arg(long, value_parser = parse_norm)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone_norm: Option<NormKind>,
    /// A ResNet backbone's frozen stages, detectron2's FREEZE_AT: 0 nothing, 1 the stem, 2
    /// also layer1, ..., 5 the whole backbone (default: 2 with --init, else 0).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_at: Option<usize>,
    /// A ResNet backbone's learning rate as a multiple of --lr (a second param group;
    /// default: 0.1 with --init, else 1.0).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone_lr_mult: Option<f64>,
}

impl BackboneArgs {
    /// The flags with a ResNet backbone's defaults filled in (see the module docs); the
    /// twin's are left as they are.
    pub fn resolved(&self, pretrained: bool, head_norm: NormKind) -> Self {
        if self.backbone.is_twin() {
            return self.clone();
        }
        let default_norm = if pretrained {
            NormKind::FrozenBatchNorm
        } else {
            head_norm
        };
        Self {
            backbone: self.backbone,
            backbone_norm: Some(self.backbone_norm.unwrap_or(default_norm)),
            freeze_at: Some(self.freeze_at.unwrap_or(if pretrained { 2 } else { 0 })),
            backbone_lr_mult: Some(self.backbone_lr_mult.unwrap_or(if pretrained {
                0.1
            } else {
                1.0
            })),
        }
    }
}

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
        let b = self.backbone.resolved(self.init.is_some(), self.norm);
        b.backbone_lr_mult.unwrap_or(1.0)
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
        if b.backbone.is_twin() {
            let given = [
                ("--backbone-norm", b.backbone_norm.is_some()),
                ("--freeze-at", b.freeze_at.is_some()),
                ("--backbone-lr-mult", b.backbone_lr_mult.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
                bail!("{flag} applies to a ResNet backbone (--backbone resnet18|resnet34|resnet50|resnet101); the twin has no separate backbone")
            }
        }
        if let Some(m) = b.backbone_lr_mult.filter(|m| !(m.is_finite() && *m >= 0.0)) {
            bail!("--backbone-lr-mult {m}: must be a finite number >= 0 (1 = the head's LR)")
        }
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
        (SegModel::ResNet(m), Some(p)) => {
            let shown = p.display();
            let sd = keel::norm::convert::load_state_dict(p, dev)
                .with_context(|| format!("--init {shown}"))?;
            let r = m.load_backbone(sd, vm, vb).with_context(|| {
                format!(
                    "--init {shown}: not a torchvision {} checkpoint for this backbone",
                    m.config().depth
                )
            })?;
            let conv = r
                .converted
                .first()
                .map_or(String::new(), |first| format!(" (converted: {first}, ...)"));
            Some(format!("--init: {r}{conv}"))
        }
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
