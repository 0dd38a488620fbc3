//! Fused Group Normalization (Wu & He, 2018, "Group Normalization", arXiv:1803.08494),
//! optionally followed by SiLU (Elfwing, Uchibe & Doya, 2018, "Sigmoid-Weighted Linear Units
//! for Neural Network Function Approximation in Reinforcement Learning", arXiv:1702.03118).
//!
//! `y = act((x - mean_{n,g}) / sqrt(var_{n,g} + eps) * weight_c + bias_c)`, with the biased
//! variance over the `C / G` channels and all spatial positions of group `g` of sample `n`
//! (PyTorch's `torch.nn.functional.group_norm`), `act` = SiLU (`z * sigmoid(z)`) or identity.
//!
//! # Contract (shared with the CUDA implementation in `crate::cuda::group_norm`)
//! - Forward: [`GroupNormOp`] is a `CustomOp3` on `(x, weight, bias)` with x contiguous
//!   `(N, C, *)`, weight and bias contiguous `(C,)`, all of one dtype (f32, f16 or bf16).
//!   Statistics and arithmetic are `f32` (CPU partial sums `f64`); output has x's dtype.
//! - Backward: [`GroupNormBwdOp`] is a `CustomOp3` on `(x, wb, dy)` with
//!   `wb = stack([weight, bias])` of shape `(2, C)` and dy contiguous with x's shape. It
//!   returns ONE flat tensor of `numel(x) + 2 C` elements in x's dtype:
//!   `[dx (x's layout), dweight (C), dbias (C)]`, which `GroupNormOp::bwd` narrows.
//! - mean and rstd are **recomputed** in the backward, not cached: a `CustomOp` has no
//!   place for hidden state (the forward returns one tensor, and a second output would have
//!   to be threaded through autograd), and recomputing costs one extra pass over x. On CPU the
//!   backward's later passes over a group then hit in cache whenever the group's x and dy fit in
//!   L2 (64 KiB each at (8, 128, 64, 64) with 32 groups).
//! - `GroupNormBwdOp` has no backward of its own (no double backward): differentiating
//!   through it returns `BackwardNotSupported` instead of silently dropping gradients.
//!
//! # Edge semantics
//! - x must have rank >= 2; a rank-2 `(N, C)` input is a spatial size of 1 (like PyTorch).
//! - A constant group has variance 0, so `rstd = 1 / sqrt(eps)` and the normalized value is
//!   0 (output `act(bias)`); with `eps = 0` it is NaN, as in PyTorch.
//! - NaN in x makes the output of its whole group NaN; NaN in weight/bias affects its channel.
//! - Non-contiguous x, weight or bias are copied to a contiguous layout first.
//! - Empty inputs (N = 0 or a zero spatial dim) give empty outputs and zero dweight/dbias.

use crate::cpu::group_norm::{backward, forward, plan_chunks, GnCall, GnDims};
use crate::cpu::{float_op, Elem, FloatOp, Isa};
use candle::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

/// Forward op on `(x, weight, bias)`; see the module docs for the contract.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupNormOp {
    pub(crate) num_groups: usize,
    pub(crate) eps: f32,
    pub(crate) silu: bool,
}

/// Backward op on `(x, wb, dy)` returning `[dx, dweight, dbias]` flattened, for the forward
/// op it holds; see the module docs for the contract.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupNormBwdOp(GroupNormOp);

impl GroupNormOp {
    /// The options of the CUDA launch code, with `op` as the name in its errors.
    #[cfg(feature = "cuda")]
    fn cuda_opts<'a>(&self, op: &'a str) -> crate::cuda::group_norm::Opts<'a> {
        crate::cuda::group_norm::Opts {
            op,
            num_groups: self.num_groups,
            eps: self.eps,
            silu: self.silu,
        }
    }
}

fn op_name(silu: bool) -> &'static str {
    if silu {
        "group_norm_silu"
    } else {
        "group_norm"
    }
}

/// The largest divisor of `c` that is at most 32 (the usual GroupNorm group count).
fn suggest_groups(c: usize) -> usize {
    (1..=c.min(32))
        .rev()
        .find(|g| c.is_multiple_of(*g))
        .unwrap_or(1)
}

