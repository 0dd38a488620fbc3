//! conv2d backward composed from candle tensor ops: the CUDA path without keel's `cudnn`
//! feature (and a CPU-testable twin of the dedicated kernels).
//!
//! - dx: dy is zero-inserted (stride s -> s - 1 zeros between elements), fully padded by
//!   `d (k - 1)` per dimension and convolved with the flipped, group-transposed kernel at
//!   dilation d; the result covers the padded rows and columns the forward read, and is
//!   cropped by the padding and zero-extended to `(H, W)` **per dimension**. candle 0.11.1's
//!   own backward instead reuses the height's `out_padding` for the width, which fails for
//!   e.g. a 7x8 input at stride 2.
//! - dw: a grouped convolution of transposed views, `conv(x viewed as (C_in/G, G*N, H, W),
//!   dy viewed as (C_out, N, H_out, W_out), stride d, dilation s, groups G)`, cropped to the
//!   kernel size.
//!
//! The forward ([`fallback_forward`]) is candle's conv2d (correct for every size); a
//! `CustomOp3` on `(x, w, y)` then returns a copy of y and attaches this backward.

use super::Geom;
use candle::backend::BackendStorage;
use candle::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `t` with `s - 1` zeros inserted between consecutive elements of dimension `dim`.
fn zero_insert(t: &Tensor, dim: usize, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(t.clone());
    }
    let len = t.dim(dim)?;
    let mut dims = t.dims().to_vec();
    dims[dim] = len * s;
    t.unsqueeze(dim + 1)?
        .pad_with_zeros(dim + 1, 0, s - 1)?
        .reshape(dims)?
        .narrow(dim, 0, (len - 1) * s + 1)
}

/// `t` reversed along dimension `dim`.
fn flip(t: &Tensor, dim: usize) -> Result<Tensor> {
    let len = t.dim(dim)?;
    let idx: Vec<u32> = (0..len as u32).rev().collect();
    t.index_select(&Tensor::new(idx, t.device())?, dim)
}

/// Crops `t`'s dimension `dim` (padded coordinates) to the input's `[p, p + len)`,
/// zero-extending where the forward never read.
fn crop(t: &Tensor, dim: usize, p: usize, len: usize) -> Result<Tensor> {
    let have = t.dim(dim)?;
    let t = if have < p + len {
        t.pad_with_zeros(dim, 0, p + len - have)?
    } else {
        t.clone()
    };
    t.narrow(dim, p, len)
}

/// dx of the convolution `g` from dy and w, composed from candle ops.
pub(crate) fn backward_data(g: &Geom, dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (d, p) = (g.dilation, g.padding);
    let dyd = zero_insert(&zero_insert(dy, 2, g.stride)?, 3, g.stride)?;
    let dyp = dyd
        .pad_with_zeros(2, d * (g.kh - 1), d * (g.kh - 1))?
        .pad_with_zeros(3, d * (g.kw - 1), d * (g.kw - 1))?;
    let wt = w
        .reshape((g.groups, g.og(), g.cg(), g.kh, g.kw))?
        .transpose(1, 2)?
        .reshape((g.c_in, g.og(), g.kh, g.kw))?;
    let wt = flip(&flip(&wt, 2)?, 3)?.contiguous()?;
    let full = dyp.contiguous()?.conv2d(&wt, 0, 1, d, g.groups)?;
    crop(&crop(&full, 2, p, g.h)?, 3, p, g.w)
}

/// dw of the convolution `g` from x and dy, composed from candle ops.
pub(crate) fn backward_filter(g: &Geom, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let xt = x
        .reshape((g.n, g.groups, g.cg(), g.h, g.w))?
        .permute((2, 1, 0, 3, 4))?
        .reshape((g.cg(), g.groups * g.n, g.h, g.w))?;
    let dyt = dy
        .reshape((g.n, g.groups, g.og(), g.oh, g.ow))?
        .permute((1, 2, 0, 3, 4))?
        .reshape((g.c_out, g.n, g.oh, g.ow))?;
    let full = xt.conv2d(&dyt, g.padding, g.dilation, g.stride, g.groups)?;
    full.narrow(2, 0, g.kh)?
        .narrow(3, 0, g.kw)?
        .transpose(0, 1)?
        .contiguous()
}

