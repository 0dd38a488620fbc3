//! COCO-style bounding-box evaluation: pycocotools' `COCOeval` (iouType `"bbox"`, default
//! parameters) re-implemented step for step — `evaluateImg`, `accumulate`, `summarize` —
//! so the numbers agree with pycocotools: tested to 1e-4 on the committed fixtures built by
//! `tests/fixtures/gen_coco_eval.py` (stats, per-class AP, the precision and recall arrays
//! and the printed summary); the measured difference is float rounding, under 5e-15. On
//! 2000 images, 20 categories, 14k objects and 23k detections it agrees to 1e-12 and takes
//! 0.65 s (release, one thread) where pycocotools takes 6.0 s, both measured on the same
//! shared 2-core machine under load (load average ~8), so read the ratio, not the times.
//!
//! Reference: Lin et al., "Microsoft COCO: Common Objects in Context" (2014), and
//! `pycocotools/cocoeval.py` (cocodataset/cocoapi), whose rules this module keeps:
//!
//! - Boxes are COCO's `[x, y, width, height]` ([`BBox`]). The IoU of a detection with a
//!   crowd box divides the intersection by the *detection's* area (`maskApi.c` `bbIou`).
//! - A ground-truth box is ignored when [`GroundTruth::ignore`] or
//!   [`GroundTruth::iscrowd`] is set, or when its [`GroundTruth::area`] (COCO's mask area,
//!   not the box's `w * h`) is outside the area range. Ignored boxes are matched last; a
//!   detection matched to one is ignored, and so is an unmatched detection whose box area
//!   (`w * h`) is outside the range. Crowd boxes can be matched by many detections.
//! - Detections of an image and category are sorted by descending score with a *stable*
//!   sort (pycocotools' mergesort on `-score`: ties keep their input order) and cut to 100;
//!   at accumulation the detections of all images (in ascending image id) are merged with
//!   the same stable sort, each image cut to `maxDets` first.
//! - IoU thresholds `.50:.05:.95` (numpy's `linspace`, bit for bit), 101 recall points,
//!   area ranges all / small (< 32²) / medium / large (> 96²), `maxDets` 1 / 10 / 100.
//! - Precision and recall are `-1` where a category has no (non-ignored) ground truth in the
//!   area range; those entries are left out of every mean, so a category with detections
//!   but no ground truth does not count.
//!
//! One deliberate difference: pycocotools marks a detection as matched by storing the
//! ground truth's `id` and testing it against 0, so a ground-truth annotation with id 0
//! can never count as a true positive. Here a match is a match whatever the id.

use std::collections::HashMap;

use candle::Result;

pub use crate::coco_stats::{ClassAp, CocoStats};
pub use crate::coco_types::{BBox, Category, CocoGt, Detection, GroundTruth};

/// Number of IoU thresholds (`.50:.05:.95`).
pub const NUM_IOU: usize = 10;
/// Number of recall points (`0:.01:1`).
pub const NUM_RECALL: usize = 101;
/// The `maxDets` settings, in the order of the last axis of [`CocoEval::precision`].
pub const MAX_DETS: [usize; 3] = [1, 10, 100];
/// The area ranges `[lo, hi]` (inclusive, in pixels²) of [`AreaRange::ALL`], in order.
pub const AREA_RANGES: [(f64, f64); 4] = [
    (0.0, 1e10),
    (0.0, 32.0 * 32.0),
    (32.0 * 32.0, 96.0 * 96.0),
    (96.0 * 96.0, 1e10),
];

/// The IoU thresholds `.50, .55, .., .95` exactly as pycocotools' `np.linspace` makes them
/// (`0.5 + i * (0.45 / 9)`, the last one set to `0.95`; the ninth is `0.8999999999999999`).
pub fn iou_thresholds() -> [f64; NUM_IOU] {
    let step = (0.95 - 0.5) / 9.0;
    let mut t = [0.0; NUM_IOU];
    for (i, v) in t.iter_mut().enumerate() {
        *v = i as f64 * step + 0.5;
    }
    t[NUM_IOU - 1] = 0.95;
    t
}

/// The recall points `0, .01, .., 1` exactly as pycocotools' `np.linspace` makes them.
pub fn recall_thresholds() -> [f64; NUM_RECALL] {
    let step = 1.0 / 100.0;
    let mut r = [0.0; NUM_RECALL];
    for (i, v) in r.iter_mut().enumerate() {
        *v = i as f64 * step;
    }
    r[NUM_RECALL - 1] = 1.0;
    r
}

/// COCO's object size classes, by area in pixels² (see [`AREA_RANGES`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AreaRange {
    /// Every object.
    All,
    /// Area below 32².
    Small,
    /// Area from 32² to 96².
    Medium,
    /// Area above 96².
    Large,
}

