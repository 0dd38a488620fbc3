//! COCO JSON files for [`crate::coco_eval`]: ground truth (`instances_*.json`: `images`,
//! `categories`, `annotations`) and detections (the results format: a list of
//! `{image_id, category_id, bbox, score}`), read with serde and validated, with errors
//! that name the file and the annotation; and the results writer.
//!
//! Reference: the COCO data format (cocodataset.org/#format-data) and pycocotools'
//! `COCO` / `COCO.loadRes`, whose reading this follows:
//!
//! - An annotation's `area` is read as is (COCO's mask area); when a file has none the
//!   box's `w * h` is used (pycocotools would fail). `iscrowd` is 0/1 or a boolean,
//!   absent meaning 0.
//! - The annotation key `ignore` is *not* read: pycocotools' `COCOeval` overwrites it with
//!   `iscrowd`, so honouring it would disagree with pycocotools. Set
//!   [`GroundTruth::ignore`] in code to ignore objects (Pascal VOC's `difficult`).
//! - A detection's area is its box's `w * h`; an `area` key in a results file is not read
//!   (pycocotools overwrites it too). Results must be boxes: segmentation-only results are
//!   rejected.
//! - Unlike pycocotools, which drops annotations and detections of unknown categories
//!   silently, an unknown image or category id is an error, as are duplicate ids, boxes
//!   that are not four finite numbers of non-negative size, and non-finite scores.

use std::fmt::Display;
use std::path::Path;

use candle::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::coco_eval::{BBox, Category, CocoGt, Detection, GroundTruth};

#[derive(Deserialize)]
struct RawGt {
    images: Vec<Value>,
    categories: Vec<Value>,
    #[serde(default)]
    annotations: Vec<Value>,
}

#[derive(Deserialize)]
struct RawImage {
    id: u64,
}

#[derive(Deserialize)]
struct RawCategory {
    id: u64,
    #[serde(default)]
    name: String,
}

/// `iscrowd` as COCO writes it (0/1) or as some converters do (a boolean).
#[derive(Deserialize)]
#[serde(untagged)]
enum Flag {
    Int(u64),
    Bool(bool),
}

impl Default for Flag {
    fn default() -> Flag {
        Flag::Int(0)
    }
}

#[derive(Deserialize)]
struct RawAnnotation {
    id: u64,
    image_id: u64,
    category_id: u64,
    bbox: Vec<f64>,
    area: Option<f64>,
    #[serde(default)]
    iscrowd: Flag,
}

#[derive(Deserialize, Serialize)]
struct RawDetection {
    image_id: u64,
    category_id: u64,
    bbox: Vec<f64>,
    score: f64,
}

fn read(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        candle::Error::Msg(format!(
            "coco_json: cannot read the {what} file {}: {e}",
            path.display()
        ))
    })
}

/// One element of a JSON list as `T`, the error naming the file, the list, the position
/// and the `id` when the element has one.
fn element<T: for<'de> Deserialize<'de>>(
    origin: &str,
    list: &str,
    i: usize,
    v: Value,
) -> Result<T> {
    let id = v
        .get("id")
        .map(|id| format!(" (id {id})"))
        .unwrap_or_default();
    serde_json::from_value(v)
        .map_err(|e| candle::Error::Msg(format!("{origin}: {list} #{i}{id}: {e}")))
}

fn bbox(origin: impl Display, b: &[f64]) -> Result<BBox> {
    match *b {
        [x, y, w, h] => Ok(BBox::new(x, y, w, h)),
        _ => bail!(
            "{origin}: bbox {b:?} has {} numbers; COCO boxes are [x, y, width, height]",
            b.len()
        ),
    }
}

