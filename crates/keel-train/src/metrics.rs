//! Semantic-segmentation metrics from a confusion matrix: per-class IoU, mIoU and pixel
//! accuracy, as in the PASCAL VOC and Cityscapes benchmarks (IoU = TP / (TP + FP + FN),
//! Everingham et al. 2010) and mmsegmentation's `intersect_and_union`.
use candle::{DType, Device, Tensor};

/// A `num_classes x num_classes` confusion matrix accumulated over evaluation batches.
///
/// Rows are the target (ground-truth) class, columns the predicted class. Pixels whose target
/// equals the ignore index (255 in Pascal VOC) are skipped.
///
/// ```
/// use candle::{Device, Tensor};
/// use keel_train::ConfusionMatrix;
/// # fn main() -> candle::Result<()> {
/// let mut cm = ConfusionMatrix::new(3, Some(255))?;
/// let target = Tensor::new(&[[0u8, 0, 1, 2], [2, 2, 255, 1]], &Device::Cpu)?;
/// let pred = Tensor::new(&[[0u8, 1, 1, 2], [2, 0, 2, 1]], &Device::Cpu)?;
/// cm.update(&pred, &target)?;
/// assert_eq!(cm.counts()[0], 1); // target 0, predicted 0
/// let iou = cm.iou();
/// assert_eq!(iou[1], Some(2.0 / 3.0)); // TP 2, FP 1 (a 0 predicted as 1), FN 0
/// assert!((cm.pixel_accuracy() - 5.0 / 7.0).abs() < 1e-12);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfusionMatrix {
    num_classes: usize,
    ignore_index: Option<u32>,
    counts: Vec<u64>,
}

/// The metrics of one evaluation (from a [`ConfusionMatrix`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SegEval {
    /// Mean IoU over the classes present.
    pub miou: f64,
    /// Pixel accuracy.
    pub pixel_acc: f64,
    /// Per-class IoU (`None` for a class absent from the set).
    pub iou: Vec<Option<f64>>,
}

impl SegEval {
    /// The metrics of weights that are not a model (non-finite): NaN mIoU and pixel
    /// accuracy, no class IoU (the argmax of NaN logits would score a few percent mIoU).
    pub fn nan(num_classes: usize) -> Self {
        Self {
            miou: f64::NAN,
            pixel_acc: f64::NAN,
            iou: vec![None; num_classes],
        }
    }

    /// Evaluates a segmentation model: `forward` maps each batch's images to logits
    /// `(B, num_classes, H, W)`, whose argmax is scored against the batch's targets
    /// `(B, H, W)`, pixels of `ignore_index` skipped.
    ///
    /// ```
    /// use candle::{Device, Tensor};
    /// let x = Tensor::zeros((1, 2, 1, 2), candle::DType::F32, &Device::Cpu)?;
    /// let t = Tensor::new(&[[[1u32, 255]]], &Device::Cpu)?;
    /// let logits = |_: &Tensor| Tensor::new(&[[[[0f32, 0.0]], [[1.0, 1.0]]]], &Device::Cpu);
    /// let e = keel_train::SegEval::evaluate([Ok((x, t))], 2, Some(255), logits)?;
    /// assert_eq!((e.miou, e.pixel_acc, e.iou), (1.0, 1.0, vec![None, Some(1.0)]));
    /// # Ok::<(), candle::Error>(())
    /// ```
    pub fn evaluate(
        batches: impl IntoIterator<Item = candle::Result<(Tensor, Tensor)>>,
        num_classes: usize,
        ignore_index: Option<u32>,
        mut forward: impl FnMut(&Tensor) -> candle::Result<Tensor>,
    ) -> candle::Result<Self> {
        let mut cm = ConfusionMatrix::new(num_classes, ignore_index)?;
        for b in batches {
            let (x, t) = b?;
            cm.update(&forward(&x)?.argmax(1)?, &t)?;
        }
        Ok(Self {
            miou: cm.miou(),
            pixel_acc: cm.pixel_accuracy(),
            iou: cm.iou(),
        })
    }
}

/// The largest class count accepted: the matrix has `num_classes^2` cells.
const MAX_CLASSES: usize = 65_536;

impl ConfusionMatrix {
    /// An empty matrix for `num_classes` classes (1..=65536). `ignore_index` marks target
    /// pixels to skip (e.g. `Some(255)` for Pascal VOC's boundary pixels).
    pub fn new(num_classes: usize, ignore_index: Option<u32>) -> candle::Result<Self> {
        if num_classes == 0 || num_classes > MAX_CLASSES {
            candle::bail!(
                "ConfusionMatrix: num_classes must be in 1..={MAX_CLASSES}, got {num_classes}"
            )
        }
        Ok(Self {
            num_classes,
            ignore_index,
            counts: vec![0; num_classes * num_classes],
        })
    }

