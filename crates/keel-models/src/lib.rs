//! keel-models: networks built on keel's layers and kernels, with PyTorch parameter names so
//! that PyTorch checkpoints load unchanged.
//!
//! - [`backbone`]: the backbone choice keel's trainers share ([`backbone::BackboneArgs`]:
//!   `--backbone twin|resnet18..101` and its norm, `freeze_at` and LR-multiplier flags, clap
//!   with the `clap` feature, serde always), their defaults and checks, a torchvision
//!   checkpoint loaded into the backbone, and the param groups with a lower-LR backbone.
//! - [`seg`]: [`seg::SegNet`], a ResNet-18-style encoder with an FPN-lite decoder for
//!   semantic segmentation, shaped by a serde-able [`seg::ModelConfig`], plus the seeded
//!   PyTorch-rule initialisation [`seg::init_weights`] and [`seg::count_params`].
//! - [`resnet`]: [`resnet::ResNet`], torchvision's ResNet-18/34/50/101 with its `state_dict`
//!   names, C2-C5 outputs for an FPN, a [`NormKind`](keel_norm::NormKind) switch and
//!   detectron2's `freeze_at`, loaded from converted torchvision checkpoints by
//!   [`resnet::ResNet::from_state_dict`].
//! - [`seg_model`]: [`seg_model::SegModel`], the network a training loop builds from a
//!   [`seg_model::SegModelConfig`]: the twin, or [`seg_model::ResNetSeg`] (a ResNet backbone
//!   under `backbone.` with SegNet's FPN-lite decoder and head) for fine-tuning a pretrained
//!   torchvision backbone.
#![warn(missing_docs)]

pub mod backbone;
pub mod resnet;
pub mod seg;
pub mod seg_model;
