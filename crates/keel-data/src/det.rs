//! Detection samples (an image with boxes and class ids), the [`DetSource`] trait every
//! detection set implements, box-exact augmentation (resize, horizontal flip), up-front
//! validation ([`validate_det`]) and the collate that pads a batch and keeps per-image box
//! lists.
//!
//! Box convention (the one of COCO, detectron2 and torchvision): `[x1, y1, x2, y2]` in
//! continuous pixel coordinates, 0-based, where pixel `(i, j)` covers `[i, i+1) x [j, j+1)`;
//! a box over pixels `0..=9` of a row is `[0, .., 10, ..]`, width 10. Valid boxes satisfy
//! `0 <= x1 < x2 <= width` and `0 <= y1 < y2 <= height`.
use std::sync::atomic::{AtomicUsize, Ordering};

use candle::{bail, Device, Tensor};
use image::imageops::{self, FilterType};
use image::RgbImage;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::check::listed_error;
use crate::sample::{MEAN, STD};

/// One detection sample: an RGB image and its objects.
#[derive(Clone, Debug)]
pub struct DetSample {
    /// The image.
    pub image: RgbImage,
    /// One `[x1, y1, x2, y2]` box per object (see the module docs for the convention).
    pub boxes: Vec<[f32; 4]>,
    /// The contiguous class id of every object (`0..num_classes`).
    pub classes: Vec<u32>,
    /// Objects that training may skip and evaluation ignores: VOC `difficult`, COCO
    /// `iscrowd`.
    pub ignore: Vec<bool>,
}

impl DetSample {
    /// The sample at `w x h`: the image resized bilinearly (triangle filter), each box
    /// scaled by `(w / width, h / height)` exactly, then clipped (see
    /// [`DetSample::clip_and_drop`]).
    ///
    /// # Errors
    /// `boxes`, `classes` and `ignore` of different lengths (see [`DetSample::check`]).
    pub fn resized(&self, w: u32, h: u32) -> candle::Result<DetSample> {
        self.check("DetSample::resized")?;
        let (ow, oh) = self.image.dimensions();
        let (fx, fy) = (w as f32 / ow as f32, h as f32 / oh as f32);
        let mut out = DetSample {
            image: imageops::resize(&self.image, w, h, FilterType::Triangle),
            boxes: self
                .boxes
                .iter()
                .map(|b| [b[0] * fx, b[1] * fy, b[2] * fx, b[3] * fy])
                .collect(),
            classes: self.classes.clone(),
            ignore: self.ignore.clone(),
        };
        out.clip_and_drop()?;
        Ok(out)
    }

    /// Checks that every box has a class and an ignore flag (the fields are public, so a
    /// caller can build a sample whose lists disagree); the error names `op` and the lengths.
    pub fn check(&self, op: &str) -> candle::Result<()> {
        let (b, c, i) = (self.boxes.len(), self.classes.len(), self.ignore.len());
        if b != c || b != i {
            candle::bail!("{op}: a sample needs one class and one ignore flag per box, got {b} boxes, {c} classes and {i} ignore flags")
        }
        Ok(())
    }

    /// Mirrors the image left-right; a box `[x1, y1, x2, y2]` becomes
    /// `[W - x2, y1, W - x1, y2]`.
    pub fn flip_horizontal(&mut self) {
        imageops::flip_horizontal_in_place(&mut self.image);
        let w = self.image.width() as f32;
        for b in &mut self.boxes {
            *b = [w - b[2], b[1], w - b[0], b[3]];
        }
    }

    /// Clips every box to the image and drops the boxes left with no area (with their
    /// class and ignore flag).
    ///
    /// # Errors
    /// `boxes`, `classes` and `ignore` of different lengths (see [`DetSample::check`]).
    pub fn clip_and_drop(&mut self) -> candle::Result<()> {
        self.check("DetSample::clip_and_drop")?;
        let (w, h) = (self.image.width() as f32, self.image.height() as f32);
        let mut keep = 0;
        for k in 0..self.boxes.len() {
            let b = self.boxes[k];
            let c = [
                b[0].clamp(0.0, w),
                b[1].clamp(0.0, h),
                b[2].clamp(0.0, w),
                b[3].clamp(0.0, h),
            ];
            if c[2] > c[0] && c[3] > c[1] {
                self.boxes[keep] = c;
                self.classes[keep] = self.classes[k];
                self.ignore[keep] = self.ignore[k];
                keep += 1;
            }
        }
        self.boxes.truncate(keep);
        self.classes.truncate(keep);
        self.ignore.truncate(keep);
        Ok(())
    }
}

