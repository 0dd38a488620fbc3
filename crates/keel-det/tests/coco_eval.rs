//! keel-det's COCO evaluation against pycocotools.
//!
//! The fixtures in `tests/fixtures/coco_eval/` come from `tests/fixtures/gen_coco_eval.py`
//! (pycocotools 2.0.11, numpy 2.4; run it from the repository root to regenerate):
//!
//! ```python
//! coco_gt = COCO(); coco_gt.dataset = gt; coco_gt.createIndex()
//! e = COCOeval(coco_gt, coco_gt.loadRes(dts), "bbox")
//! e.evaluate(); e.accumulate(); e.summarize()
//! stats = e.stats                                    # the 12 numbers
//! ap[k] = mean(p[p > -1]) for p = e.eval["precision"][:, :, k, 0, -1]   # and [0, :, k, 0, -1]
//! precision_mean = e.eval["precision"].mean(axis=1)  # -1 where pycocotools has -1
//! recall = e.eval["recall"]
//! ```
//!
//! and, for the sets with `"ignore": 1` annotations, the same with `_prepare` patched to
//! honour that flag (`ignore = iscrowd or id in ignored_ids`). Tolerance: `atol 1e-4`, as
//! the issue asks; the measured max error is printed (float rounding, ~1e-16).

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{Context, Result};
use keel_det::coco_eval::{
    box_iou, iou_thresholds, recall_thresholds, AreaRange, BBox, Category, CocoEval, CocoGt,
    Detection, GroundTruth, AREA_RANGES, MAX_DETS, NUM_IOU, NUM_RECALL,
};
use keel_det::coco_json::{load_detections, load_gt};
use keel_test_support::{assert_close, Tol};
use serde_json::Value;

const TOL: Tol = Tol::new(0.0, 1e-4);

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/coco_eval")
        .join(name)
}

fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().expect("a number")],
        other => panic!("expected numbers in the fixture, found {other}"),
    }
}

/// `f(t, k, a, m)` over pycocotools' `[T][K][A][M]` grid, row-major.
fn grid(eval: &CocoEval, f: impl Fn(usize, usize, AreaRange, usize) -> f64) -> Vec<f64> {
    let mut out = Vec::new();
    for t in 0..NUM_IOU {
        for k in 0..eval.categories().len() {
            for a in AreaRange::ALL {
                for m in 0..MAX_DETS.len() {
                    out.push(f(t, k, a, m));
                }
            }
        }
    }
    out
}

/// `precision[t, :, k, a, m]` averaged over the recall points (-1 kept), as `[T][K][A][M]`.
fn precision_mean(eval: &CocoEval) -> Vec<f64> {
    grid(eval, |t, k, a, m| {
        let p: Vec<f64> = (0..NUM_RECALL)
            .map(|r| eval.precision(t, r, k, a, m).unwrap())
            .collect();
        if p.iter().all(|&v| v > -1.0) {
            p.iter().sum::<f64>() / NUM_RECALL as f64
        } else {
            -1.0
        }
    })
}

fn recall(eval: &CocoEval) -> Vec<f64> {
    grid(eval, |t, k, a, m| eval.recall(t, k, a, m).unwrap())
}

/// Compares one evaluation with one pycocotools result; returns the max abs error.
fn compare(what: &str, eval: &CocoEval, want: &Value) -> f64 {
    assert_eq!(
        eval.stats().to_string(),
        want["summary"].as_str().unwrap(),
        "{what}: summary text"
    );
    let stats = eval.stats().to_array();
    let mut err = assert_close(
        &format!("{what} stats"),
        &stats,
        &floats(&want["stats"]),
        TOL,
    );
    let per_class = want["per_class"].as_array().expect("per_class list");
    let got = eval.per_class();
    assert_eq!(got.len(), per_class.len(), "{what}: number of categories");
    for (g, w) in got.iter().zip(per_class) {
        assert_eq!(
            g.category_id,
            w["category_id"].as_u64().unwrap(),
            "{what}: category order"
        );
    }
    let ap: Vec<f64> = got
        .iter()
        .flat_map(|c| [c.ap.unwrap_or(-1.0), c.ap50.unwrap_or(-1.0)])
        .collect();
    let want_ap: Vec<f64> = per_class
        .iter()
        .flat_map(|c| [c["ap"].as_f64().unwrap(), c["ap50"].as_f64().unwrap()])
        .collect();
    err = err.max(assert_close(
        &format!("{what} per-class AP, AP50"),
        &ap,
        &want_ap,
        TOL,
    ));
    err = err.max(assert_close(
        &format!("{what} precision mean"),
        &precision_mean(eval),
        &floats(&want["precision_mean"]),
        TOL,
    ));
    err.max(assert_close(
        &format!("{what} recall"),
        &recall(eval),
        &floats(&want["recall"]),
        TOL,
    ))
}

