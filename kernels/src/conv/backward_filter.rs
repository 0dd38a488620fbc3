//! conv2d backward-filter: `dw` from `(x, dy)` as a `CustomOp2` (no backward of its own).
//!
//! CPU: `dw_g += dy_{n,g} @ im2col(x_{n,g})^T` on output-row tiles, summed over samples:
//! rayon over groups when there are many (depthwise), else over sample ranges with
//! per-thread partial sums, else one sequential pass with a parallel GEMM (batch 1).

use super::forward::expect_dims;
use super::{cpu, Geom};
use candle::{CpuStorage, CustomOp2, Layout, Result, Shape};

/// Backward-filter op on contiguous `(x, dy)`, returning dw of the weight's shape.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvBwdFilterOp {
    pub(crate) geom: Geom,
}

impl CustomOp2 for ConvBwdFilterOp {
    fn name(&self) -> &'static str {
        "conv2d_backward_filter"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (op, g) = (self.name(), &self.geom);
        expect_dims(op, "x", l1, &g.x_dims())?;
        expect_dims(op, "dy", l2, &g.y_dims())?;
        cpu::same_dtype(op, s1, s2)?;
        let x = cpu::as_f32(op, "x", s1, l1)?;
        let dy = cpu::as_f32(op, "dy", s2, l2)?;
        let dw = cpu::backward_filter(g, &x, &dy);
        Ok((cpu::wrap(s1, dw), Shape::from(&g.w_dims()[..])))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let (op, g) = (self.name(), &self.geom);
        expect_dims(op, "x", l1, &g.x_dims())?;
        expect_dims(op, "dy", l2, &g.y_dims())?;
        crate::cuda::conv::run(crate::cuda::conv::Kind::BackwardFilter, g, s1, l1, s2, l2)
    }
}
