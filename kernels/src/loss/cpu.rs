//! The fused cross-entropy CPU ops: forward (log-softmax and pick in one pass per position)
//! and backward (`softmax - onehot`, scaled, in one pass). See the parent module's contract.

use super::{bad_target, CeDims};
use crate::cpu::{contiguous, float_op, Elem, FloatOp};
use candle::backend::BackendStorage;
use candle::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::Arc;

/// Positions per task: a tile of `TILE` positions of one sample is read class by class, so
/// each class row is a contiguous run of `TILE` values.
const TILE: usize = 256;

/// Forward op on `(logits, target)` returning the f32 scalar loss.
#[derive(Clone, Debug)]
pub(crate) struct CrossEntropyOp {
    pub(crate) dims: CeDims,
    pub(crate) ignore_index: Option<i64>,
    pub(crate) weight: Option<Arc<Vec<f32>>>,
}

/// Backward op on `(logits, target, dloss)` returning dlogits in the logits' dtype.
#[derive(Clone, Debug)]
pub(crate) struct CrossEntropyBwdOp {
    fwd: CrossEntropyOp,
}

/// The targets as i64, validated against `[0, C)` / ignore_index.
fn targets(op: &str, s: &CpuStorage, l: &Layout, f: &CrossEntropyOp) -> Result<Vec<i64>> {
    let t: Vec<i64> = match s {
        CpuStorage::U8(v) => contiguous(op, "target", v, l)?
            .iter()
            .map(|&x| x as i64)
            .collect(),
        CpuStorage::U32(v) => contiguous(op, "target", v, l)?
            .iter()
            .map(|&x| x as i64)
            .collect(),
        CpuStorage::I64(v) => contiguous(op, "target", v, l)?.to_vec(),
        other => bail!(
            "{op}: unsupported target dtype {:?}; supported: u8, u32, i64",
            other.dtype()
        ),
    };
    let c = f.dims.c as i64;
    let expected = f.dims.n * f.dims.spatial;
    if t.len() != expected {
        bail!(
            "{op}: target has {} values, expected {expected} (N * spatial)",
            t.len()
        )
    }
    if let Some((pos, &v)) = t
        .iter()
        .enumerate()
        .find(|&(_, &v)| (v < 0 || v >= c) && Some(v) != f.ignore_index)
    {
        return Err(bad_target(op, v, pos, f.dims.c, f.ignore_index));
    }
    Ok(t)
}

impl CrossEntropyOp {
    /// The weight of target `t`, 0 for ignored positions.
    fn w(&self, t: i64) -> f32 {
        if Some(t) == self.ignore_index {
            return 0.0;
        }
        self.weight.as_ref().map_or(1.0, |w| w[t as usize])
    }

    /// `sum_i w[t_i]` in f64, and whether any position is kept.
    fn denominator(&self, t: &[i64]) -> (f64, bool) {
        let kept = t.iter().any(|&v| Some(v) != self.ignore_index);
        (t.iter().map(|&v| self.w(v) as f64).sum(), kept)
    }

    /// Every tile of positions as `(sample, first_position, len)`.
    fn tiles(&self) -> Vec<(usize, usize, usize)> {
        let CeDims { n, spatial, .. } = self.dims;
        let per = spatial.div_ceil(TILE);
        (0..n * per)
            .map(|k| {
                let (s0, len) = ((k % per) * TILE, TILE.min(spatial - (k % per) * TILE));
                (k / per, s0, len)
            })
            .collect()
    }

    /// For one tile: `lse[j] = logsumexp_c x[c, s0 + j]` in f32 (max-shifted).
    fn logsumexp<T: WithDType>(&self, x: &[T], n: usize, s0: usize, lse: &mut [f32]) {
        let CeDims { c, spatial, .. } = self.dims;
        let base = n * c * spatial + s0;
        let len = lse.len();
        let mut max = vec![f32::NEG_INFINITY; len];
        for k in 0..c {
            let row = &x[base + k * spatial..base + k * spatial + len];
            for (m, v) in max.iter_mut().zip(row) {
                *m = m.max(v.to_f64() as f32);
            }
        }
        let mut sum = vec![0f32; len];
        for k in 0..c {
            let row = &x[base + k * spatial..base + k * spatial + len];
            for ((s, v), m) in sum.iter_mut().zip(row).zip(&max) {
                *s += (v.to_f64() as f32 - m).exp();
            }
        }
        for ((l, s), m) in lse.iter_mut().zip(&sum).zip(&max) {
            *l = m + s.ln();
        }
    }