fn check_set(name: &str) -> Result<()> {
    let mut gt = load_gt(fixture(&format!("{name}_gt.json")))?;
    let dets = load_detections(fixture(&format!("{name}_dt.json")), &gt)?;
    let text = std::fs::read_to_string(fixture(&format!("{name}_expected.json")))?;
    let want: Value = serde_json::from_str(&text).context("expected json")?;
    let err = compare(name, &CocoEval::evaluate(&gt, &dets)?, &want);
    println!(
        "{name}: {} gt, {} dt, max |rust - pycocotools| = {err:.3e}",
        gt.annotations.len(),
        dets.len()
    );
    if let Some(ids) = want.get("ignored_ids") {
        let ids: HashSet<u64> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert!(
            !ids.is_empty(),
            "{name}: the fixture lists no ignored annotation"
        );
        for a in &mut gt.annotations {
            a.ignore = ids.contains(&a.id);
        }
        let honoured = CocoEval::evaluate(&gt, &dets)?;
        let err = compare(
            &format!("{name} (ignore honoured)"),
            &honoured,
            &want["honour_ignore"],
        );
        println!(
            "{name} with {} ignored: max |rust - pycocotools| = {err:.3e}",
            ids.len()
        );
    }
    Ok(())
}

#[test]
fn basic_set_matches_pycocotools() -> Result<()> {
    check_set("basic")
}

#[test]
fn crowd_and_ignored_boxes_match_pycocotools() -> Result<()> {
    check_set("crowd_ignore")
}

#[test]
fn edge_cases_match_pycocotools() -> Result<()> {
    // Images without GT or detections, categories with detections only or with nothing,
    // 150 + 120 detections on one image with score ties, duplicate hits, zero-size boxes.
    check_set("edge")
}

#[test]
fn dense_set_matches_pycocotools() -> Result<()> {
    check_set("dense")
}

#[test]
fn thresholds_are_numpys_linspace() {
    let t = iou_thresholds();
    assert_eq!(t[0], 0.5);
    assert_eq!(t[5], 0.75);
    // np.linspace(.5, .95, 10)[8] is not 0.9: a detection at IoU 0.9 passes that threshold.
    assert_eq!(t[8], 0.8999999999999999);
    assert_eq!(t[9], 0.95);
    let r = recall_thresholds();
    assert_eq!((r[0], r[1], r[100]), (0.0, 0.01, 1.0));
    assert_eq!(r[7], 7.0 * 0.01);
    assert_eq!(AREA_RANGES[AreaRange::Medium.index()], (1024.0, 9216.0));
}

#[test]
fn crowd_iou_divides_by_the_detection_area() {
    let crowd = BBox::new(0.0, 0.0, 100.0, 100.0);
    let det = BBox::new(10.0, 10.0, 20.0, 20.0);
    assert_eq!(box_iou(&det, &crowd, true), 1.0);
    assert_eq!(box_iou(&det, &crowd, false), 400.0 / 10000.0);
    let half_out = BBox::from_xyxy(-10.0, 0.0, 10.0, 10.0);
    assert_eq!(box_iou(&half_out, &crowd, true), 0.5);
    assert_eq!(
        box_iou(&BBox::new(200.0, 0.0, 5.0, 5.0), &crowd, false),
        0.0
    );
    assert_eq!(box_iou(&BBox::new(5.0, 5.0, 0.0, 5.0), &crowd, false), 0.0);
}

/// Precision is `tp / (tp + fp + eps)` (pycocotools' `np.spacing(1)`), so a perfect AP is
/// `1 - 1e-16`.
fn near(what: &str, got: f64, want: f64) {
    assert!((got - want).abs() < 1e-12, "{what}: got {got}, want {want}");
}

fn one_class(annotations: Vec<GroundTruth>, images: Vec<u64>) -> CocoGt {
    CocoGt {
        images,
        categories: vec![
            Category {
                id: 3,
                name: "a".into(),
            },
            Category {
                id: 1,
                name: "b".into(),
            },
        ],
        annotations,
    }
}

#[test]
fn no_detections_score_zero_and_empty_classes_are_left_out() -> Result<()> {
    let gt = one_class(
        vec![GroundTruth::new(1, 5, 3, BBox::new(0.0, 0.0, 10.0, 10.0))],
        vec![5, 6],
    );
    let eval = CocoEval::evaluate(&gt, &[])?;
    let s = eval.stats();
    assert_eq!((s.ap, s.ap50, s.ar100, s.ap_small), (0.0, 0.0, 0.0, 0.0));
    // No object is medium or large: those entries are -1, as pycocotools prints them.
    assert_eq!((s.ap_medium, s.ap_large, s.ar_large), (-1.0, -1.0, -1.0));
    let pc = eval.per_class();
    assert_eq!(pc.iter().map(|c| c.category_id).collect::<Vec<_>>(), [1, 3]);
    assert_eq!((pc[0].ap, pc[1].ap), (None, Some(0.0)));
    Ok(())
}

