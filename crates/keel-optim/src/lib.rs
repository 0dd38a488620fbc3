//! keel-optim: the optimization safety belt for small-batch training on candle.
//!
//! Aggressive optimization (a high LR on noisy gradients, no warmup, exploding gradient
//! norms) is the third cause of unstable small-batch training. This crate gives candle
//! users what PyTorch recipes assume, with PyTorch semantics so the recipes carry over:
//!
//! - LR schedules as pure functions of the step ([`LrSchedule`]): [`Constant`],
//!   [`Cosine`], [`Poly`], [`MultiStep`], and [`Warmup`] in front of any of them.
//! - [`clip_grad_norm`] (one global L2 norm, like `torch.nn.utils.clip_grad_norm_`) and
//!   [`clip_grad_value`].
//! - [`Sgd`] (momentum, dampening, Nesterov, weight decay) and [`AdamW`], both
//!   implementing [`candle_nn::Optimizer`], with [`ParamGroup`]s and safetensors state.
//! - Mixed precision: f32 master weights cast per forward ([`mixed`]), and dynamic
//!   loss scaling for f16 ([`GradScaler`]).
//! - [`GradAccumulator`] for gradient accumulation and [`Ema`] for weight averaging.
//! - The run's choices as enums: [`OptimizerKind`] and [`Precision`].

pub mod accumulate;
pub mod adamw;
pub mod choice;
pub mod clip;
pub mod ema;
pub mod grad_scaler;
pub mod grouped;
pub mod mixed;
pub mod param_group;
pub mod schedule;
pub mod sgd;
mod state;
pub mod traits;

pub use accumulate::GradAccumulator;
pub use adamw::{AdamW, AdamWConfig, AdamWState};
pub use choice::{OptimizerKind, Precision};
pub use clip::{clip_grad_norm, clip_grad_value};
pub use ema::{Ema, EmaConfig, EmaWarmup};
pub use grad_scaler::{GradScaler, GradScalerConfig};
pub use grouped::{GroupHparams, Grouped, ParamState, SavedState, UpdateRule};
pub use param_group::{is_no_decay_name, split_no_decay, ParamGroup};
pub use schedule::{Constant, Cosine, LrSchedule, MultiStep, Poly, Warmup};
pub use sgd::{Sgd, SgdConfig, SgdState};
pub use traits::{DynOptimizer, StateDict};
