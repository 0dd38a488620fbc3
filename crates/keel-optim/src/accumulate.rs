//! Gradient accumulation: `k` micro-batches make one optimizer step, so a small-memory
//! run reaches the effective batch of a large one (Goyal et al. 2017).

use candle::backprop::GradStore;
use candle::Tensor;

/// Sums the `GradStore`s of `k` micro-batches and hands the total back on the `k`-th.
///
/// Scale each micro-batch loss with [`GradAccumulator::scale_loss`] (divides by `k`), so
/// that `k` micro-batches with a mean loss give the gradient of one batch of `k` times
/// the size (exactly, for models without batch statistics).
///
/// ```
/// use candle::{Device, Var};
/// use keel_optim::GradAccumulator;
/// let w = Var::new(&[1f32], &Device::Cpu)?;
/// let mut acc = GradAccumulator::new(2)?;
/// let g1 = acc.scale_loss(&(w.as_tensor() * 3.0)?.sum_all()?)?.backward()?;
/// assert!(acc.accumulate(g1)?.is_none());
/// let g2 = acc.scale_loss(&(w.as_tensor() * 5.0)?.sum_all()?)?.backward()?;
/// let total = acc.accumulate(g2)?.expect("second of two micro-batches");
/// assert_eq!(total.get(&w).unwrap().to_vec1::<f32>()?, vec![4.0]); // (3 + 5) / 2
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Debug)]
pub struct GradAccumulator {
    k: usize,
    seen: usize,
    sum: Option<GradStore>,
}

impl GradAccumulator {
    /// An accumulator over `k` micro-batches; errors when `k == 0`.
    pub fn new(k: usize) -> candle::Result<Self> {
        if k == 0 {
            candle::bail!("GradAccumulator: k (0) must be at least 1; pass the number of micro-batches per step")
        }
        Ok(Self {
            k,
            seen: 0,
            sum: None,
        })
    }

    /// The number of micro-batches per optimizer step.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Micro-batches accumulated since the last completed step.
    pub fn pending(&self) -> usize {
        self.seen
    }

    /// `loss / k`.
    pub fn scale_loss(&self, loss: &Tensor) -> candle::Result<Tensor> {
        loss.affine(1.0 / self.k as f64, 0.0)
    }

    /// Adds one micro-batch's gradients; returns the summed store after the `k`-th.
    pub fn accumulate(&mut self, grads: GradStore) -> candle::Result<Option<GradStore>> {
        match self.sum.as_mut() {
            None => self.sum = Some(grads),
            Some(sum) => sum.extend(grads)?,
        }
        self.seen += 1;
        if self.seen < self.k {
            return Ok(None);
        }
        self.seen = 0;
        Ok(self.sum.take())
    }

    /// Drops any partial accumulation (e.g. after an overflowing micro-batch).
    pub fn reset(&mut self) {
        self.seen = 0;
        self.sum = None;
    }
}