    /// Adds a batch. `pred` and `target` have the same shape (any rank, e.g. `(B, H, W)`) and
    /// hold integer class ids (U8, U32 or I64 tensors, on any device; take the `argmax` of
    /// the logits first).
    ///
    /// Pixels whose target equals the ignore index are skipped. A target id `>= num_classes`
    /// that is not the ignore index, a negative id or a predicted id `>= num_classes` is an
    /// error naming the value; on error the matrix is left unchanged.
    pub fn update(&mut self, pred: &Tensor, target: &Tensor) -> candle::Result<()> {
        if pred.dims() != target.dims() {
            candle::bail!(
                "ConfusionMatrix::update: pred shape {:?} and target shape {:?} differ",
                pred.dims(),
                target.dims()
            )
        }
        let pred = class_ids(pred, "pred")?;
        let target = class_ids(target, "target")?;
        let n = self.num_classes as i64;
        let ignore = self.ignore_index.map(i64::from);
        // Validate the whole batch first so that a bad id leaves the matrix untouched.
        let mut cells = Vec::with_capacity(target.len());
        for (i, (&p, &t)) in pred.iter().zip(target.iter()).enumerate() {
            if Some(t) == ignore {
                continue;
            }
            if t < 0 || t >= n {
                candle::bail!(
                    "ConfusionMatrix::update: target class id {t} at flat index {i} is outside \
                     0..{n}{}",
                    match self.ignore_index {
                        Some(ig) => format!(" and is not the ignore index {ig}"),
                        None => " (no ignore index set)".to_string(),
                    }
                )
            }
            if p < 0 || p >= n {
                candle::bail!(
                    "ConfusionMatrix::update: predicted class id {p} at flat index {i} is \
                     outside 0..{n}"
                )
            }
            cells.push(t as usize * self.num_classes + p as usize);
        }
        for c in cells {
            self.counts[c] += 1;
        }
        Ok(())
    }

    /// Per-class intersection over union, TP / (TP + FP + FN); `None` for a class absent from
    /// both the predictions and the targets seen so far.
    pub fn iou(&self) -> Vec<Option<f64>> {
        let n = self.num_classes;
        (0..n)
            .map(|c| {
                let tp = self.counts[c * n + c];
                let row: u64 = self.counts[c * n..(c + 1) * n].iter().sum();
                let col: u64 = (0..n).map(|r| self.counts[r * n + c]).sum();
                let union = row + col - tp;
                (union > 0).then(|| tp as f64 / union as f64)
            })
            .collect()
    }

    /// Mean IoU over the classes that have an IoU (see [`ConfusionMatrix::iou`]); 0.0 when
    /// no pixel has been counted.
    pub fn miou(&self) -> f64 {
        let present: Vec<f64> = self.iou().into_iter().flatten().collect();
        if present.is_empty() {
            0.0
        } else {
            present.iter().sum::<f64>() / present.len() as f64
        }
    }

    /// Correctly classified pixels over counted pixels (ignored pixels excluded); 0.0 when no
    /// pixel has been counted.
    pub fn pixel_accuracy(&self) -> f64 {
        let n = self.num_classes;
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let correct: u64 = (0..n).map(|c| self.counts[c * n + c]).sum();
        correct as f64 / total as f64
    }

    /// The raw counts, row-major `num_classes x num_classes`, row = target class,
    /// column = predicted class.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// The number of classes.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The ignore index given to [`ConfusionMatrix::new`].
    pub fn ignore_index(&self) -> Option<u32> {
        self.ignore_index
    }

    /// Zeroes every count (e.g. before the next evaluation).
    pub fn reset(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
    }
}

/// The ids of an integer tensor as i64, copied to the CPU.
fn class_ids(t: &Tensor, what: &str) -> candle::Result<Vec<i64>> {
    let flat = t.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(match t.dtype() {
        DType::U8 => flat.to_vec1::<u8>()?.into_iter().map(i64::from).collect(),
        DType::U32 => flat.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::I64 => flat.to_vec1::<i64>()?,
        dt => candle::bail!(
            "ConfusionMatrix::update: {what} must hold integer class ids (U8, U32 or I64), \
             got {dt:?}; take the argmax of the logits and/or cast with to_dtype(DType::U32)"
        ),
    })
}