/// Ground truth from the text of an `instances_*.json` file; `origin` (the file name)
/// starts every error. Validated with [`CocoGt::validate`].
pub fn parse_gt(text: &str, origin: &str) -> Result<CocoGt> {
    let raw: RawGt = serde_json::from_str(text).map_err(|e| {
        candle::Error::Msg(format!(
            "{origin}: not a COCO instances file ({e}); it needs `images`, `categories` and `annotations` lists"
        ))
    })?;
    let images = raw
        .images
        .into_iter()
        .enumerate()
        .map(|(i, v)| element::<RawImage>(origin, "image", i, v).map(|im| im.id))
        .collect::<Result<Vec<_>>>()?;
    let categories = raw
        .categories
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            element::<RawCategory>(origin, "category", i, v).map(|c| Category {
                id: c.id,
                name: c.name,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut annotations = Vec::with_capacity(raw.annotations.len());
    for (i, v) in raw.annotations.into_iter().enumerate() {
        let a: RawAnnotation = element(origin, "annotation", i, v)?;
        let bbox = bbox(
            format_args!("{origin}: annotation #{i} (id {})", a.id),
            &a.bbox,
        )?;
        annotations.push(GroundTruth {
            id: a.id,
            image_id: a.image_id,
            category_id: a.category_id,
            bbox,
            area: a.area.unwrap_or(bbox.area()),
            iscrowd: match a.iscrowd {
                Flag::Int(v) => v != 0,
                Flag::Bool(b) => b,
            },
            ignore: false,
        });
    }
    let gt = CocoGt {
        images,
        categories,
        annotations,
    };
    gt.validate(origin)?;
    Ok(gt)
}

/// Ground truth from an `instances_*.json` file ([`parse_gt`]).
pub fn load_gt(path: impl AsRef<Path>) -> Result<CocoGt> {
    let path = path.as_ref();
    parse_gt(&read(path, "ground-truth")?, &path.display().to_string())
}

/// Detections from the text of a COCO results file, checked against `gt`
/// ([`CocoGt::validate_detections`]); `origin` (the file name) starts every error.
pub fn parse_detections(text: &str, origin: &str, gt: &CocoGt) -> Result<Vec<Detection>> {
    let raw: Vec<Value> = serde_json::from_str(text).map_err(|e| {
        candle::Error::Msg(format!(
            "{origin}: not a COCO results file ({e}); it must be a list of {{image_id, category_id, bbox, score}}"
        ))
    })?;
    let mut dets = Vec::with_capacity(raw.len());
    for (i, v) in raw.into_iter().enumerate() {
        let d: RawDetection = element(origin, "detection", i, v)?;
        let bbox = bbox(format_args!("{origin}: detection #{i}"), &d.bbox)?;
        dets.push(Detection {
            image_id: d.image_id,
            category_id: d.category_id,
            bbox,
            score: d.score,
        });
    }
    gt.validate_detections(&dets, origin)?;
    Ok(dets)
}

/// Detections from a COCO results file ([`parse_detections`]).
pub fn load_detections(path: impl AsRef<Path>, gt: &CocoGt) -> Result<Vec<Detection>> {
    let path = path.as_ref();
    parse_detections(&read(path, "detections")?, &path.display().to_string(), gt)
}

/// Detections as a COCO results file (the text pycocotools' `loadRes` reads).
pub fn detections_to_json(dets: &[Detection]) -> String {
    let raw: Vec<RawDetection> = dets
        .iter()
        .map(|d| RawDetection {
            image_id: d.image_id,
            category_id: d.category_id,
            bbox: vec![d.bbox.x, d.bbox.y, d.bbox.w, d.bbox.h],
            score: d.score,
        })
        .collect();
    serde_json::to_string(&raw).expect("a list of numbers always serialises")
}

/// Writes [`detections_to_json`] to `path`.
pub fn save_detections(path: impl AsRef<Path>, dets: &[Detection]) -> Result<()> {
    let path = path.as_ref();
    std::fs::write(path, detections_to_json(dets)).map_err(|e| {
        candle::Error::Msg(format!(
            "coco_json: cannot write the detections file {}: {e}",
            path.display()
        ))
    })
}
