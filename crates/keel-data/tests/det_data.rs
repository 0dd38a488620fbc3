//! Detection data: the synthetic set, box-exact augmentation against hand-computed boxes,
//! the collate, and the VOC / COCO loaders with their up-front validation (every bad
//! annotation named in one error).
use std::path::{Path, PathBuf};

use candle::Device;
use keel_data::{
    validate_det, CocoDet, DetAugment, DetHostBatch, DetSample, DetShapes, DetSource, Pad, Resize,
    VocDet,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keel-det-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_jpeg(path: &Path, w: u32, h: u32) -> anyhow::Result<()> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 5) as u8, (y * 7) as u8, 90]));
    img.save(path)?;
    Ok(())
}

fn sample(w: u32, h: u32, boxes: Vec<[f32; 4]>) -> DetSample {
    let n = boxes.len();
    DetSample {
        image: image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 0])),
        boxes,
        classes: (0..n as u32).collect(),
        ignore: vec![false; n],
    }
}

#[test]
fn synthetic_set_is_deterministic_varied_and_valid() -> anyhow::Result<()> {
    let set = DetShapes::generate(60, 128, 7);
    let again = DetShapes::render(128, 7, 13);
    assert_eq!(set.samples()[13].image, again.image);
    assert_eq!(set.samples()[13].boxes, again.boxes);
    assert_ne!(set.samples()[13].image, set.samples()[14].image);
    let (mut many, mut small, mut overlap) = (0, 0, 0);
    for s in set.samples() {
        assert!(
            !s.boxes.is_empty() && s.boxes.len() <= 6,
            "{} objects",
            s.boxes.len()
        );
        assert_eq!(
            (s.classes.len(), s.ignore.len()),
            (s.boxes.len(), s.boxes.len())
        );
        for b in &s.boxes {
            assert!(
                0.0 <= b[0]
                    && b[0] < b[2]
                    && b[2] <= 128.0
                    && 0.0 <= b[1]
                    && b[1] < b[3]
                    && b[3] <= 128.0,
                "{b:?}"
            );
            small += usize::from((b[2] - b[0]).max(b[3] - b[1]) <= 20.0);
        }
        assert!(s.classes.iter().all(|&c| c < 4));
        many += usize::from(s.boxes.len() >= 4);
        for (i, a) in s.boxes.iter().enumerate() {
            for b in &s.boxes[i + 1..] {
                overlap += usize::from(a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3]);
            }
        }
    }
    assert!(
        many >= 10 && small >= 10 && overlap >= 10,
        "many {many} small {small} overlap {overlap}"
    );
    validate_det(&[&set], None)?;
    Ok(())
}

