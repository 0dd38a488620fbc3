//! The backbone choice keel's trainers share (`--backbone` and its flags): keel's twin
//! encoder (the default) or a torchvision ResNet-18/34/50/101, the defaults of a ResNet
//! backbone's norm, frozen stages and learning rate, their checks, loading a torchvision
//! checkpoint (`--init`) into the backbone, and the optimizer's parameter groups with a
//! lower-LR backbone.
//!
//! [`BackboneArgs`] derives `clap::Args` with this crate's `clap` feature (flattened into a
//! trainer's command line) and serde always (flattened into its run config: a twin run's
//! config does not list the fields, so configs saved before them still read as the twin).
//!
//! Defaults for a ResNet backbone (the flags left out, [`BackboneArgs::resolved`]), after
//! detectron2 and torchvision's detection fine-tuning recipes:
//!
//! | flag | with `--init` (pretrained) | from scratch |
//! |---|---|---|
//! | `--backbone-norm` | `frozen-bn` (keep the pretrained statistics) | the trainer's `--norm` |
//! | `--freeze-at` | 2 (stem + `layer1`, detectron2's default) | 0 (nothing) |
//! | `--backbone-lr-mult` | 0.1 | 1.0 |
//!
//! ```
//! use keel_models::backbone::{BackboneArgs, BackboneChoice};
//! use keel_norm::NormKind;
//! let args = BackboneArgs { backbone: BackboneChoice::Resnet18, ..Default::default() };
//! args.validate()?;
//! let r = args.resolved(true, NormKind::GroupNorm { groups: None });
//! assert_eq!(r.backbone_norm, Some(NormKind::FrozenBatchNorm));
//! assert_eq!((r.freeze_at, r.backbone_lr_mult), (Some(2), Some(0.1)));
//! let cfg = r.resnet(NormKind::BatchNorm).expect("a ResNet");
//! assert_eq!((cfg.freeze_at, cfg.out_channels()[3]), (2, 512));
//! // Twin-only runs refuse the ResNet's flags.
//! let bad = BackboneArgs { freeze_at: Some(1), ..Default::default() };
//! assert!(bad.validate().unwrap_err().to_string().contains("--freeze-at applies to a ResNet"));
//! # Ok::<(), candle::Error>(())
//! ```
use std::fmt;
use std::path::Path;

use candle::{bail, Device, Result, Var};
use candle_nn::{VarBuilder, VarMap};
use keel_norm::NormKind;
use keel_optim::ParamGroup;
use serde::{Deserialize, Serialize};

use crate::resnet::{ResNet, ResNetConfig, ResNetDepth};

/// The VarBuilder prefix of a trainer's ResNet backbone (torchvision's names below it).
pub const BACKBONE_PREFIX: &str = "backbone";

/// `--backbone`: which network extracts the features.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
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

    /// Whether this is keel's twin (no separate backbone).
    pub fn is_twin(&self) -> bool {
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

/// A norm flag's value: [`NormKind`]'s text form (bn, frozen-bn, gn, gn:G, ws-gn, ws-gn:G),
/// for clap's `value_parser`.
pub fn parse_norm(s: &str) -> std::result::Result<NormKind, String> {
    s.parse().map_err(|e: candle::Error| e.to_string())
}

/// The backbone flags of a trainer (see the [module docs](self)); `None` fields take their
/// defaults in [`BackboneArgs::resolved`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct BackboneArgs {
    /// The network: twin (keel's own encoder, the default) or a torchvision ResNet backbone
    /// under the trainer's decoder and head (--init takes a checkpoint that
    /// scripts/torchvision_to_safetensors.py wrote).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = BackboneChoice::Twin))]
    #[serde(default, skip_serializing_if = "BackboneChoice::is_twin")]
    pub backbone: BackboneChoice,
    /// A ResNet backbone's norm, separate from --norm: frozen-bn, gn, gn:G, bn, ws-gn
    /// (default: frozen-bn with --init, else --norm). A checkpoint's BatchNorms are kept,
    /// frozen or converted to it.
    #[cfg_attr(feature = "clap", arg(long, value_parser = parse_norm))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone_norm: Option<NormKind>,
    /// A ResNet backbone's frozen stages, detectron2's FREEZE_AT: 0 nothing, 1 the stem, 2
    /// also layer1, ..., 5 the whole backbone (default: 2 with --init, else 0).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_at: Option<usize>,
    /// A ResNet backbone's learning rate as a multiple of --lr (a second param group;
    /// default: 0.1 with --init, else 1.0).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone_lr_mult: Option<f64>,
}

