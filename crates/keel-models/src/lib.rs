//! keel-models: networks built on keel's layers and kernels, with PyTorch parameter names so
//! that PyTorch checkpoints load unchanged.
//!
//! - [`seg`]: [`seg::SegNet`], a ResNet-18-style encoder with an FPN-lite decoder for
//!   semantic segmentation, shaped by a serde-able [`seg::ModelConfig`], plus the seeded
//!   PyTorch-rule initialisation [`seg::init_weights`] and [`seg::count_params`].
//! - [`resnet`]: [`resnet::ResNet`], torchvision's ResNet-18/34/50/101 with its `state_dict`
//!   names, C2-C5 outputs for an FPN, a [`NormKind`](keel_norm::NormKind) switch and
//!   detectron2's `freeze_at`, loaded from converted torchvision checkpoints by
//!   [`resnet::ResNet::from_state_dict`].
#![warn(missing_docs)]

pub mod resnet;
pub mod seg;