impl AreaRange {
    /// The four ranges in pycocotools' order.
    pub const ALL: [AreaRange; 4] = [
        AreaRange::All,
        AreaRange::Small,
        AreaRange::Medium,
        AreaRange::Large,
    ];

    /// Position in [`AREA_RANGES`] and on the area axis of [`CocoEval::precision`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// IoU of a detection with a ground-truth box as pycocotools' `bbIou` computes it: for a
/// crowd box the union is the detection's area. 0 when the boxes do not overlap.
pub fn box_iou(det: &BBox, gt: &BBox, crowd: bool) -> f64 {
    let w = (det.w + det.x).min(gt.w + gt.x) - det.x.max(gt.x);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (det.h + det.y).min(gt.h + gt.y) - det.y.max(gt.y);
    if h <= 0.0 {
        return 0.0;
    }
    let i = w * h;
    let union = if crowd {
        det.area()
    } else {
        det.area() + gt.area() - i
    };
    i / union
}

/// Accumulated results: pycocotools' `eval['precision']` and `eval['recall']`.
#[derive(Clone, Debug)]
pub struct CocoEval {
    categories: Vec<Category>,
    /// `[T, R, K, A, M]`, row-major.
    precision: Vec<f64>,
    /// `[T, K, A, M]`, row-major.
    recall: Vec<f64>,
}

/// Per image and category, for one area range: the detections (best first, at most 100)
/// and whether each matched / is ignored at each IoU threshold.
struct ImageEval {
    scores: Vec<f64>,
    /// `[T][D]`.
    matched: Vec<Vec<bool>>,
    /// `[T][D]`.
    ignored: Vec<Vec<bool>>,
    /// Ground truth that counts (not ignored) in this area range.
    num_gt: usize,
}

impl CocoEval {
    /// Evaluates `dets` against `gt` (pycocotools' `evaluate()` then `accumulate()`).
    /// Both are validated first ([`CocoGt::validate`], [`CocoGt::validate_detections`]).
    pub fn evaluate(gt: &CocoGt, dets: &[Detection]) -> Result<CocoEval> {
        gt.validate("CocoEval ground truth")?;
        gt.validate_detections(dets, "CocoEval detections")?;
        let mut images = gt.images.clone();
        images.sort_unstable();
        let mut categories = gt.categories.clone();
        categories.sort_by_key(|c| c.id);
        let mut gts: HashMap<(u64, u64), Vec<&GroundTruth>> = HashMap::new();
        for a in &gt.annotations {
            gts.entry((a.image_id, a.category_id)).or_default().push(a);
        }
        let mut dts: HashMap<(u64, u64), Vec<&Detection>> = HashMap::new();
        for d in dets {
            dts.entry((d.image_id, d.category_id)).or_default().push(d);
        }
        let (k_n, a_n) = (categories.len(), AREA_RANGES.len());
        // evals[(k * A + a) * I + i], as pycocotools' evalImgs.
        let mut evals: Vec<Option<ImageEval>> = Vec::with_capacity(k_n * a_n * images.len());
        let mut per_image: Vec<[Option<ImageEval>; 4]> = Vec::with_capacity(images.len());
        for cat in &categories {
            per_image.clear();
            for &img in &images {
                let g = gts.get(&(img, cat.id)).map_or(&[][..], |v| v.as_slice());
                let d = dts.get(&(img, cat.id)).map_or(&[][..], |v| v.as_slice());
                per_image.push(evaluate_image(g, d));
            }
            for a in 0..a_n {
                evals.extend(per_image.iter_mut().map(|e| e[a].take()));
            }
        }
        let mut eval = CocoEval {
            precision: vec![-1.0; NUM_IOU * NUM_RECALL * k_n * a_n * MAX_DETS.len()],
            recall: vec![-1.0; NUM_IOU * k_n * a_n * MAX_DETS.len()],
            categories,
        };
        for k in 0..k_n {
            for a in 0..a_n {
                let start = (k * a_n + a) * images.len();
                let row: Vec<&ImageEval> = evals[start..start + images.len()]
                    .iter()
                    .flatten()
                    .collect();
                for m in 0..MAX_DETS.len() {
                    eval.accumulate(&row, k, a, m);
                }
            }
        }
        Ok(eval)
    }