impl BackboneArgs {
    /// The flags with a ResNet backbone's defaults filled in for a `pretrained` run (one
    /// with `--init`) whose own norm flag is `norm` (see the module docs); the twin's are
    /// left as they are.
    pub fn resolved(&self, pretrained: bool, norm: NormKind) -> Self {
        if self.backbone.is_twin() {
            return self.clone();
        }
        let default_norm = if pretrained {
            NormKind::FrozenBatchNorm
        } else {
            norm
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

    /// The ResNet backbone's config (no classifier), `None` for the twin; a norm or
    /// `freeze_at` still unset (flags not [`resolved`](Self::resolved)) is `norm` or 0.
    pub fn resnet(&self, norm: NormKind) -> Option<ResNetConfig> {
        let depth = self.backbone.depth()?;
        Some(ResNetConfig {
            freeze_at: self.freeze_at.unwrap_or(0),
            ..ResNetConfig::backbone(depth, self.backbone_norm.unwrap_or(norm))
        })
    }

    /// The backbone's LR multiplier: the flag, else 1 (the twin's parameters form one model).
    pub fn lr_mult(&self) -> f64 {
        self.backbone_lr_mult.unwrap_or(1.0)
    }

    /// The flags' own checks: the ResNet's flags are refused for the twin, and the LR
    /// multiplier must be finite and >= 0. Errors name the flag and the fix.
    pub fn validate(&self) -> Result<()> {
        if self.backbone.is_twin() {
            let given = [
                ("--backbone-norm", self.backbone_norm.is_some()),
                ("--freeze-at", self.freeze_at.is_some()),
                ("--backbone-lr-mult", self.backbone_lr_mult.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
                bail!("{flag} applies to a ResNet backbone (--backbone resnet18|resnet34|resnet50|resnet101); the twin has no separate backbone")
            }
        }
        if let Some(m) = self
            .backbone_lr_mult
            .filter(|m| !(m.is_finite() && *m >= 0.0))
        {
            bail!("--backbone-lr-mult {m}: must be a finite number >= 0 (1 = the head's LR)")
        }
        Ok(())
    }
}

/// Loads the torchvision checkpoint at `path` (safetensors, as
/// `scripts/torchvision_to_safetensors.py` writes it) into the ResNet backbone `cfg` built on
/// `vm` under `vb` (the backbone's builder, e.g. `root.pp(BACKBONE_PREFIX)`), with
/// [`ResNet::from_state_dict`]'s checks and conversions, all before any variable changes.
/// Returns the line to print: `--init: <report>` and the first converted BatchNorm. Errors
/// name `--init`, the file and the depth expected.
pub fn load_torchvision_init(
    path: &Path,
    cfg: &ResNetConfig,
    vm: &VarMap,
    vb: VarBuilder,
    device: &Device,
) -> Result<String> {
    let shown = path.display();
    let sd = keel_norm::convert::load_state_dict(path, device)
        .map_err(|e| candle::Error::Msg(format!("--init {shown}: {e}")))?;
    let (_, r) = ResNet::from_state_dict(cfg, sd, vm, vb).map_err(|e| {
        candle::Error::Msg(format!(
            "--init {shown}: not a torchvision {} checkpoint for this backbone: {e}",
            cfg.depth
        ))
    })?;
    let conv = r
        .converted
        .first()
        .map_or(String::new(), |first| format!(" (converted: {first}, ...)"));
    Ok(format!("--init: {r}{conv}"))
}

/// The optimizer's parameter groups of a model with a ResNet `backbone` built on `vm` under
/// [`BACKBONE_PREFIX`]: `[head decay, head no_decay, backbone decay, backbone no_decay]`. The
/// head is every variable outside `backbone.` (sorted by name); the backbone groups hold only
/// [`ResNet::trainable_vars`] (frozen stages and FrozenBatchNorm tensors are in no group, so
/// the optimizer keeps no state for them) at `lr * backbone_lr_mult`. Weights of rank > 1
/// decay; biases and norm parameters get no weight decay.
///
/// Errors when `backbone_lr_mult` is negative or not finite.
pub fn backbone_param_groups(
    vm: &VarMap,
    backbone: &ResNet,
    backbone_lr_mult: f64,
) -> Result<Vec<ParamGroup>> {
    if !(backbone_lr_mult.is_finite() && backbone_lr_mult >= 0.0) {
        bail!(
            "param_groups: backbone_lr_mult {backbone_lr_mult} must be finite and \
             non-negative (1.0 = the base LR)"
        )
    }
    let head: Vec<Var> = {
        let data = vm.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut named: Vec<(&String, &Var)> = data
            .iter()
            .filter(|(k, _)| !k.starts_with(&format!("{BACKBONE_PREFIX}.")))
            .collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        named.into_iter().map(|(_, v)| v.clone()).collect()
    };
    let split = |vars: Vec<Var>, mult: f64| {
        let (decay, no_decay): (Vec<Var>, Vec<Var>) = vars.into_iter().partition(|v| v.rank() > 1);
        [
            ParamGroup::new(decay).with_lr_mult(mult),
            ParamGroup::new(no_decay)
                .with_lr_mult(mult)
                .with_weight_decay(0.0),
        ]
    };
    let mut groups = split(head, 1.0).to_vec();
    groups.extend(split(backbone.trainable_vars(vm)?, backbone_lr_mult));
    Ok(groups)
}

/// One row of a trainer's compare grid ([`grid_rows`]).
#[derive(Clone, Debug, PartialEq)]
pub struct GridRow {
    /// The row's name in results.md: the norm, or `<backbone norm>+<norm>`.
    pub label: String,
    /// The run's `--norm`.
    pub norm: NormKind,
    /// The run's `--backbone-norm`, when the grid sets it.
    pub backbone_norm: Option<NormKind>,
}

/// The rows of a compare grid: one per `norms` entry, times the `backbone_norms` entries
/// when given (labelled `<backbone norm>+<norm>`: the fine-tuning experiment). Errors when
/// `norms` is empty, and for `backbone_norms` without a ResNet `--backbone` or with a
/// `--backbone-norm` too.
pub fn grid_rows(
    norms: &[NormKind],
    backbone_norms: &[NormKind],
    args: &BackboneArgs,
) -> Result<Vec<GridRow>> {
    if norms.is_empty() {
        bail!("compare needs at least one norm")
    }
    let row = |norm: NormKind, bb: Option<NormKind>| GridRow {
        label: bb.map_or(norm.to_string(), |bb| format!("{bb}+{norm}")),
        norm,
        backbone_norm: bb,
    };
    if backbone_norms.is_empty() {
        return Ok(norms.iter().map(|&n| row(n, None)).collect());
    }
    if args.backbone.is_twin() {
        bail!(
            "--backbone-norms needs a ResNet --backbone (resnet18, resnet34, resnet50, resnet101)"
        )
    }
    if args.backbone_norm.is_some() {
        bail!("--backbone-norm and --backbone-norms: give one of them")
    }
    let pairs = backbone_norms
        .iter()
        .flat_map(|&bb| norms.iter().map(move |&n| (n, bb)));
    Ok(pairs.map(|(n, bb)| row(n, Some(bb))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resnet18() -> BackboneArgs {
        BackboneArgs {
            backbone: BackboneChoice::Resnet18,
            ..Default::default()
        }
    }

    #[test]
    fn defaults_follow_init_and_keep_given_flags() {
        let gn = NormKind::GroupNorm { groups: Some(4) };
        let scratch = resnet18().resolved(false, gn);
        assert_eq!(scratch.backbone_norm, Some(gn));
        assert_eq!(
            (scratch.freeze_at, scratch.backbone_lr_mult),
            (Some(0), Some(1.0))
        );
        let given = BackboneArgs {
            freeze_at: Some(3),
            backbone_lr_mult: Some(0.5),
            backbone_norm: Some(NormKind::BatchNorm),
            ..resnet18()
        };
        assert_eq!(given.resolved(true, gn), given);
        // The twin's flags are left as they are.
        let twin = BackboneArgs::default();
        assert_eq!(twin.resolved(true, gn), twin);
        assert_eq!(twin.resnet(gn), None);
        assert_eq!(twin.lr_mult(), 1.0);
    }

    #[test]
    fn resnet_config_has_the_depth_and_channels() {
        let r = BackboneArgs {
            backbone: BackboneChoice::Resnet50,
            ..Default::default()
        }
        .resolved(true, NormKind::BatchNorm);
        let cfg = r.resnet(NormKind::BatchNorm).unwrap();
        assert_eq!(cfg.depth, ResNetDepth::R50);
        assert_eq!(cfg.norm, NormKind::FrozenBatchNorm);
        assert_eq!(cfg.out_channels()[1..], [512, 1024, 2048]);
        assert!(!cfg.with_fc);
        assert_eq!(r.lr_mult(), 0.1);
    }

    #[test]
    fn validation_names_the_flag() {
        for (args, want) in [
            (
                BackboneArgs {
                    backbone_norm: Some(NormKind::BatchNorm),
                    ..Default::default()
                },
                "--backbone-norm applies to a ResNet backbone",
            ),
            (
                BackboneArgs {
                    backbone_lr_mult: Some(0.5),
                    ..Default::default()
                },
                "--backbone-lr-mult applies to a ResNet backbone",
            ),
            (
                BackboneArgs {
                    backbone_lr_mult: Some(-1.0),
                    ..resnet18()
                },
                "--backbone-lr-mult -1: must be a finite number >= 0",
            ),
            (
                BackboneArgs {
                    backbone_lr_mult: Some(f64::NAN),
                    ..resnet18()
                },
                "--backbone-lr-mult NaN",
            ),
        ] {
            let e = args.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        resnet18().validate().unwrap();
    }

    #[test]
    fn serde_leaves_the_twin_out_and_reads_old_configs() {
        let twin = serde_json::to_value(BackboneArgs::default()).unwrap();
        assert_eq!(twin, serde_json::json!({}));
        let old: BackboneArgs = serde_json::from_str("{}").unwrap();
        assert_eq!(old, BackboneArgs::default());
        let r = resnet18().resolved(true, NormKind::BatchNorm);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"backbone": "resnet18", "backbone_norm": "frozen-bn",
                "freeze_at": 2, "backbone_lr_mult": 0.1})
        );
        assert_eq!(serde_json::from_value::<BackboneArgs>(v).unwrap(), r);
    }

    #[test]
    fn grid_rows_pair_backbone_norms_with_norms() {
        let (gn, bn) = (NormKind::GroupNorm { groups: None }, NormKind::BatchNorm);
        let twin = grid_rows(&[bn, gn], &[], &BackboneArgs::default()).unwrap();
        let labels: Vec<&str> = twin.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(labels, ["bn", "gn"]);
        assert!(twin.iter().all(|r| r.backbone_norm.is_none()));
        let rows = grid_rows(&[gn], &[NormKind::FrozenBatchNorm, bn], &resnet18()).unwrap();
        let labels: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(labels, ["frozen-bn+gn", "bn+gn"]);
        assert_eq!(rows[1].backbone_norm, Some(bn));
        let e = grid_rows(&[gn], &[bn], &BackboneArgs::default()).unwrap_err();
        assert!(
            e.to_string().contains("--backbone-norms needs a ResNet"),
            "{e}"
        );
        let both = BackboneArgs {
            backbone_norm: Some(bn),
            ..resnet18()
        };
        let e = grid_rows(&[gn], &[bn], &both).unwrap_err();
        assert!(e.to_string().contains("give one of them"), "{e}");
        assert!(grid_rows(&[], &[], &resnet18()).is_err());
    }

    #[test]
    fn param_groups_leave_frozen_stages_out_and_scale_the_backbone() -> Result<()> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, candle::DType::F32, &Device::Cpu);
        let cfg = ResNetConfig {
            freeze_at: 2,
            ..ResNetConfig::backbone(ResNetDepth::R18, NormKind::FrozenBatchNorm)
        };
        let net = ResNet::new(&cfg, vb.pp(BACKBONE_PREFIX))?;
        vb.pp("head").get((4, 8, 3, 3), "weight")?;
        vb.pp("head").get(4, "bias")?;
        let groups = backbone_param_groups(&vm, &net, 0.25)?;
        let mults: Vec<f64> = groups.iter().map(|g| g.lr_mult).collect();
        assert_eq!(mults, [1.0, 1.0, 0.25, 0.25]);
        assert_eq!((groups[0].vars.len(), groups[1].vars.len()), (1, 1));
        let backbone: usize = groups[2..].iter().map(|g| g.vars.len()).sum();
        assert_eq!(backbone, net.trainable_names().len());
        assert!(backbone_param_groups(&vm, &net, -0.1).is_err());
        Ok(())
    }
}