/// How [`DetAugment`] resizes a sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Resize {
    /// Keep the sample's size.
    None,
    /// Exactly `width x height` (aspect ratio not kept).
    Fixed {
        /// Output width in pixels.
        width: u32,
        /// Output height in pixels.
        height: u32,
    },
    /// Shorter side = `size`, unless the longer side would then exceed `max_size`, in
    /// which case longer side = `max_size` (detectron2's `ResizeShortestEdge`); sides are
    /// rounded to whole pixels, at least 1.
    ShorterSide {
        /// Target of the shorter side.
        size: u32,
        /// Cap on the longer side.
        max_size: u32,
    },
}

impl Resize {
    /// The output `(width, height)` for an input of `w x h`.
    pub fn target(&self, w: u32, h: u32) -> candle::Result<(u32, u32)> {
        match *self {
            Resize::None => Ok((w, h)),
            Resize::Fixed { width, height } => {
                if width == 0 || height == 0 {
                    bail!("Resize::Fixed: {width}x{height} has a zero side; use a positive width and height")
                }
                Ok((width, height))
            }
            Resize::ShorterSide { size, max_size } => {
                if size == 0 || max_size < size {
                    bail!("Resize::ShorterSide: size {size}, max_size {max_size}: need 0 < size <= max_size")
                }
                let mut f = size as f64 / w.min(h) as f64;
                if w.max(h) as f64 * f > max_size as f64 {
                    f = max_size as f64 / w.max(h) as f64;
                }
                let side = |v: u32| ((v as f64 * f).round() as u32).max(1);
                Ok((side(w), side(h)))
            }
        }
    }
}

/// Training / evaluation transform of a detection sample: a resize, then (training only) a
/// horizontal flip with probability 1/2. Boxes follow the image exactly, are clipped to it,
/// and boxes left empty are dropped.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DetAugment {
    /// The resize.
    pub resize: Resize,
    /// Whether training flips (evaluation never does).
    pub flip: bool,
}

impl DetAugment {
    /// `sample` transformed; `aug` = the augmentation RNG (training) or `None` (evaluation:
    /// resize only).
    pub fn apply(
        &self,
        sample: &DetSample,
        aug: Option<&mut ChaCha8Rng>,
    ) -> candle::Result<DetSample> {
        let (w, h) = sample.image.dimensions();
        let (nw, nh) = self.resize.target(w, h)?;
        let mut out = if (nw, nh) == (w, h) {
            let mut s = sample.clone();
            s.clip_and_drop()?;
            s
        } else {
            sample.resized(nw, nh)?
        };
        if let Some(rng) = aug {
            if self.flip && rng.random_bool(0.5) {
                out.flip_horizontal();
            }
        }
        Ok(out)
    }
}

/// A detection set that can be decoded by index and checked up front.
pub trait DetSource: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether the set has no sample.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Class names, index = contiguous class id.
    fn class_names(&self) -> &[String];
    /// Reads sample `idx` once: the sample at its original size when it is good, and
    /// everything wrong with it, one line each, naming the file and the annotation
    /// (malformed annotation files, missing or undecodable images, boxes outside the image or
    /// without area, unknown classes). The one method a source implements for
    /// [`DetSource::decode`] and [`DetSource::problems`].
    fn read(&self, idx: usize) -> (Option<DetSample>, Vec<String>);
    /// Sample `idx` at its original size; fails (naming the file and the annotation) where
    /// [`DetSource::problems`] reports anything.
    fn decode(&self, idx: usize) -> candle::Result<DetSample> {
        match self.read(idx) {
            (Some(s), _) => Ok(s),
            (None, p) => Err(problems_error(p)),
        }
    }
    /// Everything wrong with sample `idx` (see [`DetSource::read`]); empty when it is good.
    fn problems(&self, idx: usize) -> Vec<String> {
        self.read(idx).1
    }
    /// Sample `idx` decoded and transformed by `augment` (see [`DetAugment::apply`]).
    fn load(
        &self,
        idx: usize,
        augment: &DetAugment,
        aug: Option<&mut ChaCha8Rng>,
    ) -> candle::Result<DetSample> {
        augment.apply(&self.decode(idx)?, aug)
    }
}

