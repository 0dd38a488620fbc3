//! The resize CPU ops: forward (gather from the taps) and backward (scatter onto the taps),
//! one `(H, W)` plane per rayon task. See the parent module's contract.

use super::{taps, Mode, Tap};
use crate::cpu::{float_op, Elem, FloatOp};
use candle::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Forward op: resize x `(N, C, H, W)` to `(N, C, out.0, out.1)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ResizeOp {
    pub(crate) mode: Mode,
    pub(crate) out: (usize, usize),
}

/// Backward op: dy `(N, C, oh, ow)` to dx `(N, C, inp.0, inp.1)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ResizeBwdOp {
    mode: Mode,
    inp: (usize, usize),
}

/// The four dims of a contiguous layout, or an error naming the op.
fn dims4(op: &str, l: &Layout) -> Result<[usize; 4]> {
    match (l.shape().dims(), l.contiguous_offsets()) {
        (&[n, c, h, w], Some(_)) if h > 0 && w > 0 => Ok([n, c, h, w]),
        (d, _) => {
            bail!("{op}: expected a contiguous (N, C, H, W) input with H, W >= 1, got shape {d:?}")
        }
    }
}

/// One CPU resize call between `(h, w)` planes and `(ty.len(), tx.len())` planes, for any
/// float element type: the forward gather, or with `backward` the adjoint scatter.
struct CpuCall {
    hw: (usize, usize),
    ty: Vec<Tap>,
    tx: Vec<Tap>,
    mode: Mode,
    backward: bool,
}

impl CpuCall {
    /// The call between `hw` planes and `(oh, ow)` planes.
    fn new(mode: Mode, hw: (usize, usize), (oh, ow): (usize, usize), backward: bool) -> Self {
        let (ty, tx) = (taps(mode, oh, hw.0), taps(mode, ow, hw.1));
        CpuCall {
            hw,
            ty,
            tx,
            mode,
            backward,
        }
    }
}

impl FloatOp<1> for CpuCall {
    fn run<T: Elem + WithDType>(&self, [x]: [&[T]; 1]) -> Result<CpuStorage> {
        let (ty, tx) = (&self.ty, &self.tx);
        let out = if self.backward {
            scatter(x, self.hw, ty, tx)
        } else {
            gather(x, self.hw, ty, tx, self.mode)
        };
        Ok(T::to_cpu_storage_owned(out))
    }
}

/// Gathers every plane of `x` (`h x w`) into `(ty.len() x tx.len())` planes.
fn gather<T: WithDType>(
    x: &[T],
    (h, w): (usize, usize),
    ty: &[Tap],
    tx: &[Tap],
    mode: Mode,
) -> Vec<T> {
    let (oh, ow) = (ty.len(), tx.len());
    let mut out = vec![T::from_f64(0.0); x.len() / (h * w) * oh * ow];
    out.par_chunks_mut(oh * ow)
        .zip(x.par_chunks(h * w))
        .for_each(|(o, p)| {
            let v = |y: usize, x: usize| p[y * w + x].to_f64() as f32;
            for (oy, a) in ty.iter().enumerate() {
                for (ox, b) in tx.iter().enumerate() {
                    o[oy * ow + ox] = match mode {
                        Mode::Nearest => p[a.i0 * w + b.i0],
                        Mode::Bilinear => {
                            let r0 = b.l0 * v(a.i0, b.i0) + b.l1 * v(a.i0, b.i1);
                            let r1 = b.l0 * v(a.i1, b.i0) + b.l1 * v(a.i1, b.i1);
                            T::from_f64((a.l0 * r0 + a.l1 * r1) as f64)
                        }
                    };
                }
            }
        });
    out
}

/// Scatters every plane of `dy` (`ty.len() x tx.len()`) onto `h x w` planes (the adjoint
/// of [`gather`]), accumulating in f32.
fn scatter<T: WithDType>(dy: &[T], (h, w): (usize, usize), ty: &[Tap], tx: &[Tap]) -> Vec<T> {
    let (oh, ow) = (ty.len(), tx.len());
    let mut dx = vec![T::from_f64(0.0); dy.len() / (oh * ow) * h * w];
    dx.par_chunks_mut(h * w)
        .zip(dy.par_chunks(oh * ow))
        .for_each(|(d, g)| {
            let mut acc = vec![0f32; h * w];
            for (oy, a) in ty.iter().enumerate() {
                for (ox, b) in tx.iter().enumerate() {
                    let g = g[oy * ow + ox].to_f64() as f32;
                    acc[a.i0 * w + b.i0] += a.l0 * b.l0 * g;
                    acc[a.i0 * w + b.i1] += a.l0 * b.l1 * g;
                    acc[a.i1 * w + b.i0] += a.l1 * b.l0 * g;
                    acc[a.i1 * w + b.i1] += a.l1 * b.l1 * g;
                }
            }
            for (o, a) in d.iter_mut().zip(acc) {
                *o = T::from_f64(a as f64);
            }
        });
    dx
}

impl CustomOp1 for ResizeOp {
    fn name(&self) -> &'static str {
        "keel-resize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        const OP: &str = "resize";
        let [n, c, h, w] = dims4(OP, l)?;
        let (oh, ow) = self.out;
        let call = CpuCall::new(self.mode, (h, w), (oh, ow), false);
        let out = float_op(OP, [("x", s, l)], &call)?;
        Ok((out, Shape::from((n, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let op = ResizeBwdOp {
            mode: self.mode,
            inp: (h, w),
        };
        Ok(Some(grad.contiguous()?.apply_op1(op)?))
    }
}

impl CustomOp1 for ResizeBwdOp {
    fn name(&self) -> &'static str {
        "keel-resize-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        const OP: &str = "resize backward";
        let [n, c, oh, ow] = dims4(OP, l)?;
        let (h, w) = self.inp;
        let call = CpuCall::new(self.mode, (h, w), (oh, ow), true);
        let out = float_op(OP, [("dy", s, l)], &call)?;
        Ok((out, Shape::from((n, c, h, w))))
    }

    /// The adjoint of the adjoint is the forward resize.
    fn bwd(&self, dy: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, oh, ow) = dy.dims4()?;
        let op = ResizeOp {
            mode: self.mode,
            out: (oh, ow),
        };
        Ok(Some(grad.contiguous()?.apply_op1(op)?))
    }
}
