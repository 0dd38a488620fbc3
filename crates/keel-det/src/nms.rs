//! Non-maximum suppression with results identical to `torchvision.ops.nms` and
//! `torchvision.ops.batched_nms` (CPU), ties included.
//!
//! # Contract
//! - `boxes (N, 4)` xyxy, `scores (N,)` in any float dtype (compared as exact f64, so
//!   ties are the dtype's own; torchvision wants the boxes' dtype), `idxs (N,)` class ids
//!   in any integer dtype; the result is the kept indices into the inputs, by decreasing
//!   score, as `Vec<u32>` (wrap it with `Tensor::new(&keep[..], device)` to gather).
//! - A box is suppressed by a kept box of higher rank when their IoU is strictly greater
//!   than `iou_threshold` (so 1.0 suppresses nothing but duplicates never, and 0.0 every
//!   overlap).
//! - Identical results: the arithmetic is torchvision's CPU kernel's, in its precision
//!   (f32 for f32 boxes, f64 for f64; f16/bf16 boxes, which that kernel does not take, are
//!   converted to f32 exactly), and so is the rank order, which decides which of two
//!   duplicate boxes with equal scores survives: the kernel sorts scores descending with a
//!   *stable* sort (current torchvision; older versions' unstable sort could keep either),
//!   so the lower index wins a tie.
//! - [`batched_nms`] takes torchvision's two CPU paths by the same rule: up to 1000 boxes
//!   the coordinate-offset trick (one NMS over boxes shifted by
//!   `class * (max coordinate + 1)`, with the same f32 rounding, so boxes with negative
//!   coordinates can interact across classes exactly as in torchvision); beyond that one
//!   NMS per class, whose kept indices are then ordered by
//!   `scores[keep].sort(descending=True)`, PyTorch's *unstable* CPU sort (libstdc++'s
//!   `std::sort`), replicated step for step so equal scores come out in the same order.
//! - Devices: NMS is sequential and its output small, so boxes and scores on a GPU are
//!   copied to the host and suppressed there (one transfer each); the result is host data.
//! - Validation before any work: shapes, lengths, a NaN score or coordinate, and a
//!   threshold outside `[0, 1]` are errors naming the op, the value and the fix.

use std::collections::BTreeMap;
use std::ops::{Add, Div, Mul, Sub};

use candle::{bail, DType, Result, Tensor};

use crate::boxes::{check_boxes, check_same_device};
use crate::sort::std_sort_by;

/// torchvision's `batched_nms` switches to one NMS per class above this many box
/// coordinates on CPU (`boxes.numel() > 4000`).
const VANILLA_ABOVE_NUMEL: usize = 4000;

/// Kept indices of greedy NMS over `boxes (N, 4)` with `scores (N,)`, by decreasing score:
/// `torchvision.ops.nms`. See the [module docs](self) for the exact semantics and devices.
///
/// ```
/// use candle::{Device, Tensor};
/// let boxes = Tensor::new(&[[0f32, 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]], &Device::Cpu)?;
/// let scores = Tensor::new(&[0.9f32, 0.8, 0.7], &Device::Cpu)?;
/// assert_eq!(keel_det::nms::nms(&boxes, &scores, 0.5)?, [0, 2]);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn nms(boxes: &Tensor, scores: &Tensor, iou_threshold: f64) -> Result<Vec<u32>> {
    let input = Input::read("nms", boxes, scores, None, iou_threshold)?;
    Ok(match &input.coords {
        Coords::F32(c) => nms_host(c, &input.scores, iou_threshold),
        Coords::F64(c) => nms_host(c, &input.scores, iou_threshold),
    }
    .into_iter()
    .map(|i| i as u32)
    .collect())
}

