//! # keel-det: detection on candle with torchvision and pycocotools semantics
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
//! - [`coco_eval`]: COCO-style bounding-box mAP (AP @[.50:.95], AP50, AP75, per-size AP,
//!   AR@1/10/100, per-class AP) that agrees with pycocotools' `COCOeval`
//!   (`tests/fixtures/gen_coco_eval.py`);
//! - [`coco_json`]: COCO `instances_*.json` ground truth and results-file detections,
//!   validated with errors that name the file and the annotation;
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
//!
//! Evaluating detections:
//!
//! ```
//! use keel_det::coco_eval::{BBox, Category, CocoEval, CocoGt, Detection, GroundTruth};
//! # fn main() -> candle::Result<()> {
//! let gt = CocoGt {
//!     images: vec![1, 2],
//!     categories: vec![Category { id: 1, name: "circle".into() }],
//!     annotations: vec![
//!         GroundTruth::new(1, 1, 1, BBox::new(10.0, 10.0, 50.0, 40.0)),
//!         GroundTruth::new(2, 2, 1, BBox::new(0.0, 0.0, 20.0, 20.0)),
//!     ],
//! };
//! let dets = vec![
//!     // A perfect hit on image 1, a miss (IoU 0) on image 2.
//!     Detection { image_id: 1, category_id: 1, bbox: BBox::new(10.0, 10.0, 50.0, 40.0), score: 0.9 },
//!     Detection { image_id: 2, category_id: 1, bbox: BBox::from_xyxy(40.0, 40.0, 60.0, 60.0), score: 0.8 },
//! ];
//! let eval = CocoEval::evaluate(&gt, &dets)?;
//! let stats = eval.stats();
//! // One of two objects found at every IoU threshold, by the top-scoring detection:
//! // precision 1 up to recall 0.5 (51 of the 101 recall points), 0 after.
//! assert!((stats.ap - 51.0 / 101.0).abs() < 1e-12);
//! assert_eq!(stats.ar100, 0.5);
//! assert_eq!(eval.per_class()[0].ap50, Some(stats.ap50));
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod boxes;
pub mod coco_eval;
pub mod coco_json;
mod coco_stats;
mod coco_types;
pub mod fcos;
pub mod losses;
pub mod nms;
mod sort;