/// Forward with candle's conv2d and the composed backward attached (see the module docs).
pub(crate) fn fallback_forward(x: &Tensor, w: &Tensor, g: Geom) -> Result<Tensor> {
    if g.n == 0 {
        bail!("conv2d: the CUDA path without the `cudnn` feature needs a batch of at least 1, got x {:?}", g.x_dims())
    }
    let y = x
        .detach()
        .conv2d(&w.detach(), g.padding, g.stride, g.dilation, g.groups)?
        .contiguous()?;
    x.apply_op3(w, &y, FallbackOp { geom: g })
}

/// `(x, w, y) -> copy of y`, with the composed backward for x and w.
#[derive(Clone, Copy, Debug)]
struct FallbackOp {
    geom: Geom,
}

fn copy_of<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
    match l.contiguous_offsets() {
        Some((0, n)) if n == l.shape().elem_count() => Ok((s.try_clone(l)?, l.shape().clone())),
        _ => bail!("conv2d (composed): y must be contiguous from offset 0 (layout {l:?})"),
    }
}

impl CustomOp3 for FallbackOp {
    fn name(&self) -> &'static str {
        "conv2d_composed"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_of(s3, l3)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle::CudaStorage,
        _: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
        s3: &candle::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        copy_of(s3, l3)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = &self.geom;
        // f16/bf16: compose in f32 (candle's half convs accumulate in the half type).
        let dt = x.dtype();
        let up = |t: &Tensor| t.to_dtype(DType::F32);
        let dy = up(grad_res)?.contiguous()?;
        let dx = backward_data(g, &dy, &up(w)?)?.to_dtype(dt)?;
        let dw = backward_filter(g, &up(x)?, &dy)?.to_dtype(dt)?;
        Ok((Some(dx), Some(dw), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::Conv2dParams;
    use candle::{Device, Var};

    /// The composed path (what CUDA without `cudnn` runs) agrees with the CPU kernels,
    /// including the per-dimension cases candle's backward gets wrong.
    #[test]
    fn composed_backward_matches_kernels() -> Result<()> {
        let dev = Device::Cpu;
        // (x shape, C_out, kh, kw, stride, padding, dilation, groups)
        let cases = [
            ([2, 3, 7, 8], 4, 3, 3, 2, 1, 1, 1),
            ([1, 4, 9, 10], 8, 3, 3, 2, 1, 1, 4),
            ([2, 6, 8, 7], 6, 3, 3, 1, 1, 1, 6),
            ([2, 4, 10, 9], 6, 3, 3, 1, 2, 2, 1),
            ([2, 6, 5, 5], 5, 1, 1, 1, 1, 1, 1),
            ([1, 3, 15, 13], 8, 7, 5, 3, 2, 1, 1),
            ([2, 8, 11, 10], 6, 3, 3, 2, 0, 2, 2),
        ];
        for (xs, co, kh, kw, s, p, d, g) in cases {
            let prm = Conv2dParams {
                stride: s,
                padding: p,
                dilation: d,
                groups: g,
            };
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, &xs[..], &dev)?)?;
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (co, xs[1] / g, kh, kw), &dev)?)?;
            let geom = Geom::new("test", x.dims(), w.dims(), &prm)?;
            let y = crate::conv2d(&x, &w, None, &prm)?;
            let dy = Tensor::randn(0f32, 1.0, y.dims(), &dev)?;
            let fast = (&y * &dy)?.sum_all()?.backward()?;
            let yc = fallback_forward(&x, &w, geom)?;
            let comp = (&yc * &dy)?.sum_all()?.backward()?;
            let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
            };
            assert!(diff(&y, &yc)? < 1e-4, "y {xs:?} {prm:?}");
            for (what, v) in [("dx", x.as_tensor()), ("dw", w.as_tensor())] {
                let e = diff(fast.get(v).unwrap(), comp.get(v).unwrap())?;
                assert!(e < 1e-4, "{what} {xs:?} {prm:?}: max err {e}");
            }
        }
        Ok(())
    }
}