/// Checks a GroupNorm call and returns `(N, C, HW)`. Every message names the op, the
/// offending values and the fix.
fn check(
    op: &str,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    num_groups: usize,
    eps: f64,
) -> Result<(usize, usize, usize)> {
    let dtype = x.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        bail!("{op}: unsupported dtype {dtype:?} for x; supported: f32, f16, bf16 (convert with x.to_dtype(DType::F32))")
    }
    let dims = x.dims();
    if dims.len() < 2 {
        bail!("{op}: x must have shape (N, C, *) with rank >= 2, got {dims:?}; add a batch dim with x.unsqueeze(0)")
    }
    let (n, c) = (dims[0], dims[1]);
    if num_groups == 0 || c % num_groups != 0 {
        let s = suggest_groups(c);
        bail!("{op}: num_groups ({num_groups}) must divide num_channels ({c}); try num_groups = {s} (the largest divisor of {c} that is <= 32)")
    }
    for (what, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [c] {
            bail!("{op}: {what} must have shape ({c},) to match x's {c} channels (x: {dims:?}), got {:?}", t.dims())
        }
        if t.dtype() != dtype {
            bail!("{op}: {what} dtype {:?} must match x dtype {dtype:?}; convert with {what}.to_dtype(x.dtype())", t.dtype())
        }
        if !t.device().same_device(x.device()) {
            bail!("{op}: {what} is on {:?} but x is on {:?}; move it with {what}.to_device(x.device())", t.device().location(), x.device().location())
        }
    }
    if !(eps.is_finite() && eps >= 0.0) {
        bail!("{op}: eps must be finite and >= 0, got {eps}; the usual value is 1e-5")
    }
    Ok((n, c, dims[2..].iter().product()))
}

fn apply(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    num_groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    check(op_name(silu), x, weight, bias, num_groups, eps)?;
    let op = GroupNormOp {
        num_groups,
        eps: eps as f32,
        silu,
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// Fused `silu(group_norm(x))`: one pass structure forward and a fused backward.
///
/// Differentiable with respect to x, weight and bias through candle's autograd. Statistics
/// are computed in `f32` for every dtype; mean and rstd are recomputed in the backward
/// (see the module docs). Non-contiguous inputs are copied to contiguous first. On the CPU
/// the kernels run the instruction set of [`crate::cpu_isa`] (AVX-512, AVX2+FMA or the
/// baseline, all bit-identical).
///
/// # Shapes
/// - x: `(N, C, *)`, rank >= 2 (`(N, C)` means a spatial size of 1); f32, f16 or bf16.
/// - weight, bias: `(C,)`, same dtype and device as x.
/// - output: x's shape and dtype.
///
/// # Errors
/// `num_groups` not dividing C (the message suggests the largest divisor of C <= 32),
/// weight/bias of the wrong shape, dtype or device, `eps` negative or not finite, rank < 2,
/// or an unsupported dtype. On the CPU, also when the `KEEL_CPU_ISA` environment variable
/// is not `base`, `avx2` or `avx512`, or names a level this CPU lacks (the message says
/// what it has); see [`crate::cpu_isa`].
///
/// # Example
/// ```
/// use candle::{Device, Tensor};
/// let dev = Device::Cpu;
/// let x = Tensor::randn(0f32, 1.0, (2, 6, 4, 4), &dev)?;
/// let (w, b) = (Tensor::ones(6, candle::DType::F32, &dev)?, Tensor::zeros(6, candle::DType::F32, &dev)?);
/// let y = keel_kernels::group_norm_silu(&x, &w, &b, 3, 1e-5)?;
/// let reference = keel_kernels::group_norm_silu_slow(&x, &w, &b, 3, 1e-5)?;
/// let diff = (y - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-5);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn group_norm_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    num_groups: usize,
    eps: f64,
) -> Result<Tensor> {
    apply(x, weight, bias, num_groups, eps, true)
}

/// Fused `group_norm(x)` (no activation), with a fused backward.
///
/// Same contract as [`group_norm_silu`] without the SiLU.
///
/// # Shapes
/// - x: `(N, C, *)`, rank >= 2; f32, f16 or bf16.
/// - weight, bias: `(C,)`, same dtype and device as x.
/// - output: x's shape and dtype.
///
/// # Errors
/// As [`group_norm_silu`].
///
/// # Example
/// ```
/// use candle::{Device, Tensor, Var};
/// let dev = Device::Cpu;
/// let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 4, 3, 5), &dev)?)?;
/// let w = Var::ones(4, candle::DType::F32, &dev)?;
/// let b = Var::zeros(4, candle::DType::F32, &dev)?;
/// let y = keel_kernels::group_norm(&x, &w, &b, 2, 1e-5)?;
/// // Each group is normalized: per-group mean ~0.
/// let m = y.reshape((1, 2, 30))?.mean(2)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(m < 1e-5);
/// let grads = y.sqr()?.sum_all()?.backward()?;
/// assert!(grads.get(&x).is_some() && grads.get(&w).is_some() && grads.get(&b).is_some());
/// # Ok::<(), candle::Error>(())
/// ```
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    num_groups: usize,
    eps: f64,
) -> Result<Tensor> {
    apply(x, weight, bias, num_groups, eps, false)
}

