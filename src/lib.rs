//! # keel: stable small-batch training on candle
//!
//! Detection and segmentation training on one GPU at batch 1-8 tends to go haywire: loss
//! jumps, mIoU slides back, gradient norms explode, and the same seed gives different results.
//! keel collects the standard cures as candle building blocks, with PyTorch semantics and
//! PyTorch parameter names:
//!
//! - [`norm`]: batch-independent normalization: GroupNorm (fused, with a GN + SiLU form),
//!   FrozenBatchNorm2d, Weight Standardization, one `NormKind` switch for a whole model,
//!   BatchNorm -> GroupNorm / FrozenBatchNorm checkpoint conversion.
//! - [`kernels`]: fused, differentiable kernels (CPU, and CUDA with the `cuda` feature)
//!   behind the layers: GroupNorm(+SiLU) forward and backward, and conv2d with dedicated
//!   backward-data / backward-filter ops (im2col + GEMM on CPU, cuDNN with `cuda`), and
//!   the segmentation ops: cross-entropy with `ignore_index` and class weights, and
//!   differentiable nearest / bilinear resizing.
//! - [`optim`]: LR schedules with warmup, global-norm clipping, SGD and AdamW with PyTorch
//!   semantics, f16/bf16 mixed precision with dynamic loss scaling, accumulation, EMA.
//! - [`models`]: networks with PyTorch parameter names: `SegNet` (ResNet-18-style
//!   encoder, FPN-lite decoder) shaped by a serde-able `ModelConfig`; torchvision's
//!   ResNet-18/34/50/101 (`resnet`); `seg_model::SegModel`, the twin or a ResNet backbone
//!   under the FPN-lite decoder, with a lower-LR param group for the backbone.
//! - [`data`]: deterministic data: the synthetic shapes set, Pascal VOC folders validated
//!   in full before training, a prefetching batch loader whose batches depend only on
//!   `(seed, position)` (exact resume).
//! - [`det`]: detection ops with torchvision semantics: box IoU / GIoU matrices, sigmoid
//!   focal and GIoU losses with backward, NMS and class-aware batched NMS whose kept
//!   indices are identical to torchvision's, ties included.
//! - [`train`]: the training-loop pieces: a stability monitor with a health report
//!   ("is my training going haywire?"), mIoU metrics, atomic checkpoints, JSONL logs.
//!
//! ```
//! use candle::{DType, Device, ModuleT, Tensor};
//! use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
//! use keel::norm::{conv_norm_act, Activation, NormKind};
//! # fn main() -> candle::Result<()> {
//! let vm = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
//! let kind: NormKind = "gn".parse()?; // or "bn", "frozen-bn", "gn:16", "ws-gn"
//! let cfg = Conv2dConfig { padding: 1, ..Default::default() };
//! let block = conv_norm_act(3, 32, 3, cfg, kind, Activation::Silu, vb.pp("stem"))?;
//! let y = block.forward_t(&Tensor::randn(0f32, 1., (1, 3, 64, 64), &Device::Cpu)?, true)?;
//! assert_eq!(y.dims(), &[1, 32, 64, 64]);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub use keel_data as data;
pub use keel_det as det;
pub use keel_kernels as kernels;
pub use keel_models as models;
pub use keel_norm as norm;
pub use keel_optim as optim;
pub use keel_train as train;