    fn forward<T: WithDType>(&self, x: &[T], t: &[i64]) -> f32 {
        let CeDims { c, spatial, .. } = self.dims;
        let (den, kept) = self.denominator(t);
        let num: f64 = self
            .tiles()
            .into_par_iter()
            .map(|(n, s0, len)| {
                let mut lse = vec![0f32; len];
                self.logsumexp(x, n, s0, &mut lse);
                let mut acc = 0f64;
                for (j, l) in lse.iter().enumerate() {
                    let ti = t[n * spatial + s0 + j];
                    if Some(ti) == self.ignore_index {
                        continue;
                    }
                    let pick = x[n * c * spatial + ti as usize * spatial + s0 + j].to_f64() as f32;
                    acc += self.w(ti) as f64 * (l - pick) as f64;
                }
                acc
            })
            .sum();
        if !kept {
            return f32::NAN;
        }
        (num / den) as f32
    }

    /// dlogits for the upstream gradient `g`, in the logits' element type.
    fn backward<T: WithDType>(&self, x: &[T], t: &[i64], g: f32) -> Vec<T> {
        let CeDims { n, c, spatial } = self.dims;
        let (den, kept) = self.denominator(t);
        let mut dx = vec![T::from_f64(0.0); n * c * spatial];
        if !kept {
            return dx;
        }
        let scale = g as f64 / den;
        // One sample's block at a time, its tiles in sequence (blocks are disjoint).
        dx.par_chunks_mut(c * spatial.max(1))
            .enumerate()
            .for_each(|(ni, block)| {
                let mut lse = vec![0f32; TILE];
                for s0 in (0..spatial).step_by(TILE) {
                    let len = TILE.min(spatial - s0);
                    self.logsumexp(x, ni, s0, &mut lse[..len]);
                    for j in 0..len {
                        let ti = t[ni * spatial + s0 + j];
                        if Some(ti) == self.ignore_index {
                            continue;
                        }
                        let f = (scale * self.w(ti) as f64) as f32;
                        for k in 0..c {
                            let off = k * spatial + s0 + j;
                            let p = (x[ni * c * spatial + off].to_f64() as f32 - lse[j]).exp();
                            let onehot = if k as i64 == ti { 1.0 } else { 0.0 };
                            block[off] = T::from_f64((f * (p - onehot)) as f64);
                        }
                    }
                }
            });
        dx
    }
}

/// One CPU cross-entropy call on the logits, for any float element type: the f32 scalar
/// loss, or with `backward: Some(dloss)` dlogits in the logits' dtype.
struct CpuCall<'a> {
    op: &'a CrossEntropyOp,
    t: &'a [i64],
    backward: Option<f32>,
}

impl FloatOp<1> for CpuCall<'_> {
    fn run<T: Elem + WithDType>(&self, [x]: [&[T]; 1]) -> Result<CpuStorage> {
        Ok(match self.backward {
            Some(g) => T::to_cpu_storage_owned(self.op.backward(x, self.t, g)),
            None => CpuStorage::F32(vec![self.op.forward(x, self.t)]),
        })
    }
}

impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "keel-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        const OP: &str = "cross_entropy";
        let t = targets(OP, s2, l2, self)?;
        let call = CpuCall {
            op: self,
            t: &t,
            backward: None,
        };
        let loss = float_op(OP, [("logits", s1, l1)], &call)?;
        Ok((loss, Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        target: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = CrossEntropyBwdOp { fwd: self.clone() };
        let g = grad.to_dtype(candle::DType::F32)?;
        Ok((Some(logits.apply_op3(target, &g, op)?), None))
    }
}

impl CustomOp3 for CrossEntropyBwdOp {
    fn name(&self) -> &'static str {
        "keel-cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        const OP: &str = "cross_entropy backward";
        let t = targets(OP, s2, l2, &self.fwd)?;
        let g = match s3 {
            CpuStorage::F32(g) => match contiguous(OP, "loss gradient", g, l3)? {
                [g] => *g,
                other => bail!(
                    "{OP}: the loss gradient must be a scalar, got {} values",
                    other.len()
                ),
            },
            other => bail!(
                "{OP}: the loss gradient must be f32, got {:?}",
                other.dtype()
            ),
        };
        let call = CpuCall {
            op: &self.fwd,
            t: &t,
            backward: Some(g),
        };
        let out = float_op(OP, [("logits", s1, l1)], &call)?;
        Ok((out, l1.shape().clone()))
    }
}