fn slow(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    num_groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let name = if silu {
        "group_norm_silu_slow"
    } else {
        "group_norm_slow"
    };
    let (n, c, hw) = check(name, x, weight, bias, num_groups, eps)?;
    let dims = x.dims();
    let xf = x
        .to_dtype(DType::F32)?
        .reshape((n, num_groups, (c / num_groups) * hw))?;
    let mean = xf.mean_keepdim(2)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(2)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    let xhat = xc.broadcast_mul(&rstd)?.reshape(dims)?;
    let mut wdims = vec![1; dims.len()];
    wdims[1] = c;
    let w = weight.to_dtype(DType::F32)?.reshape(wdims.as_slice())?;
    let b = bias.to_dtype(DType::F32)?.reshape(wdims.as_slice())?;
    let y = xhat.broadcast_mul(&w)?.broadcast_add(&b)?;
    let y = if silu { y.silu()? } else { y };
    y.to_dtype(x.dtype())
}

/// Reference `silu(group_norm(x))` composed from candle tensor ops (f32 statistics, two-pass
/// variance), differentiable through candle's autograd. Slow (about fifteen kernels and
/// several x-sized temporaries); tests use it as the reference for [`group_norm_silu`].
///
/// # Shapes
/// As [`group_norm_silu`].
///
/// # Example
/// ```
/// use candle::{Device, Tensor};
/// let dev = Device::Cpu;
/// let x = Tensor::new(&[[1f32, 3.0]], &dev)?; // (N, C) = (1, 2): one group of 2 values
/// let (w, b) = (Tensor::ones(2, candle::DType::F32, &dev)?, Tensor::zeros(2, candle::DType::F32, &dev)?);
/// let y = keel_kernels::group_norm_silu_slow(&x, &w, &b, 1, 0.0)?.to_vec2::<f32>()?;
/// let silu = |z: f32| z / (1.0 + (-z).exp());
/// assert!((y[0][0] - silu(-1.0)).abs() < 1e-6 && (y[0][1] - silu(1.0)).abs() < 1e-6);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn group_norm_silu_slow(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    num_groups: usize,
    eps: f64,
) -> Result<Tensor> {
    slow(x, weight, bias, num_groups, eps, true)
}

/// Reference `group_norm(x)` composed from candle tensor ops (f32 statistics, two-pass
/// variance), differentiable; tests use it as the reference for [`group_norm`].
///
/// # Shapes
/// As [`group_norm`].
///
/// # Example
/// ```
/// use candle::{Device, Tensor};
/// let dev = Device::Cpu;
/// let x = Tensor::new(&[[1f32, 3.0, 5.0, 5.0]], &dev)?; // 2 groups of 2 channels
/// let (w, b) = (Tensor::ones(4, candle::DType::F32, &dev)?, Tensor::zeros(4, candle::DType::F32, &dev)?);
/// let y = keel_kernels::group_norm_slow(&x, &w, &b, 2, 1e-5)?.to_vec2::<f32>()?;
/// // First group normalizes to -1, 1; the constant second group to 0.
/// assert!((y[0][0] + 1.0).abs() < 1e-4 && (y[0][1] - 1.0).abs() < 1e-4);
/// assert_eq!(&y[0][2..], &[0.0, 0.0]);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn group_norm_slow(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    num_groups: usize,
    eps: f64,
) -> Result<Tensor> {
    slow(x, weight, bias, num_groups, eps, false)
}

/// `GnDims` for a contiguous x layout, re-validated (the op may be applied by crate code
/// that skipped [`check`]; errors instead of panics).
fn cpu_dims(op: &str, l: &Layout, num_groups: usize, c_len: usize) -> Result<GnDims> {
    let dims = l.shape().dims();
    if dims.len() < 2 || num_groups == 0 || !dims[1].is_multiple_of(num_groups) || dims[1] != c_len
    {
        bail!("{op}: invalid x shape {dims:?} for {num_groups} groups and {c_len} channels")
    }
    let d = GnDims {
        n: dims[0],
        c: dims[1],
        hw: dims[2..].iter().product(),
        groups: num_groups,
    };
    Ok(d)
}

