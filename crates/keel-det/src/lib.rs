//! # keel-det: detection ops on candle with torchvision semantics
//!
//! The building blocks of a dense detector's training and post-processing (FCOS,
//! RetinaNet), each checked against torchvision on committed fixtures
//! (`tests/fixtures/gen_det_ops.py`):
//!
//! - [`boxes`]: [`boxes::box_area`], [`boxes::box_iou`] and
//!   [`boxes::generalized_box_iou`] matrices of xyxy boxes, differentiable;
//! - [`losses`]: [`losses::sigmoid_focal_loss`] and [`losses::generalized_box_iou_loss`]
//!   with backward (composed candle ops: CPU and CUDA), f16/bf16 computed in f32;
//! - [`nms`]: [`nms::nms`] and class-aware [`nms::batched_nms`] whose kept indices are
//!   identical to torchvision's, ties included;
//! - [`fcos`]: the FCOS detector's head, FPN, target assignment, loss and inference
//!   (see its module docs for an end-to-end example).
//!
//! ```
//! use candle::{Device, Tensor, Var};
//! use keel_det::{boxes::box_iou, losses::{generalized_box_iou_loss, Reduction}, nms::batched_nms};
//! # fn main() -> candle::Result<()> {
//! let dev = Device::Cpu;
//! let pred = Var::new(&[[0f32, 0., 4., 4.], [1., 1., 5., 5.], [10., 10., 12., 12.]], &dev)?;
//! let gt = Tensor::new(&[[0f32, 0., 4., 4.], [0., 0., 4., 4.], [10., 10., 13., 12.]], &dev)?;
//! let loss = generalized_box_iou_loss(pred.as_tensor(), &gt, Reduction::Mean, 1e-7)?;
//! let grads = loss.backward()?;
//! assert_eq!(grads.get(&pred).unwrap().dims(), &[3, 4]);
//!
//! let iou = box_iou(pred.as_tensor(), &gt)?; // (3, 3)
//! assert_eq!(iou.dims(), &[3, 3]);
//! let scores = Tensor::new(&[0.9f32, 0.8, 0.7], &dev)?;
//! let classes = Tensor::new(&[0u32, 0, 1], &dev)?;
//! // Box 1 overlaps box 0 (IoU 9/23 > 0.3) in the same class: suppressed.
//! assert_eq!(batched_nms(pred.as_tensor(), &scores, &classes, 0.3)?, [0, 2]);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod boxes;
pub mod fcos;
pub mod losses;
pub mod nms;
mod sort;
