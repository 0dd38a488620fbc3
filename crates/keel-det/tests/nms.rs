//! NMS and batched NMS vs torchvision: identical kept indices on tie-heavy fixtures (the
//! sort order behind them is tested in src/sort.rs); plus errors.
//!
//! Fixtures: `tests/fixtures/gen_det_ops.py`, whose core is
//! ```python
//! keep = torchvision.ops.nms(boxes, scores, thr)
//! bkeep = torchvision.ops.batched_nms(boxes, scores, idxs, thr)
//! ```
//! on boxes from a coarse grid (many duplicates) with scores on six levels (many ties).

mod common;

use anyhow::Result;
use candle::{DType, Device, Tensor};
use common::Fixtures;
use keel_det::nms::{batched_nms, nms};

const CASES: [&str; 7] = [
    "ties",
    "ties_vanilla",
    "negative",
    "random",
    "f64",
    "single",
    "empty",
];
const THRESHOLDS: [f64; 5] = [0.0, 0.3, 0.5, 0.7, 1.0];

fn indices(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.to_dtype(DType::I64)?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|i| i as u32)
        .collect())
}

#[test]
fn nms_and_batched_nms_are_identical_to_torchvision_ties_included() -> Result<()> {
    let fx = Fixtures::load()?;
    let mut kept_some_tie = false;
    for case in CASES {
        let p = format!("nms.{case}");
        let boxes = fx.get(&format!("{p}.boxes"))?;
        let scores = fx.get(&format!("{p}.scores"))?;
        let idxs = fx.get(&format!("{p}.idxs"))?;
        for (t, thr) in THRESHOLDS.iter().enumerate() {
            let want = indices(&fx.get(&format!("{p}.t{t}.keep"))?)?;
            assert_eq!(
                nms(&boxes, &scores, *thr)?,
                want,
                "{case} nms iou_threshold {thr}"
            );
            let want_b = indices(&fx.get(&format!("{p}.t{t}.bkeep"))?)?;
            for idt in [DType::I64, DType::U32] {
                let got = batched_nms(&boxes, &scores, &idxs.to_dtype(idt)?, *thr)?;
                assert_eq!(
                    got, want_b,
                    "{case} batched_nms iou_threshold {thr} idxs {idt:?}"
                );
            }
            // The fixture must exercise ties: two kept boxes with equal scores.
            let s = scores.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            kept_some_tie |= want
                .windows(2)
                .any(|w| s[w[0] as usize] == s[w[1] as usize]);
        }
    }
    assert!(
        kept_some_tie,
        "the fixtures have no kept ties; they test nothing about ties"
    );
    Ok(())
}

#[test]
fn f16_and_bf16_inputs_use_the_f32_kernel_on_exact_values() -> Result<()> {
    // The grid boxes and six score levels are exact in f16 and bf16.
    let fx = Fixtures::load()?;
    let (boxes, scores) = (fx.get("nms.ties.boxes")?, fx.get("nms.ties.scores")?);
    let idxs = fx.get("nms.ties.idxs")?;
    for dtype in [DType::F16, DType::BF16] {
        let (b, s) = (boxes.to_dtype(dtype)?, scores.to_dtype(dtype)?);
        assert_eq!(
            b.to_dtype(DType::F32)?.to_vec2::<f32>()?,
            boxes.to_vec2::<f32>()?
        );
        assert_eq!(
            nms(&b, &s, 0.5)?,
            indices(&fx.get("nms.ties.t2.keep")?)?,
            "{dtype:?}"
        );
        assert_eq!(
            batched_nms(&b, &s, &idxs, 0.5)?,
            indices(&fx.get("nms.ties.t2.bkeep")?)?,
            "{dtype:?}"
        );
    }
    Ok(())
}

#[test]
fn duplicate_boxes_with_equal_scores_keep_the_lowest_index() -> Result<()> {
    // torchvision's CPU kernel sorts stably: of 40 identical boxes with equal scores the
    // first survives (an unstable sort, as in older torchvision, may keep another one).
    let n = 40;
    let boxes = Tensor::new(&[0f32, 0., 1., 1.], &Device::Cpu)?
        .unsqueeze(0)?
        .repeat((n, 1))?;
    let scores = Tensor::ones(n, DType::F32, &Device::Cpu)?;
    assert_eq!(nms(&boxes, &scores, 0.5)?, [0]);
    let idxs = Tensor::zeros(n, DType::U32, &Device::Cpu)?;
    assert_eq!(batched_nms(&boxes, &scores, &idxs, 0.5)?, [0]);
    Ok(())
}

#[test]
fn the_per_class_path_orders_equal_scores_like_torchs_unstable_sort() -> Result<()> {
    // ties_vanilla (1200 boxes) takes batched_nms's per-class path; its output order among
    // equal scores is not ascending, so the fixture test above checks the std::sort replica.
    let fx = Fixtures::load()?;
    let scores = fx.get("nms.ties_vanilla.scores")?.to_vec1::<f32>()?;
    let keep = indices(&fx.get("nms.ties_vanilla.t2.bkeep")?)?;
    let descents = keep
        .windows(2)
        .filter(|w| scores[w[0] as usize] == scores[w[1] as usize] && w[0] > w[1]);
    assert!(
        descents.count() > 0,
        "the fixture's ties come out in index order"
    );
    Ok(())
}

