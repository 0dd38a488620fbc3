//! Parameter groups (PyTorch's `param_groups`): per-group LR multiplier and weight
//! decay, and the standard "no weight decay on norm and bias parameters" split
//! (Goyal et al. 2017; timm's `param_groups_weight_decay`).

use candle::Var;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

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

/// The "no weight decay" rule on a VarMap name alone: true for biases (last path
/// segment `bias`), and for any parameter under a normalization layer (a path segment
/// containing `norm`, or named `bn*`, `gn*`, `ln*`), which covers `GroupNorm`,
/// `BatchNorm`, `LayerNorm` weights and biases under the usual PyTorch names. Norms under
/// positional names (`stages.0.1.weight`, torchvision's `downsample.1`) are missed:
/// [`split_no_decay`] also exempts every parameter of rank <= 1 ([`NoDecay::Rank`]).
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

/// Which parameters [`split_no_decay_with`] exempts from weight decay.
///
/// Serialized in lowercase (`"rank"`, `"names"`): a trainer's run config records the rule
/// its run was started with, so a resumed run rebuilds the same groups (a saved optimizer
/// state is indexed across groups in order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoDecay {
    /// Every parameter of rank <= 1 (biases and every norm's weight and bias, whatever the
    /// layer is called) and every name [`is_no_decay_name`] matches. The default.
    #[default]
    Rank,
    /// [`is_no_decay_name`] alone: keel's rule before 2026-12-01. It misses norms under
    /// positional names (keel's twin network's `n1`, `skip.1`, `stem.1`; torchvision's
    /// `downsample.1`), whose weights then decay; kept so runs started with it resume
    /// with the same groups.
    Names,
}

impl NoDecay {
    /// Whether the parameter `name` of `rank` gets no weight decay under this rule.
    ///
    /// ```
    /// use keel_optim::NoDecay;
    /// assert!(NoDecay::Rank.exempts("stages.0.0.n1.weight", 1));
    /// assert!(!NoDecay::Names.exempts("stages.0.0.n1.weight", 1));
    /// assert!(NoDecay::Names.exempts("head.bias", 1));
    /// assert!(!NoDecay::Rank.exempts("stages.0.0.c1.weight", 4));
    /// ```
    pub fn exempts(self, name: &str, rank: usize) -> bool {
        match self {
            NoDecay::Rank => rank <= 1 || is_no_decay_name(name),
            NoDecay::Names => is_no_decay_name(name),
        }
    }
}

/// Splits a VarMap into `[decay, no_decay]` groups with [`NoDecay::Rank`]: biases and norm
/// parameters (rank <= 1) get no weight decay; see [`split_no_decay_with`].
///
/// ```
/// use candle::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use keel_optim::split_no_decay;
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let _conv = candle_nn::conv2d(3, 8, 3, Default::default(), vb.pp("conv"))?;
/// let _norm = candle_nn::batch_norm(8, 1e-5, vb.pp("bn"))?;
/// let _gn = candle_nn::group_norm(2, 8, 1e-5, vb.pp("stage.1"))?; // a positional name
/// let groups = split_no_decay(&vm);
/// assert_eq!(groups[0].vars.len(), 1); // conv.weight
/// // conv.bias, bn.bias, bn.weight, candle's running stats (Vars that get no gradient,
/// // so the optimizer skips them), stage.1.weight and stage.1.bias
/// assert_eq!(groups[1].vars.len(), 7);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn split_no_decay(varmap: &VarMap) -> Vec<ParamGroup> {
    split_no_decay_with(varmap, NoDecay::Rank)
}

/// Splits a VarMap into `[decay, no_decay]` groups with `rule`; the `no_decay` group gets
/// `weight_decay = Some(0.0)`, the other keeps the config's. Both groups are sorted by
/// name, so the order (and a saved optimizer state) is reproducible. Empty groups are kept
/// (an optimizer ignores them).
pub fn split_no_decay_with(varmap: &VarMap, rule: NoDecay) -> Vec<ParamGroup> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut named: Vec<(&String, &Var)> = data.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    let (no_decay, decay): (Vec<_>, Vec<_>) = named
        .into_iter()
        .partition(|(n, v)| rule.exempts(n, v.rank()));
    vec![
        ParamGroup::new(decay.into_iter().map(|(_, v)| v.clone()).collect()),
        ParamGroup::new(no_decay.into_iter().map(|(_, v)| v.clone()).collect())
            .with_weight_decay(0.0),
    ]
}
