//! Checkpoint conversion: the static-Rust answer to PyTorch's module-walking
//! `convert_bn_to_gn` / `FrozenBatchNorm2d.convert_frozen_batchnorm`.
//!
//! The functions work on a state dict (`name -> Tensor`, as loaded from safetensors with
//! [`candle::safetensors::load`]). A BatchNorm is found by its `<prefix>.running_var` key, or
//! named explicitly by prefix. Conversions:
//! - to FrozenBatchNorm: keys stay (`weight`, `bias`, `running_mean`, `running_var`),
//!   `num_batches_tracked` goes; optionally the BN is folded into the conv before it;
//! - to GroupNorm: `weight`/`bias` stay as GroupNorm's affine, the running statistics and
//!   `num_batches_tracked` go (a GroupNorm checkpoint has no group count to store).
use std::collections::{BTreeSet, HashMap};

use candle::{Result, Tensor};

use crate::FrozenBatchNorm2d;

/// A state dict: parameter name to tensor, PyTorch names.
pub type StateDict = HashMap<String, Tensor>;

const BN_KEYS: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];

/// The prefixes of every BatchNorm in `state`, found by their `<prefix>.running_var` key,
/// sorted.
pub fn find_batch_norms(state: &StateDict) -> Vec<String> {
    let set: BTreeSet<String> = state
        .keys()
        .filter_map(|k| k.strip_suffix(".running_var").map(str::to_string))
        .collect();
    set.into_iter().collect()
}

/// The BatchNorm prefixes to convert: `prefixes` when given (each checked), else all found.
fn select(state: &StateDict, prefixes: Option<&[String]>) -> Result<Vec<String>> {
    let selected = match prefixes {
        Some(p) => p.to_vec(),
        None => find_batch_norms(state),
    };
    for prefix in &selected {
        let key = |k: &str| format!("{prefix}.{k}");
        for k in BN_KEYS {
            if !state.contains_key(&key(k)) {
                candle::bail!(
                    "convert: BatchNorm '{prefix}' has no '{}' in the state dict; a BatchNorm \
                     needs {prefix}.{{weight,bias,running_mean,running_var}} (is the prefix \
                     right, or is this layer not a BatchNorm?)",
                    key(k)
                )
            }
        }
        let c = state[&key("weight")].dims().to_vec();
        if c.len() != 1 {
            candle::bail!("convert: {prefix}.weight has shape {c:?}, a BatchNorm's is (C,)")
        }
        for k in BN_KEYS {
            if state[&key(k)].dims() != c.as_slice() {
                candle::bail!(
                    "convert: {} has shape {:?}, expected {c:?} like {prefix}.weight",
                    key(k),
                    state[&key(k)].dims()
                )
            }
        }
    }
    if selected.is_empty() {
        candle::bail!(
            "convert: no BatchNorm found (no key ends in .running_var); nothing to convert"
        )
    }
    Ok(selected)
}

/// Turns BatchNorms into FrozenBatchNorm2d entries: their four tensors stay under the same
/// keys and `num_batches_tracked` is dropped. `prefixes = None` converts every BatchNorm
/// found. Returns the converted prefixes. On error `state` is unchanged.
pub fn bn_to_frozen_bn(state: &mut StateDict, prefixes: Option<&[String]>) -> Result<Vec<String>> {
    let selected = select(state, prefixes)?;
    for p in &selected {
        state.remove(&format!("{p}.num_batches_tracked"));
    }
    Ok(selected)
}

/// Turns BatchNorms into GroupNorm entries: `weight` and `bias` stay (GroupNorm's affine),
/// `running_mean`, `running_var` and `num_batches_tracked` are dropped. Returns the converted
/// prefixes. On error `state` is unchanged.
///
/// ```
/// use candle::{Device, Tensor};
/// use keel_norm::convert::{bn_to_group_norm, StateDict};
/// # fn main() -> candle::Result<()> {
/// let dev = Device::Cpu;
/// let mut sd = StateDict::new();
/// for k in ["weight", "bias", "running_mean", "running_var"] {
///     sd.insert(format!("bn1.{k}"), Tensor::ones(4, candle::DType::F32, &dev)?);
/// }
/// sd.insert("conv1.weight".into(), Tensor::ones((4, 3, 3, 3), candle::DType::F32, &dev)?);
/// assert_eq!(bn_to_group_norm(&mut sd, None)?, ["bn1"]);
/// assert!(sd.contains_key("bn1.weight") && !sd.contains_key("bn1.running_var"));
/// # Ok(()) }
/// ```
pub fn bn_to_group_norm(state: &mut StateDict, prefixes: Option<&[String]>) -> Result<Vec<String>> {
    let selected = select(state, prefixes)?;
    for p in &selected {
        for k in ["running_mean", "running_var", "num_batches_tracked"] {
            state.remove(&format!("{p}.{k}"));
        }
    }
    Ok(selected)
}

/// Folds BatchNorms into the convolutions before them, for inference: for each
/// `(conv_prefix, bn_prefix)` pair `conv.weight` and `conv.bias` (created if absent) are
/// replaced by the folded ones ([`FrozenBatchNorm2d::fold_into_conv`]) and every key of the
/// BatchNorm is removed. A model loading the result must have no norm layer there. `eps` is
/// the BatchNorm's epsilon (it is not stored in checkpoints; PyTorch's default is 1e-5).
/// On error `state` is unchanged.
pub fn fold_bn_into_conv(
    state: &mut StateDict,
    pairs: &[(String, String)],
    eps: f64,
) -> Result<()> {
    let bns: Vec<String> = pairs.iter().map(|(_, bn)| bn.clone()).collect();
    select(state, Some(&bns))?;
    let mut folded = Vec::with_capacity(pairs.len());
    for (conv, bn) in pairs {
        let get = |k: &str| state[&format!("{bn}.{k}")].clone();
        let frozen = FrozenBatchNorm2d::new(
            get("weight"),
            get("bias"),
            get("running_mean"),
            get("running_var"),
            eps,
        )?;
        let Some(w) = state.get(&format!("{conv}.weight")) else {
            candle::bail!("convert: conv '{conv}' has no '{conv}.weight' in the state dict")
        };
        let (w, b) = frozen
            .fold_into_conv(w, state.get(&format!("{conv}.bias")))
            .map_err(|e| {
                candle::Error::Msg(format!("convert: folding '{bn}' into '{conv}': {e}"))
            })?;
        folded.push((conv.clone(), bn.clone(), w, b));
    }
    for (conv, bn, w, b) in folded {
        state.insert(format!("{conv}.weight"), w);
        state.insert(format!("{conv}.bias"), b);
        for k in BN_KEYS.iter().chain(&["num_batches_tracked"]) {
            state.remove(&format!("{bn}.{k}"));
        }
    }
    Ok(())
}