/// One CPU GroupNorm call: the forward on `(x, weight, bias)` or the backward on
/// `(x, wb, dy)`, for any float element type, with the instruction set it runs.
struct CpuCall {
    d: GnDims,
    gn: GroupNormOp,
    backward: bool,
    isa: Isa,
}

impl FloatOp<3> for CpuCall {
    /// Runs on rayon's global pool with `k` chunks per group for its thread count. (Running
    /// inside candle's private pool via `Device::with_context` measured about 2x slower for
    /// the (2, 64, 64, 64) forward on the 2-core bench machine.)
    fn run<T: Elem + WithDType>(&self, [x, p, q]: [&[T]; 3]) -> Result<CpuStorage> {
        let d = self.d;
        let call = GnCall {
            d,
            eps: self.gn.eps,
            silu: self.gn.silu,
            k: plan_chunks(
                d.n * d.groups,
                (d.c / d.groups) * d.hw,
                rayon::current_num_threads(),
            ),
            isa: self.isa,
        };
        let out = if self.backward {
            backward(x, p, q, call)
        } else {
            forward(x, p, q, call)
        };
        Ok(T::to_cpu_storage_owned(out))
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        op_name(self.silu)
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
        let op = self.name();
        let d = cpu_dims(op, l1, self.num_groups, l2.shape().elem_count())?;
        if l3.shape().elem_count() != d.c {
            bail!(
                "{op}: bias has {} elements, expected {}",
                l3.shape().elem_count(),
                d.c
            )
        }
        let call = CpuCall {
            d,
            gn: *self,
            backward: false,
            isa: Isa::current(op)?,
        };
        let operands = [("x", s1, l1), ("weight", s2, l2), ("bias", s3, l3)];
        Ok((float_op(op, operands, &call)?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
        s3: &candle::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let o = self.cuda_opts(self.name());
        crate::cuda::group_norm::fwd(o, (s1, l1, s2, l2, s3, l3))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let wb = Tensor::stack(&[weight, bias], 0)?;
        let dy = grad_res.contiguous()?;
        let packed = x.contiguous()?.apply_op3(&wb, &dy, GroupNormBwdOp(*self))?;
        let (numel, c) = (x.elem_count(), weight.elem_count());
        let dx = packed.narrow(0, 0, numel)?.reshape(x.shape())?;
        let dweight = packed.narrow(0, numel, c)?.reshape(weight.shape())?;
        let dbias = packed.narrow(0, numel + c, c)?.reshape(bias.shape())?;
        Ok((Some(dx), Some(dweight), Some(dbias)))
    }
}

impl CustomOp3 for GroupNormBwdOp {
    fn name(&self) -> &'static str {
        if self.0.silu {
            "group_norm_silu_bwd"
        } else {
            "group_norm_bwd"
        }
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
        let op = self.name();
        let c2 = l2.shape().elem_count();
        let d = cpu_dims(op, l1, self.0.num_groups, c2 / 2)?;
        if c2 != 2 * d.c || l3.shape() != l1.shape() {
            bail!(
                "{op}: expected wb of {} elements and dy of shape {:?}, got {c2} and {:?}",
                2 * d.c,
                l1.shape(),
                l3.shape()
            )
        }
        let call = CpuCall {
            d,
            gn: self.0,
            backward: true,
            isa: Isa::current(op)?,
        };
        let operands = [("x", s1, l1), ("wb", s2, l2), ("dy", s3, l3)];
        let out = float_op(op, operands, &call)?;
        Ok((out, Shape::from(l1.shape().elem_count() + 2 * d.c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
        s3: &candle::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let o = self.0.cuda_opts(self.name());
        crate::cuda::group_norm::bwd(o, (s1, l1, s2, l2, s3, l3))
    }

    // `bwd` is not implemented: candle's default returns `BackwardNotSupported`, so double
    // backward through GroupNorm fails loudly instead of dropping gradients.
}

#[cfg(test)]
mod tests {
    use super::suggest_groups;

    #[test]
    fn suggested_group_counts_divide() {
        assert_eq!(suggest_groups(48), 24);
        assert_eq!(suggest_groups(64), 32);
        assert_eq!(suggest_groups(37), 1);
        assert_eq!(suggest_groups(30), 30);
        assert_eq!(suggest_groups(0), 1);
    }
}
