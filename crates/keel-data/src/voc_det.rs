//! Pascal VOC detection layout: `Annotations/<id>.xml`, `JPEGImages/<id>.jpg`, ids from
//! `ImageSets/Main/<split>.txt`.
//!
//! Coordinates: VOC stores 1-based inclusive pixel indices (`xmin..=xmax`). Following
//! detectron2 (`pascal_voc.py`: `bbox[0] -= 1; bbox[1] -= 1`), a box becomes
//! `[xmin - 1, ymin - 1, xmax, ymax]`: the continuous 0-based box that covers exactly
//! those pixels, the convention of COCO and of [`crate::det`], so a VOC box and the same
//! box in COCO JSON (`[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`) load alike.
//! (Detectron1 also subtracted 1 from `xmax`/`ymax`, the old inclusive convention.)
use std::path::{Path, PathBuf};

use candle::bail;

use crate::det::{check_objects, read_image, RawObject};
use crate::{DetSample, DetSource};

/// The 20 Pascal VOC classes, index = class id.
pub const VOC_CLASSES: [&str; 20] = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
];

/// A Pascal VOC detection split. Objects flagged `<difficult>1</difficult>` are kept with
/// `ignore = true` (VOC evaluation ignores them).
pub struct VocDet {
    items: Vec<(PathBuf, PathBuf)>,
    names: Vec<String>,
}

/// A parsed annotation file: image size and objects (name, 1-based box, difficult).
struct VocXml {
    size: (u32, u32),
    objects: Vec<(String, [f32; 4], bool)>,
}

impl VocDet {
    /// Lists `split` under `root` (`ImageSets/Main/<split>.txt`). Files are read and
    /// checked by [`DetSource::problems`] / [`crate::validate_det`] or when decoded.
    pub fn open(root: &Path, split: &str) -> candle::Result<Self> {
        let list = root.join("ImageSets/Main").join(format!("{split}.txt"));
        let text = std::fs::read_to_string(&list).map_err(|e| {
            candle::Error::Msg(format!(
                "VocDet::open: reading the {split} split list {}: {e} (expected a Pascal VOC layout: Annotations/, JPEGImages/, ImageSets/Main/)",
                list.display()
            ))
        })?;
        let items: Vec<_> = text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(|id| {
                (
                    root.join("JPEGImages").join(format!("{id}.jpg")),
                    root.join("Annotations").join(format!("{id}.xml")),
                )
            })
            .collect();
        if items.is_empty() {
            bail!("{}: the {split} split is empty", list.display())
        }
        Ok(Self {
            items,
            names: VOC_CLASSES.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// The `(image, annotation)` file pairs, in split order.
    pub fn files(&self) -> &[(PathBuf, PathBuf)] {
        &self.items
    }

    /// Reads sample `idx`: the sample when nothing is wrong, and every problem found.
    fn read_sample(&self, idx: usize) -> (Option<DetSample>, Vec<String>) {
        let Some((img_path, xml_path)) = self.items.get(idx) else {
            let n = self.items.len();
            return (
                None,
                vec![format!(
                    "VocDet: sample {idx} is out of range (the split has {n})"
                )],
            );
        };
        let mut problems = Vec::new();
        let xml = parse_xml(xml_path).map_err(|e| problems.push(e)).ok();
        let image = read_image(img_path).map_err(|e| problems.push(e)).ok();
        let (Some(xml), Some(image)) = (xml, image) else {
            return (None, problems);
        };
        if image.dimensions() != xml.size {
            problems.push(format!(
                "{}: <size> says {}x{} but the image {} is {}x{}",
                xml_path.display(),
                xml.size.0,
                xml.size.1,
                img_path.display(),
                image.width(),
                image.height()
            ));
        }
        let file = xml_path.display().to_string();
        let objects = xml
            .objects
            .into_iter()
            .enumerate()
            .map(|(k, (name, b, difficult))| {
                let label = format!("object {k} '{name}'");
                let class = VOC_CLASSES
                    .iter()
                    .position(|c| *c == name)
                    .map(|c| c as u32);
                if class.is_none() {
                    problems.push(format!(
                        "{file}: {label}: unknown class name; use one of the 20 VOC classes ({})",
                        VOC_CLASSES.join(", ")
                    ));
                }
                RawObject {
                    label,
                    bbox: [b[0] - 1.0, b[1] - 1.0, b[2], b[3]],
                    class,
                    ignore: difficult,
                }
            })
            .collect();
        let (boxes, classes, ignore) = check_objects(
            &file,
            objects,
            image.dimensions(),
            VOC_CLASSES.len(),
            &mut problems,
        );
        if !problems.is_empty() {
            return (None, problems);
        }
        (
            Some(DetSample {
                image,
                boxes,
                classes,
                ignore,
            }),
            problems,
        )
    }
}

/// Parses a VOC annotation file, naming the file and the object on failure.
fn parse_xml(path: &Path) -> Result<VocXml, String> {
    let fail = |what: String| format!("{}: {what}", path.display());
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail(format!("cannot read the annotation file: {e}")))?;
    let doc = roxmltree::Document::parse(&text)
        .map_err(|e| fail(format!("malformed XML: {e}; fix or regenerate the file")))?;
    let root = doc.root_element();
    let child = |n: roxmltree::Node, tag: &str| {
        n.children()
            .find(|c| c.has_tag_name(tag))
            .and_then(|c| c.text())
            .map(str::trim)
            .map(String::from)
    };
    let num = |n: roxmltree::Node, tag: &str, what: &str| -> Result<f32, String> {
        let t = child(n, tag).ok_or_else(|| fail(format!("{what}: missing <{tag}>")))?;
        t.parse::<f32>()
            .map_err(|_| fail(format!("{what}: <{tag}> is '{t}', not a number")))
    };
    let size = root
        .children()
        .find(|c| c.has_tag_name("size"))
        .ok_or_else(|| fail("missing <size>".into()))?;
    let (w, h) = (
        num(size, "width", "<size>")?,
        num(size, "height", "<size>")?,
    );
    let mut objects = Vec::new();
    for (k, obj) in root
        .children()
        .filter(|c| c.has_tag_name("object"))
        .enumerate()
    {
        let name = child(obj, "name").ok_or_else(|| fail(format!("object {k}: missing <name>")))?;
        let what = format!("object {k} '{name}'");
        let bb = obj
            .children()
            .find(|c| c.has_tag_name("bndbox"))
            .ok_or_else(|| fail(format!("{what}: missing <bndbox>")))?;
        let b = [
            num(bb, "xmin", &what)?,
            num(bb, "ymin", &what)?,
            num(bb, "xmax", &what)?,
            num(bb, "ymax", &what)?,
        ];
        let difficult = child(obj, "difficult").is_some_and(|d| d == "1");
        objects.push((name, b, difficult));
    }
    Ok(VocXml {
        size: (w as u32, h as u32),
        objects,
    })
}

impl DetSource for VocDet {
    fn len(&self) -> usize {
        self.items.len()
    }

    fn class_names(&self) -> &[String] {
        &self.names
    }

    fn read(&self, idx: usize) -> (Option<DetSample>, Vec<String>) {
        self.read_sample(idx)
    }
}