#[test]
fn a_false_positive_on_an_image_without_objects_costs_precision() -> Result<()> {
    let gt = one_class(
        vec![GroundTruth::new(1, 5, 3, BBox::new(0.0, 0.0, 10.0, 10.0))],
        vec![5, 6],
    );
    let hit = Detection {
        image_id: 5,
        category_id: 3,
        bbox: BBox::new(0.0, 0.0, 10.0, 10.0),
        score: 0.5,
    };
    let fp = Detection {
        image_id: 6,
        category_id: 3,
        bbox: BBox::new(0.0, 0.0, 10.0, 10.0),
        score: 0.9,
    };
    near(
        "AP, one hit",
        CocoEval::evaluate(&gt, std::slice::from_ref(&hit))?
            .stats()
            .ap,
        1.0,
    );
    // The false positive outranks the hit: precision 1/2 at every recall point.
    let ap = CocoEval::evaluate(&gt, &[hit.clone(), fp.clone()])?
        .stats()
        .ap;
    assert!((ap - 0.5).abs() < 1e-12, "AP {ap}");
    // A detection of a category without any ground truth changes nothing.
    let other = Detection {
        category_id: 1,
        ..fp
    };
    near(
        "AP, hit + other class",
        CocoEval::evaluate(&gt, &[hit, other])?.stats().ap,
        1.0,
    );
    Ok(())
}

#[test]
fn a_ground_truth_with_id_zero_can_be_matched() -> Result<()> {
    // pycocotools stores the matched GT id and tests it against 0, so id 0 never counts;
    // the documented difference: here it does.
    let gt = one_class(
        vec![GroundTruth::new(0, 5, 3, BBox::new(0.0, 0.0, 10.0, 10.0))],
        vec![5],
    );
    let hit = Detection {
        image_id: 5,
        category_id: 3,
        bbox: BBox::new(0.0, 0.0, 10.0, 10.0),
        score: 0.5,
    };
    near(
        "AP, id 0 hit",
        CocoEval::evaluate(&gt, &[hit])?.stats().ap,
        1.0,
    );
    Ok(())
}

#[test]
fn ignored_ground_truth_neither_counts_nor_costs() -> Result<()> {
    let mut difficult = GroundTruth::new(2, 5, 3, BBox::new(50.0, 50.0, 10.0, 10.0));
    difficult.ignore = true;
    let gt = one_class(
        vec![
            GroundTruth::new(1, 5, 3, BBox::new(0.0, 0.0, 10.0, 10.0)),
            difficult,
        ],
        vec![5],
    );
    let hit = Detection {
        image_id: 5,
        category_id: 3,
        bbox: BBox::new(0.0, 0.0, 10.0, 10.0),
        score: 0.5,
    };
    let on_ignored = Detection {
        bbox: BBox::new(50.0, 50.0, 10.0, 10.0),
        score: 0.9,
        ..hit.clone()
    };
    let eval = CocoEval::evaluate(&gt, &[hit, on_ignored])?;
    near("AP", eval.stats().ap, 1.0);
    near("AR100", eval.stats().ar100, 1.0);
    Ok(())
}

#[test]
fn evaluate_rejects_bad_programmatic_input() {
    let gt = one_class(
        vec![GroundTruth::new(1, 5, 3, BBox::new(0.0, 0.0, -1.0, 10.0))],
        vec![5],
    );
    let err = CocoEval::evaluate(&gt, &[]).unwrap_err().to_string();
    assert!(
        err.contains("annotation #0 (id 1)") && err.contains("negative size"),
        "{err}"
    );
    let gt = one_class(vec![], vec![5]);
    let nan = Detection {
        image_id: 5,
        category_id: 3,
        bbox: BBox::new(0.0, 0.0, 1.0, 1.0),
        score: f64::NAN,
    };
    let err = CocoEval::evaluate(&gt, &[nan]).unwrap_err().to_string();
    assert!(
        err.contains("detection #0") && err.contains("score NaN"),
        "{err}"
    );
    let unknown = Detection {
        image_id: 7,
        category_id: 3,
        bbox: BBox::new(0.0, 0.0, 1.0, 1.0),
        score: 0.5,
    };
    let err = CocoEval::evaluate(&gt, &[unknown]).unwrap_err().to_string();
    assert!(err.contains("image_id 7"), "{err}");
    let dup = CocoGt {
        images: vec![5, 5],
        ..gt
    };
    let err = CocoEval::evaluate(&dup, &[]).unwrap_err().to_string();
    assert!(err.contains("image id 5 appears twice"), "{err}");
}

#[test]
fn area_range_bounds_are_inclusive_and_use_the_area_field() -> Result<()> {
    // pycocotools ignores a GT when `area < lo or area > hi`: an area of exactly 32² is
    // both small and medium. The range test reads `area`, not the box's w * h.
    let mut g = GroundTruth::new(1, 5, 3, BBox::new(0.0, 0.0, 100.0, 100.0));
    g.area = 1024.0;
    let gt = one_class(vec![g], vec![5]);
    let hit = Detection {
        image_id: 5,
        category_id: 3,
        bbox: BBox::new(0.0, 0.0, 100.0, 100.0),
        score: 0.5,
    };
    let s = CocoEval::evaluate(&gt, &[hit])?.stats();
    near("APs", s.ap_small, 1.0);
    near("APm", s.ap_medium, 1.0);
    assert_eq!(
        s.ap_large, -1.0,
        "a 100x100 box with area 1024 is not large"
    );
    Ok(())
}