    /// pycocotools' `accumulate` for one category `k`, area range `a` and `maxDets` `m`.
    fn accumulate(&mut self, row: &[&ImageEval], k: usize, a: usize, m: usize) {
        let max_det = MAX_DETS[m];
        let num_gt: usize = row.iter().map(|e| e.num_gt).sum();
        if row.is_empty() || num_gt == 0 {
            return;
        }
        // (image position, detection position) of every kept detection, merged by a
        // stable sort on descending score: ties keep image order, then per-image order.
        let mut order: Vec<(usize, usize)> = row
            .iter()
            .enumerate()
            .flat_map(|(i, e)| (0..e.scores.len().min(max_det)).map(move |d| (i, d)))
            .collect();
        order.sort_by(|&(i, d), &(j, e)| {
            row[j].scores[e]
                .partial_cmp(&row[i].scores[d])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let recall_thr = recall_thresholds();
        let nd = order.len();
        for t in 0..NUM_IOU {
            let (mut tp, mut fp) = (0usize, 0usize);
            let mut rc = Vec::with_capacity(nd);
            let mut pr = Vec::with_capacity(nd);
            for &(i, d) in &order {
                if !row[i].ignored[t][d] {
                    if row[i].matched[t][d] {
                        tp += 1;
                    } else {
                        fp += 1;
                    }
                }
                let (tpf, fpf) = (tp as f64, fp as f64);
                rc.push(tpf / num_gt as f64);
                pr.push(tpf / (fpf + tpf + f64::EPSILON));
            }
            let ri = self.recall_index(t, k, a, m);
            self.recall[ri] = rc.last().copied().unwrap_or(0.0);
            for i in (1..nd).rev() {
                if pr[i] > pr[i - 1] {
                    pr[i - 1] = pr[i];
                }
            }
            for (r, &thr) in recall_thr.iter().enumerate() {
                let pi = rc.partition_point(|&x| x < thr);
                let pi_index = self.precision_index(t, r, k, a, m);
                self.precision[pi_index] = if pi < nd { pr[pi] } else { 0.0 };
            }
        }
    }

    fn precision_index(&self, t: usize, r: usize, k: usize, a: usize, m: usize) -> usize {
        (((t * NUM_RECALL + r) * self.categories.len() + k) * AREA_RANGES.len() + a)
            * MAX_DETS.len()
            + m
    }

    fn recall_index(&self, t: usize, k: usize, a: usize, m: usize) -> usize {
        ((t * self.categories.len() + k) * AREA_RANGES.len() + a) * MAX_DETS.len() + m
    }

    /// The categories, ascending id: the `k` axis.
    pub fn categories(&self) -> &[Category] {
        &self.categories
    }

    /// `eval['precision'][t, r, k, a, m]`: IoU threshold `t` (of [`iou_thresholds`]),
    /// recall point `r`, category `k` (of [`CocoEval::categories`]), area range `a`,
    /// `maxDets` index `m` (of [`MAX_DETS`]); `-1` without ground truth. `None` when an
    /// index is out of range.
    pub fn precision(&self, t: usize, r: usize, k: usize, a: AreaRange, m: usize) -> Option<f64> {
        let ok = t < NUM_IOU && r < NUM_RECALL && k < self.categories.len() && m < MAX_DETS.len();
        ok.then(|| self.precision[self.precision_index(t, r, k, a.index(), m)])
    }

    /// `eval['recall'][t, k, a, m]` (the axes of [`CocoEval::precision`]); `-1` without
    /// ground truth, `None` when an index is out of range.
    pub fn recall(&self, t: usize, k: usize, a: AreaRange, m: usize) -> Option<f64> {
        let ok = t < NUM_IOU && k < self.categories.len() && m < MAX_DETS.len();
        ok.then(|| self.recall[self.recall_index(t, k, a.index(), m)])
    }

    /// Mean of the entries `> -1` (pycocotools' `_summarize`) of precision (`ap`) or recall
    /// over the IoU thresholds `ts` and categories `ks`, at area `a` and `maxDets` index `m`.
    fn mean(&self, ap: bool, ts: &[usize], ks: &[usize], a: AreaRange, m: usize) -> f64 {
        let (mut sum, mut n) = (0.0, 0usize);
        for &t in ts {
            for &k in ks {
                let values: Vec<f64> = if ap {
                    (0..NUM_RECALL)
                        .map(|r| self.precision[self.precision_index(t, r, k, a.index(), m)])
                        .collect()
                } else {
                    vec![self.recall[self.recall_index(t, k, a.index(), m)]]
                };
                for v in values.into_iter().filter(|&v| v > -1.0) {
                    sum += v;
                    n += 1;
                }
            }
        }
        if n == 0 {
            -1.0
        } else {
            sum / n as f64
        }
    }

    /// The 12 standard numbers (pycocotools' `summarize()`).
    pub fn stats(&self) -> CocoStats {
        let all_t: Vec<usize> = (0..NUM_IOU).collect();
        let ks: Vec<usize> = (0..self.categories.len()).collect();
        let s = |ap: bool, ts: &[usize], a: AreaRange, m: usize| self.mean(ap, ts, &ks, a, m);
        use AreaRange::{All, Large, Medium, Small};
        CocoStats {
            ap: s(true, &all_t, All, 2),
            ap50: s(true, &[0], All, 2),
            ap75: s(true, &[5], All, 2),
            ap_small: s(true, &all_t, Small, 2),
            ap_medium: s(true, &all_t, Medium, 2),
            ap_large: s(true, &all_t, Large, 2),
            ar1: s(false, &all_t, All, 0),
            ar10: s(false, &all_t, All, 1),
            ar100: s(false, &all_t, All, 2),
            ar_small: s(false, &all_t, Small, 2),
            ar_medium: s(false, &all_t, Medium, 2),
            ar_large: s(false, &all_t, Large, 2),
        }
    }

    /// AP @[.50:.95] and @.50 of each category (all areas, 100 detections), ascending id.
    pub fn per_class(&self) -> Vec<ClassAp> {
        let all_t: Vec<usize> = (0..NUM_IOU).collect();
        let some = |v: f64| (v > -1.0).then_some(v);
        self.categories
            .iter()
            .enumerate()
            .map(|(k, c)| ClassAp {
                category_id: c.id,
                name: c.name.clone(),
                ap: some(self.mean(true, &all_t, &[k], AreaRange::All, 2)),
                ap50: some(self.mean(true, &[0], &[k], AreaRange::All, 2)),
            })
            .collect()
    }
}

/// pycocotools' `computeIoU` + `evaluateImg` for one image and category, for each area
/// range; `None` (for all ranges) when there is neither ground truth nor a detection.
fn evaluate_image(gt: &[&GroundTruth], dets: &[&Detection]) -> [Option<ImageEval>; 4] {
    if gt.is_empty() && dets.is_empty() {
        return [None, None, None, None];
    }
    let mut dets: Vec<&Detection> = dets.to_vec();
    dets.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    dets.truncate(MAX_DETS[MAX_DETS.len() - 1]);
    let ious: Vec<Vec<f64>> = dets
        .iter()
        .map(|d| {
            gt.iter()
                .map(|g| box_iou(&d.bbox, &g.bbox, g.iscrowd))
                .collect()
        })
        .collect();
    AreaRange::ALL.map(|a| Some(match_image(gt, &dets, &ious, AREA_RANGES[a.index()])))
}

/// pycocotools' greedy matching (`evaluateImg`) for one area range `(lo, hi)`; `dets` are
/// sorted best first, `ious[d][g]` in the input order of `gt`.
fn match_image(
    gt: &[&GroundTruth],
    dets: &[&Detection],
    ious: &[Vec<f64>],
    (lo, hi): (f64, f64),
) -> ImageEval {
    let out_of_range = |area: f64| area < lo || area > hi;
    let gt_ignored: Vec<bool> = gt
        .iter()
        .map(|g| g.ignore || g.iscrowd || out_of_range(g.area))
        .collect();
    // Ground truth that counts first, ignored last, each group in input order.
    let mut order: Vec<usize> = (0..gt.len()).collect();
    order.sort_by_key(|&g| gt_ignored[g]);
    let thresholds = iou_thresholds();
    let mut matched = vec![vec![false; dets.len()]; NUM_IOU];
    let mut ignored = vec![vec![false; dets.len()]; NUM_IOU];
    for (t, &thr) in thresholds.iter().enumerate() {
        let mut gt_taken = vec![false; gt.len()];
        for d in 0..dets.len() {
            let mut best_iou = thr.min(1.0 - 1e-10);
            let mut best: Option<usize> = None;
            for &g in &order {
                if gt_taken[g] && !gt[g].iscrowd {
                    continue;
                }
                if best.is_some_and(|m| !gt_ignored[m]) && gt_ignored[g] {
                    break;
                }
                if ious[d][g] < best_iou {
                    continue;
                }
                best_iou = ious[d][g];
                best = Some(g);
            }
            if let Some(m) = best {
                ignored[t][d] = gt_ignored[m];
                matched[t][d] = true;
                gt_taken[m] = true;
            }
        }
        for (d, det) in dets.iter().enumerate() {
            if !matched[t][d] && out_of_range(det.bbox.area()) {
                ignored[t][d] = true;
            }
        }
    }
    ImageEval {
        scores: dets.iter().map(|d| d.score).collect(),
        matched,
        ignored,
        num_gt: gt_ignored.iter().filter(|&&i| !i).count(),
    }
}
