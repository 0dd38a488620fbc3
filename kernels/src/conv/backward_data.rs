//! conv2d backward-data: `dx` from `(dy, w)` as a `CustomOp2` (no backward of its own).
//!
//! CPU: per `(sample, group)`, `dcol = w^T @ dy` on output-row tiles, then col2im adds each
//! tile into dx (a 1x1 stride-1 unpadded conv writes the GEMM straight into dx).

use super::forward::expect_dims;
use super::{cpu, Geom};
use candle::{CpuStorage, CustomOp2, Layout, Result, Shape};

/// Backward-data op on contiguous `(dy, w)`, returning dx of x's shape.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvBwdDataOp {
    pub(crate) geom: Geom,
}

impl CustomOp2 for ConvBwdDataOp {
    fn name(&self) -> &'static str {
        "conv2d_backward_data"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (op, g) = (self.name(), &self.geom);
        expect_dims(op, "dy", l1, &g.y_dims())?;
        expect_dims(op, "weight", l2, &g.w_dims())?;
        cpu::same_dtype(op, s1, s2)?;
        let dy = cpu::as_f32(op, "dy", s1, l1)?;
        let w = cpu::as_f32(op, "weight", s2, l2)?;
        let dx = cpu::backward_data(g, &dy, &w);
        Ok((cpu::wrap(s1, dx), Shape::from(&g.x_dims()[..])))
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
        expect_dims(op, "dy", l1, &g.y_dims())?;
        expect_dims(op, "weight", l2, &g.w_dims())?;
        crate::cuda::conv::run(crate::cuda::conv::Kind::BackwardData, g, s1, l1, s2, l2)
    }
}
