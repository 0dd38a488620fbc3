//! The grouped-optimizer core that [`crate::Sgd`] and [`crate::AdamW`] share (PyTorch's
//! `torch.optim.Optimizer` base class: `param_groups` plus a lazily created per-parameter
//! `state`).
//!
//! An optimizer is an [`UpdateRule`] (its config: hyper-parameters, validation, and one
//! per-parameter step function) run by [`Grouped`], which owns everything else: the
//! [`ParamGroup`]s with their LR multipliers and weight decays, one optional state slot
//! per parameter, the f32 compute dtype, skipping parameters without a gradient,
//! [`candle_nn::Optimizer`], and the state dict (`lr`, `num_params`,
//! `state.{i}.{name}`, loaded in two phases: everything is read and checked before
//! anything is assigned). A third optimizer is one config type and one `step`:
//!
//! ```
//! use candle::{Device, Tensor, Var};
//! use candle_nn::Optimizer;
//! use keel_optim::{GroupHparams, Grouped, UpdateRule};
//!
//! /// Plain SGD: `p -= lr * g`.
//! #[derive(Clone, Copy, Debug)]
//! struct Plain {
//!     lr: f64,
//! }
//!
//! impl UpdateRule for Plain {
//!     const NAME: &'static str = "Plain";
//!     type State = ();
//!     fn hparams(&self) -> GroupHparams {
//!         GroupHparams { lr: self.lr, weight_decay: 0.0 }
//!     }
//!     fn step(&self, h: &GroupHparams, p: Tensor, g: Tensor, _: &mut Option<()>) -> candle::Result<Tensor> {
//!         p - g.affine(h.lr, 0.0)?
//!     }
//! }
//!
//! let w = Var::new(&[1f32, -1.0], &Device::Cpu)?;
//! let mut opt = Grouped::new(vec![w.clone()], Plain { lr: 0.25 })?;
//! opt.backward_step(&w.as_tensor().sqr()?.sum_all()?)?; // grad 2w
//! assert_eq!(w.to_vec1::<f32>()?, vec![0.5, -0.5]);
//! # Ok::<(), candle::Error>(())
//! ```

use std::collections::HashMap;
use std::fmt::Debug;

use candle::backprop::GradStore;
use candle::{Tensor, Var};

use crate::param_group::ParamGroup;
use crate::state;
use crate::traits::{check_lr, StateDict};

/// One optimizer algorithm: its hyper-parameters (the implementing type is the config
/// [`Grouped::config`] returns) and its per-parameter update.
pub trait UpdateRule: Clone + Debug {
    /// The optimizer's name in error messages (`"Sgd"`).
    const NAME: &'static str;

    /// The per-parameter state (momentum buffers, moments, step counts); `()` for a
    /// stateless rule. It is created by the first [`UpdateRule::step`] that sees a
    /// gradient for the parameter, like PyTorch's lazy `state[p]`.
    type State: ParamState + Debug;

    /// The base learning rate and the weight decay of groups that do not override it, as
    /// this config sets them. [`Grouped`] takes the base LR from here once and keeps it
    /// itself from then on (`set_learning_rate`, `load_state_dict`); each group scales it
    /// by its `lr_mult`.
    fn hparams(&self) -> GroupHparams;

    /// Checks the hyper-parameters other than the learning rate (which [`Grouped`]
    /// checks itself); called once before any state exists.
    fn validate(&self) -> candle::Result<()> {
        Ok(())
    }

    /// One update of one parameter: `param` and `grad` are detached copies in the
    /// compute dtype (f32, or f64 for f64 parameters), `state` is this parameter's slot
    /// (`None` until a step fills it). Returns the new parameter in the compute dtype.
    fn step(
        &self,
        hparams: &GroupHparams,
        param: Tensor,
        grad: Tensor,
        state: &mut Option<Self::State>,
    ) -> candle::Result<Tensor>;