/// Class-aware NMS: boxes of different `idxs` (class ids, any integer dtype) never
/// suppress each other. Kept indices by decreasing score: `torchvision.ops.batched_nms`,
/// identical including its two CPU paths (see the [module docs](self)).
///
/// ```
/// use candle::{Device, Tensor};
/// let boxes = Tensor::new(&[[0f32, 0., 10., 10.], [1., 1., 10., 10.]], &Device::Cpu)?;
/// let scores = Tensor::new(&[0.9f32, 0.8], &Device::Cpu)?;
/// let classes = Tensor::new(&[0u32, 1], &Device::Cpu)?;
/// assert_eq!(keel_det::nms::batched_nms(&boxes, &scores, &classes, 0.5)?, [0, 1]);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn batched_nms(
    boxes: &Tensor,
    scores: &Tensor,
    idxs: &Tensor,
    iou_threshold: f64,
) -> Result<Vec<u32>> {
    let input = Input::read("batched_nms", boxes, scores, Some(idxs), iou_threshold)?;
    let keep = match &input.coords {
        Coords::F32(c) => batched_host(c, &input.scores, &input.idxs, iou_threshold),
        Coords::F64(c) => batched_host(c, &input.scores, &input.idxs, iou_threshold),
    };
    Ok(keep.into_iter().map(|i| i as u32).collect())
}

/// A box coordinate type torchvision's CPU kernel computes in (f32 or f64).
trait Coord:
    Copy
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Into<f64>
{
    const ZERO: Self;
    const ONE: Self;
    /// `idxs.to(boxes)`: an i64 class id rounded to the nearest value.
    fn from_class(c: i64) -> Self;
}

impl Coord for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    fn from_class(c: i64) -> f32 {
        c as f32
    }
}

impl Coord for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    fn from_class(c: i64) -> f64 {
        c as f64
    }
}

/// `std::max` (returns `a` unless `a < b`).
fn cmax<T: Coord>(a: T, b: T) -> T {
    if a < b {
        b
    } else {
        a
    }
}

/// `std::min` (returns `a` unless `b < a`).
fn cmin<T: Coord>(a: T, b: T) -> T {
    if b < a {
        b
    } else {
        a
    }
}

