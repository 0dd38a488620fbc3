//! The data [`crate::coco_eval`] evaluates: boxes, ground truth, detections, categories,
//! and their validation (ids known and unique, boxes finite with non-negative size), whose
//! errors name the origin (a file), the annotation and the fix. Re-exported from
//! `coco_eval`.

use std::collections::HashMap;

use candle::{bail, Result};

/// A box in COCO's layout: top-left corner `(x, y)`, `w`idth and `h`eight, in pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BBox {
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width (`>= 0`).
    pub w: f64,
    /// Height (`>= 0`).
    pub h: f64,
}

impl BBox {
    /// A box from COCO's `[x, y, width, height]`.
    pub fn new(x: f64, y: f64, w: f64, h: f64) -> BBox {
        BBox { x, y, w, h }
    }

    /// A box from corners `(x1, y1)`, `(x2, y2)` (the layout of detector outputs and NMS).
    pub fn from_xyxy(x1: f64, y1: f64, x2: f64, y2: f64) -> BBox {
        BBox {
            x: x1,
            y: y1,
            w: x2 - x1,
            h: y2 - y1,
        }
    }

    /// The corners `[x1, y1, x2, y2]`.
    pub fn xyxy(&self) -> [f64; 4] {
        [self.x, self.y, self.x + self.w, self.y + self.h]
    }

    /// `w * h`, the area pycocotools gives a detection.
    pub fn area(&self) -> f64 {
        self.w * self.h
    }

    /// `None` when the box is usable, else why not (non-finite or negative size).
    fn problem(&self) -> Option<String> {
        let [x, y, w, h] = [self.x, self.y, self.w, self.h];
        if ![x, y, w, h].iter().all(|v| v.is_finite()) {
            return Some(format!("bbox [{x}, {y}, {w}, {h}] is not finite"));
        }
        if w < 0.0 || h < 0.0 {
            return Some(format!(
                "bbox [{x}, {y}, {w}, {h}] has a negative size; COCO boxes are [x, y, width, height], \
                 convert [x1, y1, x2, y2] with BBox::from_xyxy"
            ));
        }
        None
    }
}

/// One ground-truth object.
#[derive(Clone, Debug, PartialEq)]
pub struct GroundTruth {
    /// Annotation id (unique in a [`CocoGt`]; errors name it).
    pub id: u64,
    /// The image it belongs to (one of [`CocoGt::images`]).
    pub image_id: u64,
    /// Its category (one of [`CocoGt::categories`]).
    pub category_id: u64,
    /// The box.
    pub bbox: BBox,
    /// The area the size classes use: COCO's `area` field (the mask's area for COCO
    /// itself), `bbox.area()` when a set has no masks.
    pub area: f64,
    /// A crowd region: ignored, IoU over the detection's area, matched many times.
    pub iscrowd: bool,
    /// Ignored without being a crowd (Pascal VOC's `difficult`): a detection matching it
    /// neither counts nor costs. The JSON loader leaves it `false`, as pycocotools does.
    pub ignore: bool,
}

impl GroundTruth {
    /// A plain object: `area = bbox.area()`, not crowd, not ignored.
    pub fn new(id: u64, image_id: u64, category_id: u64, bbox: BBox) -> GroundTruth {
        GroundTruth {
            id,
            image_id,
            category_id,
            bbox,
            area: bbox.area(),
            iscrowd: false,
            ignore: false,
        }
    }
}

/// One detection (a line of a COCO results file).
#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    /// The image (one of [`CocoGt::images`]).
    pub image_id: u64,
    /// The predicted category (one of [`CocoGt::categories`]).
    pub category_id: u64,
    /// The box.
    pub bbox: BBox,
    /// Confidence; higher first.
    pub score: f64,
}

/// A category: COCO's id and its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Category {
    /// Category id (COCO's are not contiguous).
    pub id: u64,
    /// Display name.
    pub name: String,
}

/// A ground-truth set: the images evaluated (an image without objects still counts: its
/// detections are false positives), the categories and the objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CocoGt {
    /// Image ids.
    pub images: Vec<u64>,
    /// Categories (per-class results come in ascending id).
    pub categories: Vec<Category>,
    /// Objects.
    pub annotations: Vec<GroundTruth>,
}

impl CocoGt {
    /// Checks ids and boxes: unique image, category and annotation ids, annotations on
    /// known images and categories, finite boxes of non-negative size, finite
    /// non-negative areas. `origin` (a file name, or a short description) starts every
    /// message.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let images = unique_ids(origin, "image", self.images.iter().copied())?;
        let cats = unique_ids(origin, "category", self.categories.iter().map(|c| c.id))?;
        unique_ids(origin, "annotation", self.annotations.iter().map(|a| a.id))?;
        for (i, a) in self.annotations.iter().enumerate() {
            let what = format!("{origin}: annotation #{i} (id {})", a.id);
            if !images.contains_key(&a.image_id) {
                bail!("{what}: image_id {} is not in the images list; add the image or drop the annotation", a.image_id)
            }
            if !cats.contains_key(&a.category_id) {
                bail!(
                    "{what}: category_id {} is not in the categories list; add the category or drop the annotation",
                    a.category_id
                )
            }
            if let Some(p) = a.bbox.problem() {
                bail!("{what}: {p}")
            }
            if !(a.area.is_finite() && a.area >= 0.0) {
                bail!(
                    "{what}: area {} must be finite and >= 0; use bbox w * h when there is no mask",
                    a.area
                )
            }
        }
        Ok(())
    }

    /// Checks detections against this set: known image and category, finite box of
    /// non-negative size, finite score. `origin` starts every message.
    pub fn validate_detections(&self, dets: &[Detection], origin: &str) -> Result<()> {
        let images: HashMap<u64, usize> = index_of(self.images.iter().copied());
        let cats: HashMap<u64, usize> = index_of(self.categories.iter().map(|c| c.id));
        for (i, d) in dets.iter().enumerate() {
            let what = format!("{origin}: detection #{i}");
            if !images.contains_key(&d.image_id) {
                bail!(
                    "{what}: image_id {} is not an image of the ground truth; evaluate detections of the same split",
                    d.image_id
                )
            }
            if !cats.contains_key(&d.category_id) {
                bail!(
                    "{what}: category_id {} is not a category of the ground truth; map the model's class index to the COCO id",
                    d.category_id
                )
            }
            if let Some(p) = d.bbox.problem() {
                bail!("{what}: {p}")
            }
            if !d.score.is_finite() {
                bail!("{what}: score {} is not finite", d.score)
            }
        }
        Ok(())
    }
}

fn index_of(ids: impl Iterator<Item = u64>) -> HashMap<u64, usize> {
    ids.enumerate().map(|(i, id)| (id, i)).collect()
}

fn unique_ids(
    origin: &str,
    what: &str,
    ids: impl Iterator<Item = u64>,
) -> Result<HashMap<u64, usize>> {
    let mut seen = HashMap::new();
    for (i, id) in ids.enumerate() {
        if let Some(first) = seen.insert(id, i) {
            bail!("{origin}: {what} id {id} appears twice (#{first} and #{i}); ids must be unique")
        }
    }
    Ok(seen)
}