#[test]
fn resize_and_flip_move_boxes_exactly() -> anyhow::Result<()> {
    let s = sample(40, 20, vec![[4.0, 2.0, 14.0, 12.0]]);
    let r = s.resized(80, 10)?;
    assert_eq!(r.image.dimensions(), (80, 10));
    assert_eq!(r.boxes, vec![[8.0, 1.0, 28.0, 6.0]]);
    let mut f = r.clone();
    f.flip_horizontal();
    assert_eq!(f.boxes, vec![[52.0, 1.0, 72.0, 6.0]]);
    assert_eq!(f.image.get_pixel(79, 3), r.image.get_pixel(0, 3));
    // Shorter side 10 -> x0.5; with max_size 15 the longer side caps it: 40 * 15/40, 20 * 15/40.
    assert_eq!(
        Resize::ShorterSide {
            size: 10,
            max_size: 100
        }
        .target(40, 20)?,
        (20, 10)
    );
    assert_eq!(
        Resize::ShorterSide {
            size: 10,
            max_size: 15
        }
        .target(40, 20)?,
        (15, 8)
    );
    assert!(Resize::Fixed {
        width: 0,
        height: 3
    }
    .target(40, 20)
    .is_err());
    // Training flips with probability 1/2: over 40 draws both outcomes appear.
    let aug = DetAugment {
        resize: Resize::Fixed {
            width: 80,
            height: 10,
        },
        flip: true,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let outs: Vec<[f32; 4]> = (0..40)
        .map(|_| aug.apply(&s, Some(&mut rng)).unwrap().boxes[0])
        .collect();
    assert!(outs.contains(&[8.0, 1.0, 28.0, 6.0]) && outs.contains(&[52.0, 1.0, 72.0, 6.0]));
    assert_eq!(aug.apply(&s, None)?.boxes, vec![[8.0, 1.0, 28.0, 6.0]]);
    Ok(())
}

#[test]
fn boxes_are_clipped_and_empty_ones_dropped() -> anyhow::Result<()> {
    let mut s = sample(
        40,
        20,
        vec![
            [30.0, 5.0, 50.0, 15.0],
            [45.0, 0.0, 50.0, 5.0],
            [-3.0, -1.0, 2.0, 4.0],
        ],
    );
    s.clip_and_drop()?;
    assert_eq!(s.boxes, vec![[30.0, 5.0, 40.0, 15.0], [0.0, 0.0, 2.0, 4.0]]);
    // Lists that disagree are an error naming the op, not an index panic.
    let mut bad = s.clone();
    bad.classes.pop();
    let err = bad.clip_and_drop().unwrap_err().to_string();
    assert!(
        err.contains("DetSample::clip_and_drop") && err.contains("2 boxes, 1 classes"),
        "{err}"
    );
    assert_eq!(s.classes, vec![0, 2]);
    Ok(())
}

#[test]
fn collate_pads_and_keeps_per_image_boxes() -> anyhow::Result<()> {
    let a = sample(10, 8, vec![[1.0, 1.0, 5.0, 5.0], [2.0, 0.0, 9.0, 8.0]]);
    let b = sample(6, 12, vec![]);
    let hb = DetHostBatch::collate(&[a, b], Pad::ToMax)?;
    assert_eq!(
        (hb.height, hb.width, hb.sizes.clone()),
        (12, 10, vec![(8, 10), (12, 6)])
    );
    let t = hb.to_tensors(&Device::Cpu)?;
    assert_eq!(t.images.dims(), &[2, 3, 12, 10]);
    assert_eq!(
        t.boxes[0].to_vec2::<f32>()?,
        vec![vec![1.0, 1.0, 5.0, 5.0], vec![2.0, 0.0, 9.0, 8.0]]
    );
    assert_eq!(t.boxes[1].dims(), &[0, 4]);
    assert_eq!(t.classes[0].to_vec1::<u32>()?, vec![0, 1]);
    // Pixel (x=3, y=2) of image 0, red channel = 3/255 normalized; padding is 0.
    let v = t.images.flatten_all()?.to_vec1::<f32>()?;
    assert!((v[2 * 10 + 3] - (3.0 / 255.0 - 0.485) / 0.229).abs() < 1e-6);
    assert_eq!(v[10 * 10 + 3], 0.0, "row 10 of image 0 is padding");
    assert!(DetHostBatch::collate(
        &[sample(10, 8, vec![])],
        Pad::Fixed {
            width: 9,
            height: 8
        }
    )
    .is_err());
    // A batch whose per-image lists disagree is an error, not an index panic.
    let mut bad = hb.clone();
    bad.classes[0].pop();
    let err = bad.to_tensors(&Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("image 0 has 2 boxes, 1 classes"), "{err}");
    let mut short = hb;
    short.boxes.pop();
    assert!(short.to_tensors(&Device::Cpu).is_err());
    Ok(())
}

fn voc_xml(w: u32, h: u32, objects: &[(&str, [i32; 4], bool)]) -> String {
    let mut s = format!("<annotation><filename>x.jpg</filename><size><width>{w}</width><height>{h}</height><depth>3</depth></size>");
    for (name, b, d) in objects {
        s.push_str(&format!(
            "<object><name>{name}</name><difficult>{}</difficult><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>",
            u8::from(*d), b[0], b[1], b[2], b[3]
        ));
    }
    s + "</annotation>"
}

/// Writes a VOC detection folder with `ids`, each `(id, xml or None = no image)`.
fn write_voc_det(root: &Path, items: &[(&str, String, bool)]) -> anyhow::Result<()> {
    for d in ["JPEGImages", "Annotations", "ImageSets/Main"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let mut list = String::new();
    for (id, xml, with_image) in items {
        std::fs::write(root.join(format!("Annotations/{id}.xml")), xml)?;
        if *with_image {
            write_jpeg(&root.join(format!("JPEGImages/{id}.jpg")), 40, 30)?;
        }
        list.push_str(&format!("{id}\n"));
    }
    std::fs::write(root.join("ImageSets/Main/train.txt"), list)?;
    Ok(())
}

#[test]
fn voc_boxes_become_zero_based_and_difficult_is_kept() -> anyhow::Result<()> {
    let root = tmp("voc-good");
    let xml = voc_xml(
        40,
        30,
        &[
            ("dog", [1, 1, 10, 20], false),
            ("person", [5, 6, 40, 30], true),
        ],
    );
    write_voc_det(&root, &[("a", xml, true)])?;
    let voc = VocDet::open(&root, "train")?;
    validate_det(&[&voc], None)?;
    let s = voc.decode(0)?;
    assert_eq!(
        s.boxes,
        vec![[0.0, 0.0, 10.0, 20.0], [4.0, 5.0, 40.0, 30.0]]
    );
    assert_eq!(s.classes, vec![11, 14]);
    assert_eq!(s.ignore, vec![false, true]);
    std::fs::remove_dir_all(root)?;
    Ok(())
}

#[test]
fn voc_faults_are_all_reported_at_once() -> anyhow::Result<()> {
    let root = tmp("voc-bad");
    write_voc_det(
        &root,
        &[
            (
                "good",
                voc_xml(40, 30, &[("cat", [1, 1, 5, 5], false)]),
                true,
            ),
            (
                "outside",
                voc_xml(
                    40,
                    30,
                    &[("cat", [1, 1, 5, 5], false), ("car", [30, 2, 45, 9], false)],
                ),
                true,
            ),
            (
                "flat",
                voc_xml(40, 30, &[("bus", [8, 3, 7, 9], false)]),
                true,
            ),
            (
                "alien",
                voc_xml(40, 30, &[("unicorn", [1, 1, 5, 5], false)]),
                true,
            ),
            (
                "broken",
                "<annotation><size><width>40</width>".to_string(),
                true,
            ),
            (
                "noimage",
                voc_xml(40, 30, &[("cat", [1, 1, 5, 5], false)]),
                false,
            ),
        ],
    )?;
    let voc = VocDet::open(&root, "train")?;
    let err = validate_det(&[&voc], None).unwrap_err().to_string();
    assert!(err.contains("5 of 6 samples are bad"), "{err}");
    for needle in [
        "outside.xml: object 1 'car': box [x1, y1, x2, y2] = [29.0, 1.0, 45.0, 9.0] lies outside the 40x30 image",
        "flat.xml: object 0 'bus': box [x1, y1, x2, y2] = [7.0, 2.0, 7.0, 9.0] has zero or negative area",
        "alien.xml: object 0 'unicorn': unknown class name",
        "broken.xml: malformed XML",
        "noimage.jpg: the image file is missing",
    ] {
        assert!(err.contains(needle), "missing '{needle}' in:\n{err}");
    }
    assert!(!err.contains("good.xml"), "{err}");
    assert!(voc.decode(0).is_ok() && voc.decode(1).is_err());
    std::fs::remove_dir_all(root)?;
    Ok(())
}

fn write_coco(dir: &Path, annotations: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir.join("images"))?;
    write_jpeg(&dir.join("images/a.jpg"), 40, 30)?;
    write_jpeg(&dir.join("images/b.jpg"), 40, 30)?;
    let json = format!(
        r#"{{"images": [{{"id": 7, "file_name": "a.jpg", "width": 40, "height": 30}},
                       {{"id": 9, "file_name": "b.jpg", "width": 40, "height": 30}},
                       {{"id": 11, "file_name": "gone.jpg", "width": 40, "height": 30}}],
            "categories": [{{"id": 5, "name": "dog"}}, {{"id": 1, "name": "person"}}],
            "annotations": [{annotations}]}}"#
    );
    let path = dir.join("instances_train.json");
    std::fs::write(&path, json)?;
    Ok(path)
}

