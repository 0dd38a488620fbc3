//! Pretrained weights into a [`SegNet`](super::SegNet)'s variables: BatchNorm entries are
//! converted to the model's norm with [`keel_norm::convert`], tensors whose names match
//! the model load (shapes must agree, except the classifier `head.*`, skipped when the
//! class count differs), and a NaN or infinite value in a tensor the model would load is
//! an error naming the tensors: such weights come from a diverged run, not a model.
use std::collections::HashMap;

use candle::{DType, Result, Tensor};
use candle_nn::VarMap;
use keel_norm::convert::{bn_to_frozen_bn, bn_to_group_norm, find_batch_norms, StateDict};
use keel_norm::NormKind;

/// The tensors that hold NaN or infinite values among those of `sd` that `keep` selects,
/// sorted by name. A float tensor counts as finite when its sum is (NaN and infinities
/// propagate; a sum that overflows, which only values near f32's limit reach, counts as
/// non-finite); integer tensors are always finite.
pub fn non_finite_tensors(
    sd: &HashMap<String, Tensor>,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<&str>> {
    let mut bad = Vec::new();
    for (name, t) in sd.iter().filter(|(name, _)| keep(name)) {
        if t.dtype().is_float() {
            let sum = t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !sum.is_finite() {
                bad.push(name.as_str());
            }
        }
    }
    bad.sort_unstable();
    Ok(bad)
}

/// What [`load_pretrained`] did; its `Display` is one line for a log.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadReport {
    /// Variables set from the state dict.
    pub loaded: usize,
    /// Variables of the model.
    pub total: usize,
    /// BatchNorms converted to [`LoadReport::norm`].
    pub converted: usize,
    /// The model's norm.
    pub norm: NormKind,
    /// `head.*` tensors skipped for a different class count.
    pub head_skipped: usize,
    /// State-dict tensors the model has no variable for (optimizer state, `num_batches_tracked`
    /// aside).
    pub unused: usize,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "loaded {}/{} tensors ({} BatchNorms converted to {}, {} head tensors skipped, {} checkpoint tensors unused)",
            self.loaded, self.total, self.converted, self.norm, self.head_skipped, self.unused
        )
    }
}

/// Sets the variables of `vm` (a SegNet's, built with norm `norm`) from the PyTorch-named
/// state dict `sd` (e.g. [`candle::safetensors::load`] of a twin checkpoint): BatchNorms in
/// `sd` become FrozenBatchNorm or GroupNorm entries when `norm` is one of those; each
/// variable with a tensor of the same name is set (cast to the variable's dtype). Errors,
/// before any variable changes: a tensor the model would load holds NaN or infinities; a
/// shape differs outside `head.*`; no name matches.
pub fn load_pretrained(vm: &VarMap, mut sd: StateDict, norm: NormKind) -> Result<LoadReport> {
    let has_bn = !find_batch_norms(&sd).is_empty();
    let converted = match norm {
        NormKind::FrozenBatchNorm if has_bn => bn_to_frozen_bn(&mut sd, None)?.len(),
        NormKind::GroupNorm { .. } | NormKind::WsGroupNorm { .. } if has_bn => {
            bn_to_group_norm(&mut sd, None)?.len()
        }
        _ => 0,
    };
    sd.retain(|k, _| !k.ends_with(".num_batches_tracked"));
    let data = vm.data().lock().unwrap_or_else(|e| e.into_inner());
    // Only the tensors the model loads (after any BatchNorm conversion) must be finite.
    let bad = non_finite_tensors(&sd, |name| data.contains_key(name))?;
    if let Some(first) = bad.first() {
        candle::bail!(
            "load_pretrained: tensor '{first}' holds NaN or infinite values ({} of the model's tensors do: {}); these weights come from a diverged run, pick a checkpoint from before it diverged",
            bad.len(),
            bad.iter().take(5).copied().collect::<Vec<_>>().join(", ")
        )
    }
    let mut sets = Vec::new();
    let mut head_skipped = 0;
    for (name, var) in data.iter() {
        let Some(t) = sd.get(name) else { continue };
        if t.dims() != var.dims() {
            if name.starts_with("head.") {
                head_skipped += 1;
                continue;
            }
            candle::bail!("load_pretrained: '{name}' has shape {:?}, the model's is {:?}; build the model with the checkpoint's width and fpn", t.dims(), var.dims())
        }
        sets.push((var, t));
    }
    if sets.is_empty() {
        candle::bail!("load_pretrained: no tensor name matches the model (expected twin names such as stem.0.weight)")
    }
    for (var, t) in &sets {
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(LoadReport {
        loaded: sets.len(),
        total: data.len(),
        converted,
        norm,
        head_skipped,
        unused: sd.keys().filter(|k| !data.contains_key(*k)).count(),
    })
}