    /// The same update done directly on `var` (f32 parameter, gradient as the backward
    /// pass gave it) in fewer passes, e.g. [`crate::Sgd`]'s and [`crate::AdamW`]'s one-pass
    /// CPU loops: `Ok(true)` when it updated `var` and `state`, `Ok(false)` (having changed
    /// nothing) to have [`UpdateRule::step`] do it. It must give the same values as
    /// `step`. The default does nothing.
    fn step_fused(
        &self,
        hparams: &GroupHparams,
        var: &Var,
        grad: &Tensor,
        state: &mut Option<Self::State>,
    ) -> candle::Result<bool> {
        let _ = (hparams, var, grad, state);
        Ok(false)
    }
}

/// The hyper-parameters one group contributes to a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupHparams {
    /// The effective learning rate: the base LR times the group's `lr_mult`.
    pub lr: f64,
    /// The group's weight decay (its override, or [`UpdateRule::weight_decay`]).
    pub weight_decay: f64,
}

/// A per-parameter state that goes into the state dict as `state.{i}.{name}` entries.
pub trait ParamState: Sized {
    /// The named tensors to save (scalars as one-element f64 tensors).
    fn save(&self) -> candle::Result<Vec<(&'static str, Tensor)>>;

    /// Rebuilds the state from the saved entries of one parameter; `Ok(None)` when the
    /// parameter had no state when it was saved.
    fn load(saved: &SavedState<'_>) -> candle::Result<Option<Self>>;
}

/// A stateless rule saves nothing and loads nothing.
impl ParamState for () {
    fn save(&self) -> candle::Result<Vec<(&'static str, Tensor)>> {
        Ok(Vec::new())
    }

    fn load(_saved: &SavedState<'_>) -> candle::Result<Option<Self>> {
        Ok(None)
    }
}

/// The saved entries of one parameter, read with the checks of the state dict (present,
/// shaped like the parameter, a valid count) and errors that name the optimizer.
#[derive(Debug)]
pub struct SavedState<'a> {
    op: &'static str,
    map: &'a HashMap<String, Tensor>,
    index: usize,
    param: &'a Tensor,
}

impl SavedState<'_> {
    fn key(&self, name: &str) -> String {
        format!("state.{}.{name}", self.index)
    }

    /// Whether the entry `state.{i}.{name}` exists.
    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(&self.key(name))
    }

    /// The entry `name` as a tensor shaped like the parameter, on its device, in the
    /// compute dtype (f32, or f64 for f64 parameters).
    pub fn tensor(&self, name: &str) -> candle::Result<Tensor> {
        let dtype = state::compute_dtype(self.param.dtype());
        state::get_like(self.op, self.map, &self.key(name), self.param, dtype)
    }

    /// The entry `name` as a count (a one-element tensor holding a non-negative integer).
    pub fn count(&self, name: &str) -> candle::Result<usize> {
        state::get_count(self.op, self.map, &self.key(name))
    }
}

/// A parameter and its state slot.
#[derive(Debug)]
struct Slot<S> {
    var: Var,
    state: Option<S>,
}

#[derive(Debug)]
struct Group<S> {
    lr_mult: f64,
    weight_decay: f64,
    slots: Vec<Slot<S>>,
}

/// An optimizer over parameter groups running the update rule `R`; [`crate::Sgd`] and
/// [`crate::AdamW`] are `Grouped<SgdConfig>` and `Grouped<AdamWConfig>`.
///
/// Implements [`candle_nn::Optimizer`] (`Config = R`) and [`StateDict`], so also
/// [`crate::DynOptimizer`]. Non-float vars are dropped; vars without a gradient in a
/// step are left as they are and their state does not advance.
#[derive(Debug)]
pub struct Grouped<R: UpdateRule> {
    rule: R,
    /// The base learning rate (the rule's until `set_learning_rate` or a loaded state).
    lr: f64,
    groups: Vec<Group<R::State>>,
    /// Whether [`UpdateRule::step_fused`] is tried first (default true).
    fused: bool,
    /// Parameter updates [`UpdateRule::step_fused`] made.
    fused_updates: u64,
}

