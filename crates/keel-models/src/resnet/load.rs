//! A torchvision checkpoint (a `state_dict` saved as safetensors by
//! `scripts/torchvision_to_safetensors.py`) into a [`ResNet`]: checked key by key, its
//! BatchNorms converted to the model's norm, then the network built on the loaded variables.

use std::fmt;

use candle::{Result, Var};
use candle_nn::{VarBuilder, VarMap};
use keel_norm::convert::{bn_to_frozen_bn, bn_to_group_norm, find_batch_norms, StateDict};
use keel_norm::NormKind;

use super::net::var_name;
use super::{ResNet, ResNetConfig};
use crate::seg::non_finite_tensors;

/// What happened to the classifier `fc` in [`ResNet::from_state_dict`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FcLoad {
    /// The model has no `fc`; any `fc.*` in the checkpoint was ignored.
    NotInModel,
    /// `fc.weight` and `fc.bias` were loaded.
    Loaded,
    /// The model's `fc` kept its initial values: the checkpoint has none, or one for another
    /// number of classes (a new classifier for fine-tuning).
    KeptInit {
        /// The checkpoint's `fc.weight` shape, `None` when it has no `fc`.
        checkpoint_shape: Option<Vec<usize>>,
    },
}

/// What [`ResNet::from_state_dict`] did; its `Display` is one line for a log.
#[derive(Clone, Debug, PartialEq)]
pub struct ResNetLoadReport {
    /// Tensors loaded into the model's variables.
    pub loaded: usize,
    /// The model's norm.
    pub norm: NormKind,
    /// The checkpoint's BatchNorms (prefixes, sorted) converted to FrozenBatchNorm (keys
    /// kept) or GroupNorm (`running_mean`/`running_var` dropped); empty when the model's
    /// norm is trainable BatchNorm (kept as they are) or the checkpoint has none.
    pub converted: Vec<String>,
    /// `num_batches_tracked` tensors dropped.
    pub dropped_num_batches_tracked: usize,
    /// Running statistics dropped by a conversion to GroupNorm.
    pub dropped_running_stats: usize,
    /// The classifier.
    pub fc: FcLoad,
}

impl fmt::Display for ResNetLoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let conv = if self.converted.is_empty() {
            "no BatchNorm converted".to_string()
        } else {
            format!(
                "{} BatchNorms converted to {}",
                self.converted.len(),
                self.norm
            )
        };
        let fc = match &self.fc {
            FcLoad::NotInModel => "no fc in the model".to_string(),
            FcLoad::Loaded => "fc loaded".to_string(),
            FcLoad::KeptInit {
                checkpoint_shape: None,
            } => "fc kept its init (none in the checkpoint)".to_string(),
            FcLoad::KeptInit {
                checkpoint_shape: Some(s),
            } => format!("fc kept its init (the checkpoint's is {s:?})"),
        };
        write!(
            f,
            "loaded {} tensors ({conv}; dropped {} num_batches_tracked and {} running \
             statistics; {fc})",
            self.loaded, self.dropped_num_batches_tracked, self.dropped_running_stats
        )
    }
}

/// A hint for a checkpoint whose keys are not torchvision's.
fn naming_hint(sd: &StateDict) -> String {
    let twin = ["stem.", "stages.", "lat.", "smooth.", "head."];
    if let Some(k) = sd.keys().find(|k| twin.iter().any(|p| k.starts_with(p))) {
        return format!(
            " The checkpoint has SegNet (twin) names such as '{k}': it is not a torchvision \
             ResNet; load it with keel_models::seg::load_pretrained into a SegNet, or convert a \
             torchvision model with scripts/torchvision_to_safetensors.py."
        );
    }
    let stem = sd
        .keys()
        .filter_map(|k| Some((k, k.strip_suffix("conv1.weight")?)))
        .find(|(_, p)| !p.is_empty() && !p.contains("layer"));
    if let Some((k, p)) = stem {
        return format!(
            " The checkpoint's keys carry a prefix ('{k}'): strip '{p}' from every key \
             (e.g. `{{k.removeprefix('{p}'): v for k, v in sd.items()}}`) when saving it."
        );
    }
    String::new()
}

/// The checkpoint's BatchNorms converted for `norm`: (converted prefixes, dropped stats).
fn convert_norms(sd: &mut StateDict, norm: NormKind) -> Result<(Vec<String>, usize)> {
    if find_batch_norms(sd).is_empty() {
        return Ok((Vec::new(), 0));
    }
    let before = sd.len();
    let converted = match norm {
        NormKind::BatchNorm => Vec::new(),
        NormKind::FrozenBatchNorm => bn_to_frozen_bn(sd, None)?,
        NormKind::GroupNorm { .. } | NormKind::WsGroupNorm { .. } => bn_to_group_norm(sd, None)?,
    };
    Ok((converted, before - sd.len()))
}

