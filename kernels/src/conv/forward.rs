//! The conv2d forward op, `CustomOp2` on `(x, w)`; its `bwd` runs the dedicated
//! backward-data and backward-filter ops (see the `conv` module docs for the contract).

use super::backward_data::ConvBwdDataOp;
use super::backward_filter::ConvBwdFilterOp;
use super::{cpu, Geom};
use candle::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Forward op on contiguous `(x, w)` for the validated geometry `geom`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvFwdOp {
    pub(crate) geom: Geom,
}

/// Re-checks that an op's operand shapes are the ones its geometry was validated for (the
/// ops are crate-internal, so this guards against crate bugs with an error, not a panic).
pub(super) fn expect_dims(op: &str, what: &str, l: &Layout, want: &[usize]) -> Result<()> {
    if l.shape().dims() != want {
        bail!(
            "{op}: {what} has shape {:?}, expected {want:?}",
            l.shape().dims()
        )
    }
    Ok(())
}

impl CustomOp2 for ConvFwdOp {
    fn name(&self) -> &'static str {
        "conv2d"
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
        expect_dims(op, "weight", l2, &g.w_dims())?;
        cpu::same_dtype(op, s1, s2)?;
        let x = cpu::as_f32(op, "x", s1, l1)?;
        let w = cpu::as_f32(op, "weight", s2, l2)?;
        let y = cpu::forward(g, &x, &w);
        Ok((cpu::wrap(s1, y), Shape::from(&g.y_dims()[..])))
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
        expect_dims(op, "weight", l2, &g.w_dims())?;
        crate::cuda::conv::run(crate::cuda::conv::Kind::Forward, g, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = grad_res.contiguous()?;
        let dx = dy.apply_op2(w, ConvBwdDataOp { geom: self.geom })?;
        let dw = x.apply_op2(&dy, ConvBwdFilterOp { geom: self.geom })?;
        Ok((Some(dx), Some(dw)))
    }
}