impl<R: UpdateRule> Grouped<R> {
    /// The optimizer over parameter groups (per-group LR multiplier and weight decay).
    /// Errors name the optimizer, the bad value and a fix: an LR that is negative, NaN
    /// or infinite (also in f32), a hyper-parameter the rule rejects, a bad group.
    pub fn with_groups(groups: Vec<ParamGroup>, rule: R) -> candle::Result<Self> {
        let base = rule.hparams();
        check_lr(R::NAME, base.lr)?;
        rule.validate()?;
        let mut out = Vec::with_capacity(groups.len());
        for (i, g) in groups.into_iter().enumerate() {
            g.validate(R::NAME, i)?;
            let slots = g.vars.into_iter().filter(|v| v.dtype().is_float());
            out.push(Group {
                lr_mult: g.lr_mult,
                weight_decay: g.weight_decay.unwrap_or(base.weight_decay),
                slots: slots.map(|var| Slot { var, state: None }).collect(),
            });
        }
        Ok(Self {
            rule,
            lr: base.lr,
            groups: out,
            fused: fused_default()?,
            fused_updates: 0,
        })
    }

    /// Turns the rule's one-pass update ([`UpdateRule::step_fused`]) on or off; off, every
    /// update runs [`UpdateRule::step`]'s candle ops. Both give the same values: this is
    /// for comparing their speed. On by default, unless the environment variable
    /// `KEEL_OPTIM_FUSED=0` (read when the optimizer is built) turns it off for a whole
    /// trainer, e.g. `KEEL_OPTIM_FUSED=0 seg_train bench`.
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on;
    }

    /// How many parameter updates took the one-pass path so far (not saved in the state).
    pub fn fused_updates(&self) -> u64 {
        self.fused_updates
    }

    /// The configuration the optimizer was built with. Its `lr` is the starting one: the
    /// current base learning rate, which `set_learning_rate` and a loaded state change,
    /// is [`candle_nn::Optimizer::learning_rate`].
    pub fn config(&self) -> &R {
        &self.rule
    }

    fn slots(&self) -> impl Iterator<Item = &Slot<R::State>> {
        self.groups.iter().flat_map(|g| g.slots.iter())
    }
}

/// [`Grouped::set_fused`]'s default: `KEEL_OPTIM_FUSED` unset or `1` on, `0` off.
fn fused_default() -> candle::Result<bool> {
    match std::env::var("KEEL_OPTIM_FUSED") {
        Err(_) => Ok(true),
        Ok(v) => match v.trim() {
            "1" => Ok(true),
            "0" => Ok(false),
            other => candle::bail!(
                "KEEL_OPTIM_FUSED={other:?}: use 1 (the optimizers' one-pass CPU updates, the \
                 default) or 0 (candle ops only, for comparing speed)"
            ),
        },
    }
}

/// The state dict entry holding the parameter count of each group.
const GROUP_SIZES: &str = "group_sizes";

impl<R: UpdateRule> Grouped<R> {
    /// The parameter count of each group, in order (as f64, the state dict's number type).
    fn group_sizes(&self) -> Vec<f64> {
        self.groups.iter().map(|g| g.slots.len() as f64).collect()
    }
}

impl<R: UpdateRule> StateDict for Grouped<R> {
    /// The state: `lr`, `num_params`, `group_sizes` (parameters per group, in order), and
    /// `state.{i}.{name}` for every entry of every parameter (flat index across groups)
    /// that has a state.
    fn state_dict(&self) -> candle::Result<HashMap<String, Tensor>> {
        let n = self.slots().count() as f64;
        let mut out = state::scalars(&[("lr", self.lr), ("num_params", n)])?;
        out.insert(
            GROUP_SIZES.to_string(),
            Tensor::new(self.group_sizes().as_slice(), &candle::Device::Cpu)?,
        );
        for (i, slot) in self.slots().enumerate() {
            let Some(st) = &slot.state else { continue };
            for (name, t) in st.save()? {
                out.insert(format!("state.{i}.{name}"), t);
            }
        }
        Ok(out)
    }

