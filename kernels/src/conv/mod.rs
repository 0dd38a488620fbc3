//! 2D convolution (cross-correlation, as in PyTorch's `torch.nn.functional.conv2d`) with
//! stride, padding, dilation and groups, differentiable with respect to input, weight and
//! bias through dedicated backward-data and backward-filter ops.
//!
//! # Contract
//! - Forward: [`op::ConvOp`] of kind `Forward` is a `CustomOp2` on `(x, w)`, x contiguous
//!   `(N, C_in, H, W)`, w contiguous `(C_out, C_in / groups, kH, kW)`, one dtype (f32, f16
//!   or bf16); arithmetic and accumulation in `f32`; the output has x's dtype.
//! - Its `bwd` runs the same op with kind `BackwardData` (on `(dy, w)`, returning dx) and
//!   `BackwardFilter` (on `(x, dy)`, returning dw). Neither has a backward of its own (no
//!   double backward: `BackwardNotSupported`).
//! - The bias is added with a broadcast candle op, so its gradient (the sum of dy over
//!   N, H, W) comes from candle's autograd.
//! - candle's own conv backward is never used (it fails for stride > 1 when rows and
//!   columns leave different remainders, e.g. a 7x8 input at stride 2).
//!
//! # Devices
//! - CPU: im2col + GEMM on the `gemm` crate (see `crate::conv::cpu`), parallel over
//!   `(sample, group)` tasks with rayon, or inside the GEMM when there are too few tasks;
//!   a 1x1 stride-1 unpadded convolution is a plain GEMM on x.
//! - CUDA (keel's `cuda` feature, which always includes cuDNN): cuDNN forward,
//!   backward-data and backward-filter (see `crate::cuda::conv` for the algorithm choice,
//!   the fallback on failure, the deterministic mode, the workspace cap and the math modes).
//!
//! # Edge semantics
//! - Non-contiguous x or w are copied to a contiguous layout first.
//! - Empty batches (N = 0) give empty outputs and a zero weight gradient.

// The policy is plain Rust (tested on every machine); only the CUDA path calls it.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) mod algo;
mod cpu;
mod op;
mod params;

pub(crate) use op::Kind;

pub use params::Conv2dParams;

use candle::{bail, DType, Result, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

static TF32: AtomicBool = AtomicBool::new(false);

/// Allows (or forbids) TF32 tensor-core math for **f32** convolutions on CUDA with the
/// `cuda` feature: about 2-3x faster on Ampere and later, with a 10-bit mantissa for the
/// products (PyTorch's `torch.backends.cudnn.allow_tf32`). Off by default, as in candle;
/// PyTorch's default is the opposite (`allow_tf32` is True for cuDNN convolutions), so a
/// benchmark compares keel's f32 with PyTorch's TF32 off, and TF32 with TF32.
/// Process-wide; takes effect at the next call. f16/bf16 always use tensor cores, and the
/// CPU kernels ignore it.
///
/// # Example
/// ```
/// keel_kernels::set_conv_tf32(true);
/// assert!(keel_kernels::conv_tf32());
/// keel_kernels::set_conv_tf32(false);
/// ```
pub fn set_conv_tf32(enabled: bool) {
    TF32.store(enabled, Ordering::Relaxed);
}

/// Whether TF32 is allowed for f32 cuDNN convolutions (see [`set_conv_tf32`]).
pub fn conv_tf32() -> bool {
    TF32.load(Ordering::Relaxed)
}

static DETERMINISTIC: AtomicBool = AtomicBool::new(false);

/// Restricts CUDA convolutions to deterministic cuDNN algorithms (no atomics in
/// backward-data and backward-filter), so that two runs with one seed give bitwise identical
/// weights on the GPU too (PyTorch's `torch.backends.cudnn.deterministic`). Off by default,
/// as in PyTorch: the fastest backward algorithms are often the non-deterministic ones.
/// Process-wide; takes effect at the next call (the algorithm cache is keyed by the mode).
/// A geometry with no deterministic algorithm that fits the workspace cap is an error
/// naming the op. The CPU kernels are always deterministic and ignore it.
///
/// # Example
/// ```
/// keel_kernels::set_conv_deterministic(true);
/// assert!(keel_kernels::conv_deterministic());
/// keel_kernels::set_conv_deterministic(false);
/// ```
pub fn set_conv_deterministic(enabled: bool) {
    DETERMINISTIC.store(enabled, Ordering::Relaxed);
}

/// Whether CUDA convolutions are restricted to deterministic algorithms (see
/// [`set_conv_deterministic`]).
pub fn conv_deterministic() -> bool {
    DETERMINISTIC.load(Ordering::Relaxed)
}

/// The full geometry of one convolution call, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Geom {
    pub(crate) n: usize,
    pub(crate) c_in: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) c_out: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
    pub(crate) dilation: usize,
    pub(crate) groups: usize,
}

