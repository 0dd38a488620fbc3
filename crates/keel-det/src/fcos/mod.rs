//! FCOS (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019):
//! the head, a small FPN, target assignment, the loss and inference, mirroring the
//! reference implementation tianzhi0549/FCOS (`fcos_core/modeling/rpn/fcos/{fcos.py,
//! loss.py, inference.py}`, `fcos_core/modeling/backbone/fpn.py`); each submodule names the
//! function it mirrors and its documented deviations. Targets and losses are checked
//! against a PyTorch reimplementation of `loss.py` (`tests/fixtures/gen_fcos.py`).
//!
//! ```
//! use candle::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use keel_det::fcos::*;
//! # fn main() -> candle::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
//! let strides = [8, 16, 32];
//! let head = fcos_head(FcosHeadConfig { num_convs: 1, num_levels: 3, ..FcosHeadConfig::new(2, 32) }, vb)?;
//! // P3-P5 of one 64x64 image (from an Fpn in a real detector).
//! let feats: Vec<Tensor> = [8, 4, 2].iter()
//!     .map(|&s| Tensor::randn(0f32, 1., (1, 32, s, s), &dev)).collect::<candle::Result<_>>()?;
//! let out = head.forward_t(&feats, true)?;
//! let gt = GtBoxes { boxes: vec![[4.0, 8.0, 30.0, 40.0]], classes: vec![1] };
//! let targets = prepare_targets(&out.feature_sizes()?, &[gt], &FcosTargetConfig::with_base(&strides, 16.0), &dev)?;
//! let losses = fcos_loss(&out, &targets, &FcosLossConfig::default())?;
//! let grads = losses.total()?.backward()?;
//! assert!(grads.get(&vm.all_vars()[0]).is_some());
//! let dets = fcos_detections(&out, &strides, &[(64.0, 64.0)], &FcosInferenceConfig::default())?;
//! assert!(dets[0].boxes.len() <= 100);
//! # Ok(()) }
//! ```
pub mod fpn;
pub mod head;
pub mod inference;
pub mod init;
pub mod loss;
pub mod targets;

pub use fpn::{fpn, Fpn, FpnConfig};
pub use head::{fcos_head, FcosHead, FcosHeadConfig, FcosOutputs, Scale};
pub use inference::{fcos_detections, Detections, FcosInferenceConfig};
pub use init::seeded_init;
pub use loss::{fcos_loss, FcosLossConfig, FcosLosses};
pub use targets::{
    compute_locations, prepare_targets, sizes_of_interest, FcosTargetConfig, FcosTargets, GtBoxes,
    INF,
};
