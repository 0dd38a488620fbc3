//! keel-models: networks built on keel's layers and kernels, with PyTorch parameter names so
//! that PyTorch checkpoints load unchanged.
//!
//! - [`seg`]: [`seg::SegNet`], a ResNet-18-style encoder with an FPN-lite decoder for
//!   semantic segmentation, shaped by a serde-able [`seg::ModelConfig`], plus the seeded
//!   PyTorch-rule initialisation [`seg::init_weights`] and [`seg::count_params`].
#![warn(missing_docs)]

pub mod seg;
