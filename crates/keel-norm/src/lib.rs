//! Batch-independent normalization for small-batch training on candle.
//!
//! At batch 1-2 BatchNorm normalizes with noise and train/eval disagree. This crate gives
//! candle models the standard answers, with PyTorch parameter names so checkpoints load
//! unchanged:
//! - [`GroupNorm`] (on keel's fused kernel, with a fused GroupNorm + SiLU form) and
//!   [`group_count`], the largest divisor of C that is <= 32;
//! - [`FrozenBatchNorm2d`] for fine-tuning pretrained backbones, with conv folding;
//! - [`WsConv2d`], Weight Standardization in the mmcv and timm conventions;
//! - [`NormKind`], one switch for a whole model, with the [`conv_norm_act`] block builder;
//! - [`convert`], BatchNorm -> FrozenBatchNorm / GroupNorm conversion of state dicts;
//! - [`recommend`] and [`recommend_plan`] (backbone + head), keel's decision table as code.
//!
//! Trainable BatchNorm stays candle-nn's `BatchNorm`, whose train step matches PyTorch's
//! (output, momentum 0.1, unbiased running variance: see this crate's parity tests).
#![warn(missing_docs)]

mod conv;
pub mod convert;
mod frozen_batch_norm;
mod group_norm;
mod norm_kind;
mod recommend;
mod ws_conv;

pub use frozen_batch_norm::{frozen_batch_norm2d, FrozenBatchNorm2d, FrozenBatchNormConfig};
pub use group_norm::{group_count, group_norm, GroupNorm};
pub use norm_kind::{
    conv_for, conv_norm_act, norm, Activation, Conv, ConvNormAct, Norm, NormKind, DEFAULT_GROUPS,
    NORM_EPS,
};
pub use recommend::{recommend, recommend_plan, NormPlan, BN_MIN_BATCH};
pub use ws_conv::{ws_conv2d, ws_conv2d_no_bias, WsConfig, WsConv2d, WsConvention};
