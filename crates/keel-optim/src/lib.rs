//! keel-optim: the optimization safety belt for small-batch training on candle.
//!
//! Aggressive optimization (a high LR on noisy gradients, no warmup, exploding gradient
//! norms) is the third cause of unstable small-batch training. This crate gives candle
//! users what PyTorch recipes assume, with PyTorch semantics so the recipes carry over:
//!
//! - LR schedules as pure functions of the step ([`LrSchedule`]): [`Constant`],
//!   [`Cosine`], [`Poly`], [`MultiStep`], and [`Warmup`] in front of any of them.
//! - [`clip_grad_norm`] (one global L2 norm, like `torch.nn.utils.clip_grad_norm_`),
//!   [`clip_grad_norm_device`] (the same without a host read: the norm stays a tensor) and
//!   [`clip_grad_value`]; [`host_read`] counts keel's tensor-to-host reads.
//! - [`Sgd`] (momentum, dampening, Nesterov, weight decay) and [`AdamW`], both
//!   implementing [`candle_nn::Optimizer`], with [`ParamGroup`]s and safetensors state.
//!   Both are one core, [`Grouped`]: it owns the parameter groups, one lazily created
//!   state slot per parameter ([`ParamState`]), the f32 compute dtype, the state dict
//!   (`lr`, `num_params`, `state.{i}.{name}`; loaded in two phases, checked before
//!   assigned) and the learning-rate checks; an [`UpdateRule`] (the config type plus one
//!   per-parameter `step`) is the algorithm. `Sgd` is `Grouped<SgdConfig>` and `AdamW` is
//!   `Grouped<AdamWConfig>`; a third optimizer is one more `UpdateRule` (see [`grouped`]).
//! - Mixed precision: f32 master weights cast per forward ([`mixed`]), and dynamic
//!   loss scaling for f16 ([`GradScaler`]).
//! - [`GradAccumulator`] for gradient accumulation and [`Ema`] for weight averaging.
//! - The run's choices as enums: [`OptimizerKind`] and [`Precision`].
//!
//! Two traits let a training loop hold all of this without naming the types
//! ([`traits`]): [`StateDict`] (named tensors, with default safetensors `save`/`load`) is
//! implemented by every stateful type: the optimizers, [`Ema`] and [`GradScaler`].
//! [`DynOptimizer`] is an object-safe optimizer (step, learning rate, state dict),
//! blanket-implemented for every [`candle_nn::Optimizer`] with a [`StateDict`], so a loop
//! holds a `Box<dyn DynOptimizer>` and [`GradScaler::step`] takes `&mut dyn
//! DynOptimizer`. Learning rates are checked wherever they enter (configs,
//! `set_learning_rate`, loaded states): NaN, negative, or infinite in f32 is an error.

pub mod accumulate;
pub mod adamw;
pub mod choice;
pub mod clip;
pub mod ema;
pub mod fused;
pub mod grad_scaler;
pub mod grouped;
pub mod host_read;
pub mod mixed;
pub mod param_group;
pub mod schedule;
pub mod sgd;
mod state;
pub mod traits;

pub use accumulate::GradAccumulator;
pub use adamw::{AdamW, AdamWConfig, AdamWState};
pub use choice::{OptimizerKind, Precision};
pub use clip::{clip_grad_norm, clip_grad_norm_device, clip_grad_value};
pub use ema::{Ema, EmaConfig, EmaWarmup};
pub use grad_scaler::{GradScaler, GradScalerConfig};
pub use grouped::{GroupHparams, Grouped, ParamState, SavedState, UpdateRule};
pub use param_group::{is_no_decay_name, split_no_decay, split_no_decay_with, NoDecay, ParamGroup};
pub use schedule::{Constant, Cosine, LrSchedule, MultiStep, Poly, Warmup};
pub use sgd::{Sgd, SgdConfig, SgdState};
pub use traits::{DynOptimizer, StateDict};
