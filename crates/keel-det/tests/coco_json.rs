//! keel-det's COCO JSON loaders: what they read, and bad files reported with the file and
//! the annotation named.

use anyhow::Result;
use keel_det::coco_eval::{BBox, CocoEval, Detection};
use keel_det::coco_json::{
    detections_to_json, load_detections, load_gt, parse_detections, parse_gt, save_detections,
};
use keel_test_support::TempDir;

const GT: &str = r#"{
  "info": {"year": 2017},
  "images": [{"id": 42, "width": 640, "height": 480, "file_name": "a.jpg"}, {"id": 7}],
  "categories": [{"id": 18, "name": "dog", "supercategory": "animal"}, {"id": 1, "name": "person"}],
  "annotations": [
    {"id": 5, "image_id": 42, "category_id": 18, "bbox": [10, 20, 30.5, 40], "area": 900.25,
     "iscrowd": 0, "segmentation": [[10, 20, 40, 20, 40, 60]], "ignore": 1},
    {"id": 6, "image_id": 42, "category_id": 1, "bbox": [0, 0, 100, 100], "iscrowd": true},
    {"id": 9, "image_id": 7, "category_id": 1, "bbox": [1, 2, 3, 4]}
  ]
}"#;

/// `GT` with the first occurrence of `find` replaced.
fn gt_with(find: &str, replace: &str) -> String {
    assert!(GT.contains(find), "the test's GT has no {find}");
    GT.replacen(find, replace, 1)
}

fn gt_error(text: &str) -> String {
    parse_gt(text, "instances_val.json")
        .unwrap_err()
        .to_string()
}

#[test]
fn reads_coco_instances() -> Result<()> {
    let gt = parse_gt(GT, "instances_val.json")?;
    assert_eq!(gt.images, [42, 7]);
    let cats: Vec<(u64, &str)> = gt
        .categories
        .iter()
        .map(|c| (c.id, c.name.as_str()))
        .collect();
    assert_eq!(cats, [(18, "dog"), (1, "person")]);
    let a = &gt.annotations[0];
    assert_eq!((a.id, a.image_id, a.category_id), (5, 42, 18));
    assert_eq!(a.bbox, BBox::new(10.0, 20.0, 30.5, 40.0));
    // `area` as given (the mask's), the `ignore` key not read (as pycocotools).
    assert_eq!((a.area, a.iscrowd, a.ignore), (900.25, false, false));
    // iscrowd as a boolean; a missing area is the box's.
    assert_eq!(
        (gt.annotations[1].iscrowd, gt.annotations[1].area),
        (true, 10000.0)
    );
    assert_eq!(
        (gt.annotations[2].iscrowd, gt.annotations[2].area),
        (false, 12.0)
    );
    Ok(())
}

#[test]
fn bad_ground_truth_names_file_and_annotation() {
    let cases = [
        (
            gt_with("[10, 20, 30.5, 40]", "[10, 20, 30.5]"),
            "annotation #0 (id 5): bbox [10.0, 20.0, 30.5] has 3 numbers",
        ),
        (
            gt_with("[10, 20, 30.5, 40]", "[10, 20, -30.5, 40]"),
            "annotation #0 (id 5): bbox [10, 20, -30.5, 40] has a negative size",
        ),
        (
            gt_with("\"image_id\": 7,", "\"image_id\": 8,"),
            "annotation #2 (id 9): image_id 8 is not in the images list",
        ),
        (
            gt_with("\"category_id\": 18,", "\"category_id\": 3,"),
            "annotation #0 (id 5): category_id 3 is not in the categories list",
        ),
        (
            gt_with("\"id\": 9,", "\"id\": 6,"),
            "annotation id 6 appears twice (#1 and #2)",
        ),
        (
            gt_with("{\"id\": 7}", "{\"id\": 42}"),
            "image id 42 appears twice",
        ),
        (
            gt_with("\"area\": 900.25", "\"area\": -1"),
            "annotation #0 (id 5): area -1 must be finite and >= 0",
        ),
        (
            gt_with("[10, 20, 30.5, 40]", "\"10, 20, 30, 40\""),
            "annotation #0 (id 5): invalid type: string",
        ),
        (
            gt_with("\"id\": 9, ", ""),
            "annotation #2: missing field `id`",
        ),
        (
            gt_with("{\"id\": 7}", "{\"id\": -7}"),
            "image #1 (id -7): invalid value",
        ),
        (
            gt_with("\"images\"", "\"imgs\""),
            "not a COCO instances file (missing field `images`",
        ),
        (
            GT[..GT.len() - 3].to_string(),
            "not a COCO instances file (EOF while parsing",
        ),
    ];
    for (text, want) in cases {
        let err = gt_error(&text);
        assert!(err.starts_with("instances_val.json: "), "{err}");
        assert!(err.contains(want), "want {want:?} in {err:?}");
    }
}