/// torchvision's CPU `nms_kernel_impl` on host rows: kept indices by rank.
fn nms_host<T: Coord>(boxes: &[[T; 4]], scores: &[f64], iou_threshold: f64) -> Vec<usize> {
    let areas: Vec<T> = boxes
        .iter()
        .map(|b| (b[2] - b[0]) * (b[3] - b[1]))
        .collect();
    // `scores.sort(/*stable=*/true, 0, /*descending=*/true)`: ties keep index order.
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut suppressed = vec![false; boxes.len()];
    let mut keep = Vec::new();
    for (rank, &i) in order.iter().enumerate() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let bi = boxes[i];
        for &j in &order[rank + 1..] {
            if suppressed[j] {
                continue;
            }
            let bj = boxes[j];
            let w = cmax(T::ZERO, cmin(bi[2], bj[2]) - cmax(bi[0], bj[0]));
            let h = cmax(T::ZERO, cmin(bi[3], bj[3]) - cmax(bi[1], bj[1]));
            let inter = w * h;
            let ovr = inter / (areas[i] + areas[j] - inter);
            if ovr.into() > iou_threshold {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// torchvision's `batched_nms` on host rows, both paths.
fn batched_host<T: Coord>(
    boxes: &[[T; 4]],
    scores: &[f64],
    idxs: &[i64],
    iou_threshold: f64,
) -> Vec<usize> {
    if boxes.is_empty() {
        return Vec::new();
    }
    if boxes.len() * 4 > VANILLA_ABOVE_NUMEL {
        return per_class(boxes, scores, idxs, iou_threshold);
    }
    // `_batched_nms_coordinate_trick`: offsets = idxs.to(boxes) * (boxes.max() + 1).
    let max = boxes.iter().flatten().copied().fold(boxes[0][0], cmax);
    let span = max + T::ONE;
    let shifted: Vec<[T; 4]> = boxes
        .iter()
        .zip(idxs)
        .map(|(b, &c)| {
            let off = T::from_class(c) * span;
            [b[0] + off, b[1] + off, b[2] + off, b[3] + off]
        })
        .collect();
    nms_host(&shifted, scores, iou_threshold)
}

/// `_batched_nms_vanilla`: NMS per class (classes ascending), the kept indices ascending,
/// then ordered by `scores[keep].sort(descending=True)`.
fn per_class<T: Coord>(
    boxes: &[[T; 4]],
    scores: &[f64],
    idxs: &[i64],
    iou_threshold: f64,
) -> Vec<usize> {
    let mut members: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, &c) in idxs.iter().enumerate() {
        members.entry(c).or_default().push(i);
    }
    let mut kept = vec![false; boxes.len()];
    for rows in members.values() {
        let sub_boxes: Vec<[T; 4]> = rows.iter().map(|&i| boxes[i]).collect();
        let sub_scores: Vec<f64> = rows.iter().map(|&i| scores[i]).collect();
        for k in nms_host(&sub_boxes, &sub_scores, iou_threshold) {
            kept[rows[k]] = true;
        }
    }
    let mut keep: Vec<(f64, usize)> = (0..boxes.len())
        .filter(|&i| kept[i])
        .map(|i| (scores[i], i))
        .collect();
    std_sort_by(&mut keep, |a, b| a.0 > b.0);
    keep.into_iter().map(|(_, i)| i).collect()
}

/// Box rows on the host in the kernel's precision.
enum Coords {
    F32(Vec<[f32; 4]>),
    F64(Vec<[f64; 4]>),
}

/// Validated NMS inputs, copied to the host.
struct Input {
    coords: Coords,
    /// Scores as f64 (exact for every float dtype, so order and ties are the dtype's).
    scores: Vec<f64>,
    /// Class ids (empty for plain NMS).
    idxs: Vec<i64>,
}

impl Input {
    fn read(
        op: &str,
        boxes: &Tensor,
        scores: &Tensor,
        idxs: Option<&Tensor>,
        iou_threshold: f64,
    ) -> Result<Input> {
        if !(0.0..=1.0).contains(&iou_threshold) {
            bail!("{op}: iou_threshold ({iou_threshold}) must be in [0, 1]; boxes whose IoU with a kept box exceeds it are dropped (0.5 is common)")
        }
        let n = check_boxes(op, "boxes", boxes)?;
        check_vector(op, "scores", scores, n)?;
        if !scores.dtype().is_float() {
            bail!("{op}: scores must be a float tensor, got {:?}; convert with scores.to_dtype(DType::F32)", scores.dtype())
        }
        check_same_device(op, ("boxes", boxes), ("scores", scores))?;
        let idxs = match idxs {
            Some(t) => {
                check_vector(op, "idxs", t, n)?;
                if !t.dtype().is_int() {
                    bail!("{op}: idxs (class ids) must be an integer tensor (u8, u32, i64), got {:?}; convert with idxs.to_dtype(DType::U32)", t.dtype())
                }
                check_same_device(op, ("boxes", boxes), ("idxs", t))?;
                t.to_dtype(DType::I64)?.to_vec1::<i64>()?
            }
            None => Vec::new(),
        };
        let scores = scores.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        if let Some(i) = scores.iter().position(|s| s.is_nan()) {
            bail!("{op}: scores[{i}] is NaN; NMS needs ordered scores: drop or replace NaN scores (e.g. the detections of a diverged model) before NMS")
        }
        let coords = if boxes.dtype() == DType::F64 {
            Coords::F64(rows(op, boxes.to_vec2::<f64>()?)?)
        } else {
            Coords::F32(rows(op, boxes.to_dtype(DType::F32)?.to_vec2::<f32>()?)?)
        };
        Ok(Input {
            coords,
            scores,
            idxs,
        })
    }
}

fn check_vector(op: &str, name: &str, t: &Tensor, n: usize) -> Result<()> {
    if t.dims() != [n] {
        bail!("{op}: {name} must have shape ({n},), one per box, got {:?}; flatten a (N, 1) tensor with {name}.flatten_all()", t.dims())
    }
    Ok(())
}

/// The `(N, 4)` rows as arrays, rejecting NaN coordinates.
fn rows<T: Coord>(op: &str, rows: Vec<Vec<T>>) -> Result<Vec<[T; 4]>> {
    rows.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let b = [r[0], r[1], r[2], r[3]];
            if b.iter().any(|&v| v.into().is_nan()) {
                let b: Vec<f64> = b.iter().map(|&v| v.into()).collect();
                bail!("{op}: boxes[{i}] = {b:?} has a NaN coordinate; drop or fix the box (a diverged box regression) before NMS")
            }
            Ok(b)
        })
        .collect()
}
