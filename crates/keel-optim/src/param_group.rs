//! Parameter groups (PyTorch's `param_groups`): per-group LR multiplier and weight
//! decay, and the standard "no weight decay on norm and bias parameters" split
//! (Goyal et al. 2017; timm's `param_groups_weight_decay`).

use candle::Var;
use candle_nn::VarMap;

/// A set of parameters sharing an LR multiplier and an optional weight-decay override.
///
/// The group's LR is `optimizer_lr * lr_mult`, so an LR schedule driving
/// `set_learning_rate` scales every group together. `weight_decay: None` uses the
/// optimizer config's value.
///
/// ```
/// use candle::{DType, Device, Var};
/// use keel_optim::ParamGroup;
/// let w = Var::zeros((2, 2), DType::F32, &Device::Cpu)?;
/// let g = ParamGroup::new(vec![w]).with_lr_mult(0.1).with_weight_decay(0.0);
/// assert_eq!(g.lr_mult, 0.1);
/// assert_eq!(g.weight_decay, Some(0.0));
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ParamGroup {
    /// The parameters of the group.
    pub vars: Vec<Var>,
    /// Multiplier applied to the optimizer's learning rate for this group.
    pub lr_mult: f64,
    /// Weight decay for this group; `None` means the optimizer config's value.
    pub weight_decay: Option<f64>,
}

impl ParamGroup {
    /// A group with `lr_mult = 1` and the config's weight decay.
    pub fn new(vars: Vec<Var>) -> Self {
        Self {
            vars,
            lr_mult: 1.0,
            weight_decay: None,
        }
    }

    /// Sets the LR multiplier.
    pub fn with_lr_mult(mut self, lr_mult: f64) -> Self {
        self.lr_mult = lr_mult;
        self
    }

    /// Overrides the weight decay.
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = Some(weight_decay);
        self
    }

    pub(crate) fn validate(&self, op: &str, idx: usize) -> candle::Result<()> {
        if !self.lr_mult.is_finite() || self.lr_mult < 0.0 {
            candle::bail!(
                "{op}: param group {idx} has lr_mult {}, which must be finite and non-negative; use 1.0 for the base LR",
                self.lr_mult
            )
        }
        if let Some(wd) = self.weight_decay {
            if !wd.is_finite() || wd < 0.0 {
                candle::bail!(
                    "{op}: param group {idx} has weight_decay {wd}, which must be finite and non-negative; use 0.0 to disable it"
                )
            }
        }
        Ok(())
    }
}

/// The default "no weight decay" rule on a VarMap name: true for biases (last path
/// segment `bias`), and for any parameter under a normalization layer (a path segment
/// containing `norm`, or named `bn*`, `gn*`, `ln*`), which covers `GroupNorm`,
/// `BatchNorm`, `LayerNorm` weights and biases under the usual PyTorch names.
///
/// ```
/// use keel_optim::is_no_decay_name;
/// assert!(is_no_decay_name("backbone.conv1.bias"));
/// assert!(is_no_decay_name("backbone.bn1.weight"));
/// assert!(is_no_decay_name("head.group_norm.weight"));
/// assert!(!is_no_decay_name("backbone.conv1.weight"));
/// ```
pub fn is_no_decay_name(name: &str) -> bool {
    let mut segments = name.split('.').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        let s = seg.to_ascii_lowercase();
        if last && s == "bias" {
            return true;
        }
        if !last
            && (s.contains("norm")
                || s.starts_with("bn")
                || s.starts_with("gn")
                || s.starts_with("ln"))
        {
            return true;
        }
    }
    false
}

/// Splits a VarMap into `[decay, no_decay]` groups with [`is_no_decay_name`]; the
/// `no_decay` group gets `weight_decay = Some(0.0)`, the other keeps the config's.
/// Both groups are sorted by name, so the order (and a saved optimizer state) is
/// reproducible. Empty groups are kept (an optimizer ignores them).
///
/// ```
/// use candle::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use keel_optim::split_no_decay;
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let _conv = candle_nn::conv2d(3, 8, 3, Default::default(), vb.pp("conv"))?;
/// let _norm = candle_nn::batch_norm(8, 1e-5, vb.pp("bn"))?;
/// let groups = split_no_decay(&vm);
/// assert_eq!(groups[0].vars.len(), 1); // conv.weight
/// // conv.bias, bn.bias, bn.weight, and candle's running stats (Vars that get no gradient,
/// // so the optimizer skips them)
/// assert_eq!(groups[1].vars.len(), 5);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn split_no_decay(varmap: &VarMap) -> Vec<ParamGroup> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut named: Vec<(&String, &Var)> = data.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    let (no_decay, decay): (Vec<_>, Vec<_>) =
        named.into_iter().partition(|(n, _)| is_no_decay_name(n));
    vec![
        ParamGroup::new(decay.into_iter().map(|(_, v)| v.clone()).collect()),
        ParamGroup::new(no_decay.into_iter().map(|(_, v)| v.clone()).collect())
            .with_weight_decay(0.0),
    ]
}