#[test]
fn reads_and_writes_results_files() -> Result<()> {
    let gt = parse_gt(GT, "instances_val.json")?;
    let text = r#"[{"image_id": 42, "category_id": 18, "bbox": [10, 20, 30.5, 40], "score": 0.75, "area": 3},
                   {"image_id": 7, "category_id": 1, "bbox": [0.5, 0, 2, 2], "score": 1}]"#;
    let dets = parse_detections(text, "results.json", &gt)?;
    let first = Detection {
        image_id: 42,
        category_id: 18,
        bbox: BBox::new(10.0, 20.0, 30.5, 40.0),
        score: 0.75,
    };
    assert_eq!(dets[0], first);
    assert_eq!(dets[1].bbox.area(), 4.0);
    let tmp = TempDir::new("coco-json");
    let path = tmp.0.join("results.json");
    save_detections(&path, &dets)?;
    assert_eq!(load_detections(&path, &gt)?, dets);
    assert_eq!(std::fs::read_to_string(&path)?, detections_to_json(&dets));
    // Files on disk: errors name the path.
    std::fs::write(tmp.0.join("instances_val.json"), GT)?;
    let loaded = load_gt(tmp.0.join("instances_val.json"))?;
    assert_eq!(loaded, gt);
    let missing = tmp.0.join("nope.json");
    let err = load_gt(&missing).unwrap_err().to_string();
    assert!(
        err.contains("cannot read the ground-truth file") && err.contains("nope.json"),
        "{err}"
    );
    let err = load_detections(&missing, &gt).unwrap_err().to_string();
    assert!(
        err.contains("cannot read the detections file") && err.contains("nope.json"),
        "{err}"
    );
    // Both files evaluate: the first detection hits annotation 5 exactly.
    let per_class = CocoEval::evaluate(&gt, &dets)?.per_class();
    assert!(
        (per_class[1].ap.unwrap() - 1.0).abs() < 1e-12,
        "{per_class:?}"
    );
    Ok(())
}

#[test]
fn bad_detections_name_file_and_detection() -> Result<()> {
    let gt = parse_gt(GT, "instances_val.json")?;
    let ok = r#"{"image_id": 42, "category_id": 18, "bbox": [10, 20, 30, 40], "score": 0.5}"#;
    let cases = [
        (
            ok.replace("\"image_id\": 42", "\"image_id\": 43"),
            "detection #1: image_id 43 is not an image of the ground truth",
        ),
        (
            ok.replace("\"category_id\": 18", "\"category_id\": 0"),
            "detection #1: category_id 0 is not a category of the ground truth",
        ),
        (
            ok.replace("[10, 20, 30, 40]", "[10, 20, 30, -40]"),
            "detection #1: bbox [10, 20, 30, -40] has a negative size",
        ),
        (
            ok.replace("[10, 20, 30, 40]", "[10, 20, 30, 40, 1]"),
            "detection #1: bbox [10.0, 20.0, 30.0, 40.0, 1.0] has 5 numbers",
        ),
        (
            ok.replace(", \"score\": 0.5", ""),
            "detection #1: missing field `score`",
        ),
        (
            ok.replace("0.5", "\"high\""),
            "detection #1: invalid type: string \"high\"",
        ),
        (
            ok.replace("\"bbox\": [10, 20, 30, 40]", "\"segmentation\": {}"),
            "detection #1: missing field `bbox`",
        ),
    ];
    for (bad, want) in cases {
        let text = format!("[{ok}, {bad}]");
        let err = parse_detections(&text, "results.json", &gt)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("results.json: "), "{err}");
        assert!(err.contains(want), "want {want:?} in {err:?}");
    }
    let err = parse_detections(ok, "results.json", &gt)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("results.json: not a COCO results file") && err.contains("must be a list"),
        "{err}"
    );
    assert!(parse_detections("[]", "results.json", &gt)?.is_empty());
    Ok(())
}