    /// The rule's [`UpdateRule::NAME`] (`Sgd`, `AdamW`).
    fn name(&self) -> String {
        R::NAME.to_string()
    }

    /// Restores a state from [`Grouped::state_dict`]; the optimizer must be built over
    /// the same parameters in the same order, in groups of the same sizes (checked when the
    /// state has `group_sizes`: states saved before it existed are matched by position
    /// only). Everything is checked before anything is assigned, so on error `self` is
    /// unchanged.
    fn load_state_dict(&mut self, map: &HashMap<String, Tensor>) -> candle::Result<()> {
        state::check_count(R::NAME, map, self.slots().count())?;
        if let Some(t) = map.get(GROUP_SIZES) {
            let saved = t
                .flatten_all()?
                .to_dtype(candle::DType::F64)?
                .to_vec1::<f64>()?;
            let ours = self.group_sizes();
            if saved != ours {
                candle::bail!(
                    "{}: the state was saved for param groups of sizes {saved:?}, this optimizer \
                     has {ours:?}; build it with the same groups in the same order (for keel's \
                     trainers: the run's own config, whose `no_decay` rule decides the groups)",
                    R::NAME
                )
            }
        }
        let lr = state::get_scalar(R::NAME, map, "lr")?;
        check_lr(R::NAME, lr)?;
        let mut loaded = Vec::new();
        for (index, slot) in self.slots().enumerate() {
            let saved = SavedState {
                op: R::NAME,
                map,
                index,
                param: slot.var.as_tensor(),
            };
            loaded.push(R::State::load(&saved)?);
        }
        let slots = self.groups.iter_mut().flat_map(|g| g.slots.iter_mut());
        for (slot, st) in slots.zip(loaded) {
            slot.state = st;
        }
        self.lr = lr;
        Ok(())
    }
}

impl<R: UpdateRule> candle_nn::Optimizer for Grouped<R> {
    type Config = R;

    fn new(vars: Vec<Var>, config: R) -> candle::Result<Self> {
        Self::with_groups(vec![ParamGroup::new(vars)], config)
    }

    fn step(&mut self, grads: &GradStore) -> candle::Result<()> {
        // candle's `set_learning_rate` cannot return an error: a bad LR set through it is
        // refused here, before any parameter changes.
        crate::traits::check_lr(&format!("{}::step", R::NAME), self.lr)?;
        let base_lr = self.lr;
        for group in self.groups.iter_mut() {
            let hparams = GroupHparams {
                lr: base_lr * group.lr_mult,
                weight_decay: group.weight_decay,
            };
            for slot in group.slots.iter_mut() {
                let Some(grad) = grads.get(&slot.var) else {
                    continue;
                };
                if self.fused
                    && self
                        .rule
                        .step_fused(&hparams, &slot.var, grad, &mut slot.state)?
                {
                    self.fused_updates += 1;
                    continue;
                }
                let dtype = state::compute_dtype(slot.var.dtype());
                let param = slot.var.as_tensor().detach().to_dtype(dtype)?;
                let grad = grad.detach().to_dtype(dtype)?;
                let new = self.rule.step(&hparams, param, grad, &mut slot.state)?;
                slot.var.set(&new.to_dtype(slot.var.dtype())?)?;
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.lr
    }

    /// Sets the base LR. candle's trait has no error path: a NaN, negative or
    /// f32-overflowing LR is refused by the next [`step`](candle_nn::Optimizer::step) (use
    /// [`DynOptimizer::set_learning_rate`](crate::DynOptimizer::set_learning_rate) to be
    /// told at once).
    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }
}