/// Checks every sample of `sets` in parallel (`progress` is called once per sample) and
/// fails with one error listing every problem (the first [`crate::MAX_LISTED`], then a
/// count of the rest) when any sample is bad.
pub fn validate_det(
    sets: &[&dyn DetSource],
    progress: Option<&(dyn Fn() + Sync)>,
) -> candle::Result<()> {
    let checked = AtomicUsize::new(0);
    let bad: Vec<Vec<String>> = sets
        .iter()
        .flat_map(|s| {
            (0..s.len())
                .into_par_iter()
                .map(|i| {
                    let p = s.problems(i);
                    checked.fetch_add(1, Ordering::Relaxed);
                    if let Some(f) = progress {
                        f();
                    }
                    p
                })
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
        })
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    let reasons: Vec<&str> = bad.iter().flatten().map(String::as_str).collect();
    Err(listed_error(
        "detection validation",
        bad.len(),
        &reasons,
        checked.into_inner(),
    ))
}

/// One object as read from an annotation file, before checking.
pub(crate) struct RawObject {
    /// How the annotation is named in messages (`object 3 'dog'`, `annotation id 17`).
    pub label: String,
    /// The box, converted to the module's convention.
    pub bbox: [f32; 4],
    /// The contiguous class id, `None` when the class is unknown (already reported).
    pub class: Option<u32>,
    /// Difficult / crowd.
    pub ignore: bool,
}

/// Checks `objects` against a `w x h` image and `num_classes`, returning the good ones as
/// `(boxes, classes, ignore)` and one problem line per bad one (prefixed by `file`).
pub(crate) fn check_objects(
    file: &str,
    objects: Vec<RawObject>,
    (w, h): (u32, u32),
    num_classes: usize,
    problems: &mut Vec<String>,
) -> (Vec<[f32; 4]>, Vec<u32>, Vec<bool>) {
    let (fw, fh) = (w as f32, h as f32);
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for o in objects {
        let b = o.bbox;
        let fail = |what: String| format!("{file}: {}: {what}", o.label);
        if !b.iter().all(|v| v.is_finite()) {
            problems.push(fail(format!("box {b:?} has a non-finite coordinate")));
            continue;
        }
        if b[2] <= b[0] || b[3] <= b[1] {
            problems.push(fail(format!(
                "box [x1, y1, x2, y2] = {b:?} has zero or negative area; fix or remove the annotation"
            )));
            continue;
        }
        if b[0] < 0.0 || b[1] < 0.0 || b[2] > fw || b[3] > fh {
            problems.push(fail(format!(
                "box [x1, y1, x2, y2] = {b:?} lies outside the {w}x{h} image; fix the coordinates or the image size"
            )));
            continue;
        }
        match o.class {
            Some(c) if (c as usize) < num_classes => {
                out.0.push(b);
                out.1.push(c);
                out.2.push(o.ignore);
            }
            Some(c) => problems.push(fail(format!(
                "class id {c} is out of range (the set has {num_classes} classes)"
            ))),
            None => {}
        }
    }
    out
}

/// Decodes an image in full (a truncated file fails), naming it.
pub(crate) fn read_image(path: &std::path::Path) -> Result<RgbImage, String> {
    if !path.is_file() {
        return Err(format!("{}: the image file is missing", path.display()));
    }
    image::open(path)
        .map(|i| i.to_rgb8())
        .map_err(|e| format!("{}: cannot decode the image: {e}", path.display()))
}

/// A sample's problems as one error (for `decode`).
pub(crate) fn problems_error(problems: Vec<String>) -> candle::Error {
    candle::Error::Msg(problems.join("\n"))
}

/// How [`DetHostBatch::collate`] pads images to one size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pad {
    /// To the largest height and the largest width of the batch.
    ToMax,
    /// To exactly `width x height` (every image must fit).
    Fixed {
        /// Padded width.
        width: usize,
        /// Padded height.
        height: usize,
    },
}

/// A detection batch on the host: normalized images padded to one size (padding at the
/// right and bottom, value 0 after normalization, i.e. the mean colour) and the per-image
/// objects.
#[derive(Clone, Debug)]
pub struct DetHostBatch {
    /// Number of images.
    pub n: usize,
    /// Padded height.
    pub height: usize,
    /// Padded width.
    pub width: usize,
    /// `n * 3 * height * width` values, CHW per image: `(pixel / 255 - mean) / std`
    /// (ImageNet statistics, as the segmentation batches).
    pub images: Vec<f32>,
    /// `(height, width)` of each image before padding.
    pub sizes: Vec<(usize, usize)>,
    /// Boxes of each image (unchanged by padding: it is at the right and bottom).
    pub boxes: Vec<Vec<[f32; 4]>>,
    /// Class ids of each image.
    pub classes: Vec<Vec<u32>>,
    /// Ignore flags of each image.
    pub ignore: Vec<Vec<bool>>,
}

