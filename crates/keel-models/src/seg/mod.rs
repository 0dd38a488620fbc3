//! The segmentation network: the PyTorch eager twin of `shared/tools/torch_seg_twin.py`
//! (ResNet-18-style encoder after He et al., 2016, "Deep Residual Learning for Image
//! Recognition", arXiv:1512.03385; FPN-lite decoder after Lin et al., 2017, "Feature
//! Pyramid Networks for Object Detection", arXiv:1612.03144) with every norm chosen by a
//! [`NormKind`](keel_norm::NormKind).
//!
//! Parameter names are the twin's `state_dict` keys (`stem.0.weight`, `stem.1.weight`,
//! `stages.2.0.skip.1.running_var`, `lat.3.bias`, `smooth.1.bias`, `head.weight`, ...), so
//! a twin checkpoint loads unchanged. `width 64, fpn 128, 21 classes` is the twin exactly
//! (11.46 M parameters).
//!
//! The encoder alone is [`SegEncoder`] (C2-C5 at strides 4-32, the same names), the
//! backbone of det_train's FCOS.
//!
//! Mixed precision: [`SegNet::forward_in`] runs the master model in f16/bf16 through a
//! copy cast from its f32 weights ([`SegNet::cast_copy`]); [`SegNet::for_step`] casts once
//! per optimizer step for all its micro-batches.

mod config;
pub(crate) mod decoder;
mod encoder;
mod init;
mod layers;
mod load;
mod mixed;
mod net;

pub use config::ModelConfig;
pub use encoder::{copy_bn_stats, SegEncoder};
pub use init::{count_params, init_weights};
pub use load::{load_pretrained, non_finite_tensors, LoadReport};
pub use mixed::{cast_copies, StepNet};
pub use net::SegNet;