impl Geom {
    /// Validates `(N, C_in, H, W)` and `(C_out, C_in / groups, kH, kW)` against `p`; every
    /// message names `op`, the values and the fix.
    pub(crate) fn new(op: &str, x: &[usize], w: &[usize], p: &Conv2dParams) -> Result<Self> {
        let &[n, c_in, h, wd] = x else {
            bail!("{op}: x must have shape (N, C_in, H, W), got {x:?}; add a batch dim with x.unsqueeze(0)")
        };
        let &[c_out, c_in_g, kh, kw] = w else {
            bail!("{op}: weight must have shape (C_out, C_in / groups, kH, kW), got {w:?}")
        };
        let Conv2dParams {
            stride,
            padding,
            dilation,
            groups,
        } = *p;
        if stride == 0 || dilation == 0 || groups == 0 {
            bail!("{op}: stride ({stride}), dilation ({dilation}) and groups ({groups}) must all be >= 1")
        }
        if c_in % groups != 0 || c_out % groups != 0 {
            bail!("{op}: groups ({groups}) must divide both the input channels ({c_in}) and the output channels ({c_out}); use a groups value that divides both (depthwise: groups = C_in)")
        }
        if c_in_g * groups != c_in {
            bail!("{op}: input has {c_in} channels but the weight {w:?} expects {} ({c_in_g} per group x {groups} groups); the weight's dim 1 must be C_in / groups = {}", c_in_g * groups, c_in / groups)
        }
        if kh == 0 || kw == 0 || c_out == 0 || c_in == 0 {
            bail!("{op}: the weight {w:?} and x {x:?} must have non-zero channels and kernel size")
        }
        let out = |what: &str, size: usize, k: usize| -> Result<usize> {
            let eff = dilation * (k - 1) + 1;
            let padded = size + 2 * padding;
            if padded < eff {
                bail!("{op}: the (dilated) kernel {what} {eff} (kernel {k}, dilation {dilation}) is larger than the padded input {what} {padded} (input {size} + 2 x padding {padding}); use a larger input, more padding or a smaller kernel")
            }
            Ok((padded - eff) / stride + 1)
        };
        let oh = out("height", h, kh)?;
        let ow = out("width", wd, kw)?;
        Ok(Self {
            n,
            c_in,
            h,
            w: wd,
            c_out,
            kh,
            kw,
            oh,
            ow,
            stride,
            padding,
            dilation,
            groups,
        })
    }

    /// Input channels per group.
    pub(crate) fn cg(&self) -> usize {
        self.c_in / self.groups
    }

    /// Output channels per group.
    pub(crate) fn og(&self) -> usize {
        self.c_out / self.groups
    }

    /// GEMM depth: `C_in / groups * kH * kW`.
    pub(crate) fn k(&self) -> usize {
        self.cg() * self.kh * self.kw
    }

    pub(crate) fn x_dims(&self) -> [usize; 4] {
        [self.n, self.c_in, self.h, self.w]
    }

    pub(crate) fn w_dims(&self) -> [usize; 4] {
        [self.c_out, self.cg(), self.kh, self.kw]
    }

    pub(crate) fn y_dims(&self) -> [usize; 4] {
        [self.n, self.c_out, self.oh, self.ow]
    }

    /// Whether the convolution is a plain GEMM on x (1x1 kernel, stride 1, no padding).
    pub(crate) fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }
}

/// Checks dtypes and devices shared by the public entry points.
fn check_tensors(op: &str, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<()> {
    let dtype = x.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        bail!("{op}: unsupported dtype {dtype:?} for x; supported: f32, f16, bf16 (convert with x.to_dtype(DType::F32))")
    }
    if w.dtype() != dtype {
        bail!("{op}: weight dtype {:?} must match x dtype {dtype:?}; convert with w.to_dtype(x.dtype())", w.dtype())
    }
    if !w.device().same_device(x.device()) {
        bail!(
            "{op}: weight is on {:?} but x is on {:?}; move it with w.to_device(x.device())",
            w.device().location(),
            x.device().location()
        )
    }
    if let Some(b) = bias {
        if b.dims() != [w.dims().first().copied().unwrap_or(0)] {
            bail!(
                "{op}: bias must have shape (C_out,) = ({},), got {:?}",
                w.dims().first().copied().unwrap_or(0),
                b.dims()
            )
        }
        if !b.device().same_device(x.device()) {
            bail!(
                "{op}: bias is on {:?} but x is on {:?}; move it with bias.to_device(x.device())",
                b.device().location(),
                x.device().location()
            )
        }
    }
    Ok(())
}

fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        None => Ok(y),
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?.reshape((1, (), 1, 1))?),
    }
}

