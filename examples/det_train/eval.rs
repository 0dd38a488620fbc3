//! Validation: FCOS inference on the val split and keel-det's COCO evaluation (mAP@[.5:.95],
//! mAP@.5, per-class AP, pycocotools' summary text).
use candle::{DType, Device};
use candle_nn::VarMap;
use keel::data::{det_eval_batches, DetSource};
use keel::det::coco_eval::{BBox, Category, CocoEval, CocoGt, Detection, GroundTruth};
use keel::det::fcos::{fcos_detections, FcosInferenceConfig};
use serde::Serialize;

use super::cli::DetConfig;
use super::data::{augment, PAD};
use super::model::{FcosNet, STRIDES};

/// One evaluation: the numbers, the per-class APs and the summary text.
#[derive(Clone, Debug, Serialize)]
pub struct DetMetrics {
    /// mAP @[.5:.95].
    #[serde(with = "keel::train::lossless_f64")]
    pub map: f64,
    /// mAP @.5.
    #[serde(with = "keel::train::lossless_f64")]
    pub map50: f64,
    /// All 12 COCO numbers.
    pub stats: [f64; 12],
    /// Per class: (name, AP, AP50); `None` for a class without ground truth.
    pub per_class: Vec<(String, Option<f64>, Option<f64>)>,
    /// pycocotools' `summarize()` text.
    #[serde(skip)]
    pub summary: String,
}

impl DetMetrics {
    /// The metrics of non-finite weights: NaN (never the best).
    pub fn nan(classes: &[String]) -> Self {
        Self {
            map: f64::NAN,
            map50: f64::NAN,
            stats: [f64::NAN; 12],
            per_class: classes.iter().map(|c| (c.clone(), None, None)).collect(),
            summary: String::new(),
        }
    }
}

/// The val split's ground truth (image ids = indices, category ids = class ids + 1;
/// ignored objects, VOC `difficult` / COCO crowd, neither count nor cost).
pub fn ground_truth(
    val: &dyn DetSource,
    cfg: &DetConfig,
    classes: &[String],
) -> candle::Result<CocoGt> {
    let mut gt = CocoGt {
        images: (0..val.len() as u64).collect(),
        categories: classes
            .iter()
            .enumerate()
            .map(|(i, n)| Category {
                id: i as u64 + 1,
                name: n.clone(),
            })
            .collect(),
        annotations: vec![],
    };
    let aug = augment(cfg, false);
    for i in 0..val.len() {
        let s = val.load(i, &aug, None)?;
        for ((b, &c), &ign) in s.boxes.iter().zip(&s.classes).zip(&s.ignore) {
            let id = gt.annotations.len() as u64 + 1;
            let bbox = BBox::from_xyxy(b[0] as f64, b[1] as f64, b[2] as f64, b[3] as f64);
            let mut g = GroundTruth::new(id, i as u64, c as u64 + 1, bbox);
            g.ignore = ign;
            gt.annotations.push(g);
        }
    }
    Ok(gt)
}

/// Evaluates `net` (built from `vm`, run in the config's compute dtype) on `val`, whose
/// ground truth is `gt` (from [`ground_truth`]).
pub fn evaluate(
    net: &FcosNet,
    vm: &VarMap,
    cfg: &DetConfig,
    val: &dyn DetSource,
    gt: &CocoGt,
    dev: &Device,
) -> candle::Result<DetMetrics> {
    let model = cfg.model(gt.categories.len());
    let dtype: DType = cfg.train.amp.compute_dtype();
    let mut dets = vec![];
    for b in det_eval_batches(val, augment(cfg, false), PAD, cfg.batch_size.max(8)) {
        let (first, hb) = b?;
        let batch = hb.to_tensors(dev)?;
        let out = net.forward_in(&model, vm, &batch.images, dtype, false)?;
        let sizes: Vec<(f32, f32)> = hb
            .sizes
            .iter()
            .map(|&(h, w)| (w as f32, h as f32))
            .collect();
        let per_image = fcos_detections(&out, &STRIDES, &sizes, &FcosInferenceConfig::default())?;
        for (k, d) in per_image.into_iter().enumerate() {
            for ((b, &s), &c) in d.boxes.iter().zip(&d.scores).zip(&d.classes) {
                dets.push(Detection {
                    image_id: (first + k) as u64,
                    category_id: c as u64 + 1,
                    bbox: BBox::from_xyxy(b[0] as f64, b[1] as f64, b[2] as f64, b[3] as f64),
                    score: s as f64,
                });
            }
        }
    }
    let eval = CocoEval::evaluate(gt, &dets)?;
    let stats = eval.stats();
    Ok(DetMetrics {
        map: stats.ap,
        map50: stats.ap50,
        stats: stats.to_array(),
        per_class: eval
            .per_class()
            .into_iter()
            .map(|c| (c.name, c.ap, c.ap50))
            .collect(),
        summary: stats.to_string(),
    })
}
