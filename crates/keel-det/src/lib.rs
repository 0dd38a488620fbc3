//! # keel-det: detection for keel
//!
//! - [`coco_eval`]: COCO-style bounding-box mAP (AP @[.50:.95], AP50, AP75, per-size AP,
//!   AR@1/10/100, per-class AP) that agrees with pycocotools' `COCOeval`.
//! - [`coco_json`]: COCO `instances_*.json` ground truth and results-file detections,
//!   validated with errors that name the file and the annotation.
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

pub mod coco_eval;
pub mod coco_json;
mod coco_stats;
mod coco_types;