/// Checks the checkpoint against the model's keys: every key present with its shape (fc
/// aside), no key left over. Returns what happened to `fc`.
fn check_keys(cfg: &ResNetConfig, sd: &StateDict) -> Result<FcLoad> {
    let expected = cfg.state_dict_keys();
    let ckpt_fc = sd.get("fc.weight").map(|t| t.dims().to_vec());
    let fc = if !cfg.with_fc {
        FcLoad::NotInModel
    } else {
        let fits = |k: &str, shape: &[usize]| sd.get(k).is_some_and(|t| t.dims() == shape);
        let fc_keys: Vec<_> = expected
            .iter()
            .filter(|(k, _)| k.starts_with("fc."))
            .collect();
        if fc_keys.iter().all(|(k, s)| fits(k, s)) {
            FcLoad::Loaded
        } else {
            FcLoad::KeptInit {
                checkpoint_shape: ckpt_fc.clone(),
            }
        }
    };
    let what = format!("a torchvision {} with norm {}", cfg.depth, cfg.norm);
    for (key, shape) in expected.iter().filter(|(k, _)| !k.starts_with("fc.")) {
        match sd.get(key) {
            None => {
                let stats = key.ends_with(".running_mean") || key.ends_with(".running_var");
                let why = if stats {
                    " (a BatchNorm model's statistics; a checkpoint without them needs norm gn \
                     or ws-gn)"
                } else {
                    ""
                };
                candle::bail!(
                    "ResNet::from_state_dict: the checkpoint lacks '{key}' (shape {shape:?}){why}, \
                     which {what} needs; it has {} tensors.{}",
                    sd.len(),
                    naming_hint(sd)
                )
            }
            Some(t) if t.dims() != shape.as_slice() => candle::bail!(
                "ResNet::from_state_dict: '{key}' has shape {:?}, {what} expects {shape:?}; is \
                 the checkpoint another depth? (build the config with the checkpoint's model)",
                t.dims()
            ),
            Some(_) => {}
        }
    }
    let mut extra: Vec<&String> = sd
        .keys()
        .filter(|k| !k.starts_with("fc.") && !expected.iter().any(|(e, _)| e == *k))
        .collect();
    extra.sort();
    if let Some(first) = extra.first() {
        candle::bail!(
            "ResNet::from_state_dict: the checkpoint has '{first}' ({} unexpected tensors in \
             all), which {what} does not; is it a deeper ResNet or another model?",
            extra.len()
        )
    }
    Ok(fc)
}

impl ResNet {
    /// Loads a torchvision-named state dict (e.g. [`keel_norm::convert::load_state_dict`] of
    /// a file written by `scripts/torchvision_to_safetensors.py`) and builds the network on
    /// it. `vb` must be built on `vm` (`VarBuilder::from_varmap(vm, ..)`, optionally with a
    /// prefix: checkpoint key `k` becomes variable `<prefix>.k`).
    ///
    /// In order, before any variable is created or changed: `num_batches_tracked` is dropped;
    /// the checkpoint's BatchNorms are converted to the model's norm (kept for `bn`, keys kept
    /// for `frozen-bn`, running statistics dropped for `gn`/`ws-gn`: keel-norm's
    /// [`convert`](keel_norm::convert)); every key the model needs must be there with its
    /// shape (the error names the first missing or misshapen key in torchvision's order and
    /// what was expected, with a hint for SegNet names or a key prefix); no other key may be
    /// left (`fc.*` aside); the tensors must be finite. `fc` loads when its shape fits and
    /// keeps its init otherwise ([`FcLoad`]). Tensors are cast to `vb`'s dtype.
    pub fn from_state_dict(
        cfg: &ResNetConfig,
        mut sd: StateDict,
        vm: &VarMap,
        vb: VarBuilder,
    ) -> Result<(ResNet, ResNetLoadReport)> {
        cfg.validate()?;
        let before = sd.len();
        sd.retain(|k, _| !k.ends_with(".num_batches_tracked"));
        let dropped_num_batches_tracked = before - sd.len();
        let (converted, dropped_running_stats) = convert_norms(&mut sd, cfg.norm)?;
        let fc = check_keys(cfg, &sd)?;
        let keys: Vec<(String, Vec<usize>)> = cfg
            .state_dict_keys()
            .into_iter()
            .filter(|(k, _)| fc == FcLoad::Loaded || !k.starts_with("fc."))
            .collect();
        let bad = non_finite_tensors(&sd, |k| keys.iter().any(|(e, _)| e == k))?;
        if let Some(first) = bad.first() {
            candle::bail!(
                "ResNet::from_state_dict: '{first}' holds NaN or infinite values ({} tensors \
                 do); these weights come from a diverged run: convert an earlier checkpoint",
                bad.len()
            )
        }
        let prefix = vb.prefix();
        let full = |k: &str| var_name(&prefix, k);
        {
            let mut data = vm.data().lock().unwrap_or_else(|e| e.into_inner());
            for (k, _) in &keys {
                let t = sd[k].to_dtype(vb.dtype())?.to_device(vb.device())?;
                match data.get(&full(k)) {
                    Some(var) => var.set(&t).map_err(|e| {
                        candle::Error::Msg(format!(
                            "ResNet::from_state_dict: the VarMap already holds '{}' of another \
                             shape or dtype ({e}); load into a fresh VarMap",
                            full(k)
                        ))
                    })?,
                    None => {
                        data.insert(full(k), Var::from_tensor(&t)?);
                    }
                }
            }
        }
        if !vb.contains_tensor("conv1.weight") {
            candle::bail!(
                "ResNet::from_state_dict: vb does not see the loaded '{}'; build it with \
                 VarBuilder::from_varmap on the same VarMap",
                full("conv1.weight")
            )
        }
        let net = ResNet::new(cfg, vb)?;
        let report = ResNetLoadReport {
            loaded: keys.len(),
            norm: cfg.norm,
            converted,
            dropped_num_batches_tracked,
            dropped_running_stats,
            fc,
        };
        Ok((net, report))
    }
}