#[test]
fn coco_remaps_categories_converts_xywh_and_flags_crowd() -> anyhow::Result<()> {
    let dir = tmp("coco-good");
    let json = write_coco(
        &dir,
        r#"{"id": 1, "image_id": 7, "category_id": 5, "bbox": [2.5, 3, 10, 4.5], "iscrowd": 0},
           {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 40, 30], "iscrowd": 1}"#,
    )?;
    let coco = CocoDet::open(&json, &dir.join("images"))?;
    assert_eq!(
        coco.class_names(),
        ["person".to_string(), "dog".to_string()]
    );
    assert_eq!(coco.category_ids(), [1, 5]);
    let s = coco.decode(0)?;
    assert_eq!(s.boxes, vec![[2.5, 3.0, 12.5, 7.5], [0.0, 0.0, 40.0, 30.0]]);
    assert_eq!(
        (s.classes.clone(), s.ignore.clone()),
        (vec![1, 0], vec![false, true])
    );
    assert!(coco.decode(1)?.boxes.is_empty());
    // Image 11's file is missing: the only problem.
    let err = validate_det(&[&coco], None).unwrap_err().to_string();
    assert!(
        err.contains("1 of 3 samples are bad")
            && err.contains("gone.jpg: the image file is missing"),
        "{err}"
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn coco_faults_are_all_reported_at_once() -> anyhow::Result<()> {
    let dir = tmp("coco-bad");
    let json = write_coco(
        &dir,
        r#"{"id": 1, "image_id": 7, "category_id": 3, "bbox": [2, 3, 10, 4]},
           {"id": 2, "image_id": 7, "category_id": 1, "bbox": [35, 0, 10, 5]},
           {"id": 3, "image_id": 9, "category_id": 1, "bbox": [5, 5, 0, 4]},
           {"id": 4, "image_id": 9, "category_id": 1, "bbox": [5, 5, 4]}"#,
    )?;
    let coco = CocoDet::open(&json, &dir.join("images"))?;
    let err = validate_det(&[&coco], None).unwrap_err().to_string();
    assert!(err.contains("3 of 3 samples are bad"), "{err}");
    for needle in [
        "annotation id 1 (image",
        "category_id 3 is not in \"categories\"",
        "annotation id 2 (image",
        "[35.0, 0.0, 45.0, 5.0] lies outside the 40x30 image",
        "annotation id 3 (image",
        "has zero or negative area",
        "annotation id 4 (image",
        "bbox has 3 numbers",
        "gone.jpg: the image file is missing",
    ] {
        assert!(err.contains(needle), "missing '{needle}' in:\n{err}");
    }
    // Malformed JSON and annotations of unknown images fail at open, naming the file.
    std::fs::write(&json, "{\"images\": [")?;
    let e = CocoDet::open(&json, &dir)
        .err()
        .expect("malformed JSON")
        .to_string();
    assert!(
        e.contains("instances_train.json: malformed COCO JSON"),
        "{e}"
    );
    let json = write_coco(
        &dir,
        r#"{"id": 5, "image_id": 99, "category_id": 1, "bbox": [1, 1, 2, 2]}"#,
    )?;
    let e = CocoDet::open(&json, &dir)
        .err()
        .expect("orphan")
        .to_string();
    assert!(
        e.contains("annotation id 5: image_id 99 is not in \"images\""),
        "{e}"
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