/// 2D convolution `y = conv(x, w) + bias`, differentiable with respect to x, w and bias.
///
/// Cross-correlation as in PyTorch's `F.conv2d`: `y[n, o, i, j] = bias[o] + sum_{c, a, b}
/// w[o, c, a, b] * x[n, g * C_in/G + c, i * s - p + a * d, j * s - p + b * d]` with
/// `g = o / (C_out / G)` and zero padding. f16 and bf16 inputs are computed with `f32`
/// accumulation and rounded once. The backward runs keel's dedicated backward-data and
/// backward-filter kernels (see the module docs; candle's conv backward is never used).
///
/// On CUDA (keel's `cuda` feature) all three directions run on cuDNN.
///
/// # Shapes
/// - x: `(N, C_in, H, W)`; f32, f16 or bf16.
/// - w: `(C_out, C_in / groups, kH, kW)`, x's dtype and device.
/// - bias: `(C_out,)` (any float dtype, cast to x's).
/// - output: `(N, C_out, H_out, W_out)`, `H_out = (H + 2p - d (kH - 1) - 1) / s + 1`
///   (same for W), x's dtype.
///
/// # Errors
/// Channels not divisible by groups, a weight whose dim 1 is not `C_in / groups`, a dilated
/// kernel larger than the padded input, stride/dilation/groups of 0, mismatched dtypes or
/// devices, a bias of the wrong shape, or an unsupported dtype.
///
/// # Example
/// ```
/// use candle::{Device, Tensor, Var};
/// use keel_kernels::{conv2d, Conv2dParams};
/// let dev = Device::Cpu;
/// let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 4, 7, 8), &dev)?)?;
/// let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (6, 2, 3, 3), &dev)?)?;
/// let b = Var::zeros(6, candle::DType::F32, &dev)?;
/// let p = Conv2dParams { stride: 2, padding: 1, groups: 2, ..Default::default() };
/// let y = conv2d(&x, &w, Some(&b), &p)?;
/// assert_eq!(y.dims(), &[1, 6, 4, 4]);
/// let reference = keel_kernels::conv2d_slow(&x, &w, Some(&b), &p)?;
/// assert!((&y - reference)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-4);
/// // A 7x8 input at stride 2: candle's own conv backward fails here, this one does not.
/// let grads = y.sqr()?.sum_all()?.backward()?;
/// assert_eq!(grads.get(&x).unwrap().dims(), &[1, 4, 7, 8]);
/// assert_eq!(grads.get(&w).unwrap().dims(), &[6, 2, 3, 3]);
/// assert_eq!(grads.get(&b).unwrap().dims(), &[6]);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: &Conv2dParams) -> Result<Tensor> {
    const OP: &str = "conv2d";
    check_tensors(OP, x, w, bias)?;
    let geom = Geom::new(OP, x.dims(), w.dims(), p)?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let y = x.apply_op2(
        &w,
        op::ConvOp {
            geom,
            kind: Kind::Forward,
        },
    )?;
    add_bias(y, bias)
}

/// Reference 2D convolution composed from candle's conv2d on an explicitly zero-padded input
/// cropped to the rows and columns the convolution reads, so that candle's autograd gives
/// exact gradients for every size (its conv backward is only wrong when the two dimensions
/// leave different remainders, which the crop removes). Slow; tests use it as the reference
/// for [`conv2d`].
///
/// # Shapes
/// As [`conv2d`].
///
/// # Example
/// ```
/// use candle::{Device, Tensor};
/// let dev = Device::Cpu;
/// let x = Tensor::ones((1, 1, 3, 3), candle::DType::F32, &dev)?;
/// let w = Tensor::ones((1, 1, 3, 3), candle::DType::F32, &dev)?;
/// let p = keel_kernels::Conv2dParams { padding: 1, ..Default::default() };
/// let y = keel_kernels::conv2d_slow(&x, &w, None, &p)?.flatten_all()?.to_vec1::<f32>()?;
/// assert_eq!(y, [4.0, 6.0, 4.0, 6.0, 9.0, 6.0, 4.0, 6.0, 4.0]);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn conv2d_slow(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: &Conv2dParams,
) -> Result<Tensor> {
    const OP: &str = "conv2d_slow";
    check_tensors(OP, x, w, bias)?;
    let g = Geom::new(OP, x.dims(), w.dims(), p)?;
    let used_h = (g.oh - 1) * g.stride + g.dilation * (g.kh - 1) + 1;
    let used_w = (g.ow - 1) * g.stride + g.dilation * (g.kw - 1) + 1;
    let xp = x
        .pad_with_zeros(2, g.padding, g.padding)?
        .pad_with_zeros(3, g.padding, g.padding)?
        .narrow(2, 0, used_h)?
        .narrow(3, 0, used_w)?;
    let y = xp.conv2d(w, 0, g.stride, g.dilation, g.groups)?;
    add_bias(y, bias)
}