#[test]
fn bad_inputs_are_errors_naming_op_value_and_fix() -> Result<()> {
    let dev = Device::Cpu;
    let b = Tensor::new(&[[0f32, 0., 1., 1.], [0., 0., 2., 2.]], &dev)?;
    let s = Tensor::new(&[0.5f32, 0.4], &dev)?;
    let c = Tensor::new(&[0u32, 1], &dev)?;
    let nan_s = Tensor::new(&[0.5f32, f32::NAN], &dev)?;
    let nan_b = Tensor::new(&[[0f32, 0., 1., 1.], [0., f32::NAN, 2., 2.]], &dev)?;
    let e = |r: candle::Result<Vec<u32>>| r.unwrap_err().to_string();
    for (err, want) in [
        (
            e(nms(&b, &s, 1.5)),
            "nms: iou_threshold (1.5) must be in [0, 1]",
        ),
        (
            e(nms(&b, &s, -0.1)),
            "nms: iou_threshold (-0.1) must be in [0, 1]",
        ),
        (
            e(nms(&b, &s, f64::NAN)),
            "nms: iou_threshold (NaN) must be in [0, 1]",
        ),
        (
            e(nms(&b.reshape(8)?, &s, 0.5)),
            "nms: boxes must have shape (N, 4)",
        ),
        (
            e(nms(&b, &s.narrow(0, 0, 1)?, 0.5)),
            "nms: scores must have shape (2,), one per box, got [1]",
        ),
        (e(nms(&b, &nan_s, 0.5)), "nms: scores[1] is NaN"),
        (
            e(nms(&nan_b, &s, 0.5)),
            "nms: boxes[1] = [0.0, NaN, 2.0, 2.0] has a NaN coordinate",
        ),
        (e(nms(&b, &c, 0.5)), "nms: scores must be a float tensor"),
        (
            e(batched_nms(&b, &s, &s, 0.5)),
            "batched_nms: idxs (class ids) must be an integer tensor",
        ),
        (
            e(batched_nms(&b, &s, &c.narrow(0, 0, 1)?, 0.5)),
            "batched_nms: idxs must have shape (2,)",
        ),
    ] {
        assert!(
            err.starts_with(want),
            "{err}\n  expected to start with: {want}"
        );
    }
    Ok(())
}

mod properties {
    use super::*;
    use keel_det::boxes::box_iou;
    use proptest::prelude::*;

    /// Boxes on a small grid (duplicates and touching edges likely), scores on 4 levels.
    fn inputs() -> impl Strategy<Value = (Vec<[f32; 4]>, Vec<f32>, Vec<u32>, f64)> {
        (0usize..40).prop_flat_map(|n| {
            (
                prop::collection::vec((0u8..6, 0u8..6, 1u8..4, 1u8..4), n),
                prop::collection::vec(0u8..4, n),
                prop::collection::vec(0u32..3, n),
                prop::sample::select(vec![0.0, 0.25, 0.5, 0.9, 1.0]),
            )
                .prop_map(|(b, s, c, t)| {
                    let boxes = b
                        .iter()
                        .map(|&(x, y, w, h)| {
                            let (x, y) = (x as f32, y as f32);
                            [x, y, x + w as f32, y + h as f32]
                        })
                        .collect();
                    (boxes, s.iter().map(|&s| s as f32 / 4.0).collect(), c, t)
                })
        })
    }

    /// Checks greedy NMS's defining properties against `box_iou`: kept in non-increasing
    /// score order, no two kept boxes of one class overlap above the threshold, and every
    /// dropped box overlaps a kept box of its class with a score at least its own.
    fn check(
        boxes: &[[f32; 4]],
        scores: &[f32],
        classes: &[u32],
        thr: f64,
        keep: &[u32],
    ) -> std::result::Result<(), TestCaseError> {
        let n = boxes.len();
        let flat: Vec<f32> = boxes.iter().flatten().copied().collect();
        let t = Tensor::from_vec(flat, (n, 4), &Device::Cpu).unwrap();
        let iou = box_iou(&t, &t).unwrap().to_vec2::<f32>().unwrap();
        for w in keep.windows(2) {
            prop_assert!(scores[w[0] as usize] >= scores[w[1] as usize]);
        }
        let kept: Vec<usize> = keep.iter().map(|&k| k as usize).collect();
        for (a, &i) in kept.iter().enumerate() {
            for &j in &kept[a + 1..] {
                let same = classes[i] == classes[j];
                prop_assert!(
                    !(same && iou[i][j] as f64 > thr),
                    "kept {i} and {j} overlap"
                );
            }
        }
        for d in (0..n).filter(|d| !kept.contains(d)) {
            let covered = kept.iter().any(|&k| {
                classes[k] == classes[d] && scores[k] >= scores[d] && iou[k][d] as f64 > thr
            });
            prop_assert!(covered, "dropped {d} has no kept box suppressing it");
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn nms_and_batched_nms_keep_greedy_invariants((boxes, scores, classes, thr) in inputs()) {
            let n = boxes.len();
            let flat: Vec<f32> = boxes.iter().flatten().copied().collect();
            let b = Tensor::from_vec(flat, (n, 4), &Device::Cpu).unwrap();
            let s = Tensor::from_vec(scores.clone(), n, &Device::Cpu).unwrap();
            let c = Tensor::from_vec(classes.clone(), n, &Device::Cpu).unwrap();
            let keep = nms(&b, &s, thr).unwrap();
            check(&boxes, &scores, &vec![0; n], thr, &keep)?;
            let keep = batched_nms(&b, &s, &c, thr).unwrap();
            check(&boxes, &scores, &classes, thr, &keep)?;
        }
    }
}
