//! COCO JSON detection for training: `instances_*.json` plus an image folder.
//!
//! Category ids (sparse in COCO: 1..90 for 80 classes) are remapped to contiguous ids in
//! increasing id order; `bbox` `[x, y, w, h]` (continuous pixel coordinates) becomes
//! `[x, y, x + w, y + h]`; `iscrowd = 1` annotations are kept with `ignore = true`.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle::bail;
use serde::Deserialize;

use crate::det::{check_objects, read_image, RawObject};
use crate::{DetSample, DetSource};

#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    #[serde(default)]
    annotations: Vec<CocoAnn>,
    categories: Vec<CocoCat>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
    width: u32,
    height: u32,
}

#[derive(Deserialize, Clone)]
struct CocoAnn {
    id: u64,
    image_id: u64,
    category_id: u64,
    bbox: Vec<f32>,
    #[serde(default)]
    iscrowd: u8,
}

#[derive(Deserialize)]
struct CocoCat {
    id: u64,
    name: String,
}

/// A COCO detection set: images in JSON order, each with its annotations.
pub struct CocoDet {
    json: PathBuf,
    images: Vec<(PathBuf, (u32, u32), Vec<CocoAnn>)>,
    category_ids: Vec<u64>,
    names: Vec<String>,
}

impl CocoDet {
    /// Reads `json` (an `instances_*.json`) with images under `image_dir`. Fails on
    /// malformed JSON, duplicate ids and annotations of unknown images (all listed);
    /// per-image problems are left to [`DetSource::problems`] / [`crate::validate_det`].
    pub fn open(json: &Path, image_dir: &Path) -> candle::Result<Self> {
        let text = std::fs::read_to_string(json).map_err(|e| {
            candle::Error::Msg(format!("CocoDet::open: reading {}: {e}", json.display()))
        })?;
        let file: CocoFile = serde_json::from_str(&text).map_err(|e| {
            candle::Error::Msg(format!(
                "{}: malformed COCO JSON: {e}; expected {{\"images\": [{{id, file_name, width, height}}], \"annotations\": [{{id, image_id, category_id, bbox}}], \"categories\": [{{id, name}}]}}",
                json.display()
            ))
        })?;
        let mut cats: Vec<(u64, String)> = file
            .categories
            .into_iter()
            .map(|c| (c.id, c.name))
            .collect();
        cats.sort_by_key(|c| c.0);
        let mut errors = Vec::new();
        if cats.windows(2).any(|w| w[0].0 == w[1].0) {
            errors.push("duplicate category ids".to_string());
        }
        let mut index = HashMap::new();
        let mut images = Vec::with_capacity(file.images.len());
        for img in file.images {
            if index.insert(img.id, images.len()).is_some() {
                errors.push(format!("image id {} appears twice", img.id));
            }
            images.push((
                image_dir.join(&img.file_name),
                (img.width, img.height),
                Vec::new(),
            ));
        }
        for a in file.annotations {
            match index.get(&a.image_id) {
                Some(&i) => images[i].2.push(a),
                None => errors.push(format!(
                    "annotation id {}: image_id {} is not in \"images\"",
                    a.id, a.image_id
                )),
            }
        }
        if !errors.is_empty() {
            bail!("{}: {}; fix the file", json.display(), errors.join("; "))
        }
        Ok(Self {
            json: json.to_path_buf(),
            images,
            category_ids: cats.iter().map(|c| c.0).collect(),
            names: cats.into_iter().map(|c| c.1).collect(),
        })
    }

    /// The COCO category id of each contiguous class id.
    pub fn category_ids(&self) -> &[u64] {
        &self.category_ids
    }

    /// Reads image `idx`: the sample when nothing is wrong, and every problem found.
    fn read_sample(&self, idx: usize) -> (Option<DetSample>, Vec<String>) {
        let Some((path, size, anns)) = self.images.get(idx) else {
            let n = self.images.len();
            return (
                None,
                vec![format!(
                    "CocoDet: image {idx} is out of range (the set has {n})"
                )],
            );
        };
        let mut problems = Vec::new();
        let file = self.json.display().to_string();
        let image = read_image(path).map_err(|e| problems.push(e)).ok();
        if let Some(im) = &image {
            if im.dimensions() != *size {
                problems.push(format!(
                    "{file}: image {} is {}x{} in the JSON but {}x{} on disk",
                    path.display(),
                    size.0,
                    size.1,
                    im.width(),
                    im.height()
                ));
            }
        }
        let mut objects = Vec::with_capacity(anns.len());
        for a in anns {
            let label = format!("annotation id {} (image {})", a.id, path.display());
            let class = self
                .category_ids
                .binary_search(&a.category_id)
                .ok()
                .map(|c| c as u32);
            if class.is_none() {
                problems.push(format!(
                    "{file}: {label}: category_id {} is not in \"categories\"",
                    a.category_id
                ));
            }
            let &[x, y, w, h] = a.bbox.as_slice() else {
                problems.push(format!(
                    "{file}: {label}: bbox has {} numbers, expected [x, y, width, height]",
                    a.bbox.len()
                ));
                continue;
            };
            objects.push(RawObject {
                label,
                bbox: [x, y, x + w, y + h],
                class,
                ignore: a.iscrowd != 0,
            });
        }
        let (boxes, classes, ignore) =
            check_objects(&file, objects, *size, self.names.len(), &mut problems);
        match image {
            Some(image) if problems.is_empty() => (
                Some(DetSample {
                    image,
                    boxes,
                    classes,
                    ignore,
                }),
                problems,
            ),
            _ => (None, problems),
        }
    }
}

impl DetSource for CocoDet {
    fn len(&self) -> usize {
        self.images.len()
    }

    fn class_names(&self) -> &[String] {
        &self.names
    }

    fn read(&self, idx: usize) -> (Option<DetSample>, Vec<String>) {
        self.read_sample(idx)
    }
}
