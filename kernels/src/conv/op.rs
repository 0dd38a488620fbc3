//! The three conv2d ops as one `CustomOp2` with a [`Kind`]: forward `(x, w) -> y`,
//! backward-data `(dy, w) -> dx` and backward-filter `(x, dy) -> dw`. Only the forward has a
//! backward (it runs the other two); they have none (no double backward).
//!
//! CPU kernels (`super::cpu`): forward is im2col on output-row tiles + GEMM; backward-data is
//! `dcol = w^T @ dy` + col2im (a 1x1 stride-1 unpadded conv writes the GEMM straight into
//! dx); backward-filter is `dw_g += dy_{n,g} @ im2col(x_{n,g})^T` summed over samples (rayon
//! over groups when there are many; for a large `dw` (>= 4 MiB per group and >= 64 output
//! channels per thread) over blocks of its
//! rows, with tiles of several samples when the images are small; else over sample ranges
//! with per-thread partial sums; else one pass with a parallel GEMM at batch 1). Its im2col
//! buffer has a padded row stride (see `cpu::padded_ld`).

use super::{cpu, Geom};
use crate::cpu::{float_op, Elem, FloatOp};
use candle::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};

/// Which of the three convolutions an op runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// `(x, w) -> y`.
    Forward,
    /// `(dy, w) -> dx`.
    BackwardData,
    /// `(x, dy) -> dw`.
    BackwardFilter,
}

/// A conv2d op on contiguous operands for the validated geometry `geom`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvOp {
    pub(crate) geom: Geom,
    pub(crate) kind: Kind,
}

impl ConvOp {
    /// The operands' names and shapes, and the output's shape.
    fn dims(&self) -> ([(&'static str, [usize; 4]); 2], [usize; 4]) {
        let g = &self.geom;
        match self.kind {
            Kind::Forward => ([("x", g.x_dims()), ("weight", g.w_dims())], g.y_dims()),
            Kind::BackwardData => ([("dy", g.y_dims()), ("weight", g.w_dims())], g.x_dims()),
            Kind::BackwardFilter => ([("x", g.x_dims()), ("dy", g.y_dims())], g.w_dims()),
        }
    }

    /// Re-checks that the operand shapes are the ones the geometry was validated for (the
    /// ops are crate-internal, so this guards against crate bugs with an error, not a
    /// panic), and returns the operand names and the output shape.
    fn check(&self, l1: &Layout, l2: &Layout) -> Result<([&'static str; 2], Shape)> {
        let (operands, out) = self.dims();
        for ((what, want), l) in operands.iter().zip([l1, l2]) {
            if l.shape().dims() != want {
                bail!(
                    "{}: {what} has shape {:?}, expected {want:?}",
                    self.name(),
                    l.shape().dims()
                )
            }
        }
        Ok(([operands[0].0, operands[1].0], Shape::from(&out[..])))
    }
}

/// The CPU kernels compute in `f32`: f16/bf16 operands are converted once and the output is
/// rounded once to the operands' dtype.
impl FloatOp<2> for ConvOp {
    fn run<T: Elem + WithDType>(&self, [a, b]: [&[T]; 2]) -> Result<CpuStorage> {
        let (a, b) = (T::to_f32_slice(a), T::to_f32_slice(b));
        let g = &self.geom;
        let out = match self.kind {
            Kind::Forward => cpu::forward(g, &a, &b),
            Kind::BackwardData => cpu::backward_data(g, &a, &b),
            Kind::BackwardFilter => cpu::backward_filter(g, &a, &b),
        };
        Ok(T::to_cpu_storage_owned(T::from_f32_vec(out)))
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Forward => "conv2d",
            Kind::BackwardData => "conv2d_backward_data",
            Kind::BackwardFilter => "conv2d_backward_filter",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let ([n1, n2], shape) = self.check(l1, l2)?;
        let out = float_op(op, [(n1, s1, l1), (n2, s2, l2)], self)?;
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.check(l1, l2)?;
        crate::cuda::conv::run(self.kind, &self.geom, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.kind != Kind::Forward {
            return Err(candle::Error::BackwardNotSupported { op: self.name() });
        }
        let geom = self.geom;
        let dy = grad_res.contiguous()?;
        let dx = dy.apply_op2(
            w,
            ConvOp {
                geom,
                kind: Kind::BackwardData,
            },
        )?;
        let dw = x.apply_op2(
            &dy,
            ConvOp {
                geom,
                kind: Kind::BackwardFilter,
            },
        )?;
        Ok((Some(dx), Some(dw)))
    }
}