/// A detection batch on a device.
#[derive(Clone, Debug)]
pub struct DetBatch {
    /// `(n, 3, height, width)` f32.
    pub images: Tensor,
    /// Per image, `(N_i, 4)` f32 boxes (`N_i` may be 0).
    pub boxes: Vec<Tensor>,
    /// Per image, `(N_i,)` u32 class ids.
    pub classes: Vec<Tensor>,
    /// Per image, `(N_i,)` u8 ignore flags (1 = difficult / crowd).
    pub ignore: Vec<Tensor>,
}

impl DetHostBatch {
    /// Normalizes, pads and stacks `samples`.
    pub fn collate(samples: &[DetSample], pad: Pad) -> candle::Result<Self> {
        if samples.is_empty() {
            bail!("DetHostBatch::collate: no samples; pass at least one")
        }
        let max_h = samples.iter().map(|s| s.image.height()).max().unwrap_or(0) as usize;
        let max_w = samples.iter().map(|s| s.image.width()).max().unwrap_or(0) as usize;
        let (height, width) = match pad {
            Pad::ToMax => (max_h, max_w),
            Pad::Fixed { width, height } => {
                if max_w > width || max_h > height {
                    bail!("DetHostBatch::collate: an image of the batch is {max_w}x{max_h} (w x h), larger than Pad::Fixed {width}x{height}; resize first or use Pad::ToMax")
                }
                (height, width)
            }
        };
        let plane = height * width;
        let mut images = vec![0f32; samples.len() * 3 * plane];
        for (k, s) in samples.iter().enumerate() {
            let w = s.image.width() as usize;
            for (i, p) in s.image.pixels().enumerate() {
                let (y, x) = (i / w, i % w);
                for c in 0..3 {
                    images[(k * 3 + c) * plane + y * width + x] =
                        (p.0[c] as f32 / 255.0 - MEAN[c]) / STD[c];
                }
            }
        }
        Ok(Self {
            n: samples.len(),
            height,
            width,
            images,
            sizes: samples
                .iter()
                .map(|s| (s.image.height() as usize, s.image.width() as usize))
                .collect(),
            boxes: samples.iter().map(|s| s.boxes.clone()).collect(),
            classes: samples.iter().map(|s| s.classes.clone()).collect(),
            ignore: samples.iter().map(|s| s.ignore.clone()).collect(),
        })
    }

    /// The batch as tensors on `dev`.
    pub fn to_tensors(&self, dev: &Device) -> candle::Result<DetBatch> {
        let lists = [self.boxes.len(), self.classes.len(), self.ignore.len()];
        if lists.iter().any(|&l| l != self.n) {
            candle::bail!("DetHostBatch::to_tensors: n is {} but there are {} box lists, {} class lists and {} ignore lists; build the batch with DetHostBatch::collate", self.n, lists[0], lists[1], lists[2])
        }
        for k in 0..self.n {
            let (b, c, i) = (
                self.boxes[k].len(),
                self.classes[k].len(),
                self.ignore[k].len(),
            );
            if b != c || b != i {
                candle::bail!("DetHostBatch::to_tensors: image {k} has {b} boxes, {c} classes and {i} ignore flags; one of each per box")
            }
        }
        let images = Tensor::from_slice(&self.images, (self.n, 3, self.height, self.width), dev)?;
        let mut out = DetBatch {
            images,
            boxes: Vec::with_capacity(self.n),
            classes: Vec::with_capacity(self.n),
            ignore: Vec::with_capacity(self.n),
        };
        for k in 0..self.n {
            let nb = self.boxes[k].len();
            let flat: Vec<f32> = self.boxes[k].iter().flatten().copied().collect();
            out.boxes.push(Tensor::from_vec(flat, (nb, 4), dev)?);
            out.classes
                .push(Tensor::from_slice(&self.classes[k], nb, dev)?);
            let ig: Vec<u8> = self.ignore[k].iter().map(|&b| b as u8).collect();
            out.ignore.push(Tensor::from_vec(ig, nb, dev)?);
        }
        Ok(out)
    }
}
