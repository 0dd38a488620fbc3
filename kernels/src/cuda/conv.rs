//! cuDNN convolutions (forward, backward-data, backward-filter) for [`crate::conv2d`],
//! built with keel's `cudnn` feature, through cudarc 0.19's safe `cudnn` bindings.
//!
//! - **Layout**: NCHW tensors and filters, as candle stores them (no transposes); groups
//!   through `cudnnSetConvolutionGroupCount`, so depthwise is one call.
//! - **Precision**: the compute type is `f32` for every dtype (f16/bf16 data accumulate in
//!   f32). Math type: tensor cores (`CUDNN_TENSOR_OP_MATH`) for f16/bf16; for f32,
//!   `CUDNN_FMA_MATH` (true f32, no TF32) unless [`crate::set_conv_tf32`] turned TF32 on,
//!   in which case `CUDNN_TENSOR_OP_MATH` lets cuDNN use TF32 tensor cores. Off by default,
//!   as in candle and PyTorch's `torch.backends.cudnn.allow_tf32 = False`.
//! - **Algorithms**: cuDNN's heuristics (`cudnnGetConvolution*Algorithm_v7`) pick the
//!   algorithm; if it needs more than [`WORKSPACE_CAP`] bytes of workspace (or is rejected),
//!   fixed fallbacks with small workspaces are tried in order. The choice and its workspace
//!   size are cached per (direction, geometry, dtype, math mode, device) for the life of the
//!   process, so each shape pays the heuristic query once.
//! - **Workspace**: allocated per call from the device's stream-ordered allocator (not
//!   zeroed), at most [`WORKSPACE_CAP`] bytes, freed when the call returns.
//! - **Handles**: one cuDNN handle per (thread, device), bound to candle's stream (cuDNN
//!   handles are neither `Send` nor `Sync`).

use super::{poison, poison_outputs};
use crate::conv::{Geom, Kind};
use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::cudnn::sys::{
    cudnnConvolutionBwdDataAlgo_t as DataAlgo, cudnnConvolutionBwdFilterAlgo_t as FilterAlgo,
    cudnnConvolutionFwdAlgo_t as FwdAlgo, cudnnConvolutionMode_t, cudnnMathType_t,
    cudnnTensorFormat_t,
};
use candle::cuda_backend::cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    CudnnError, FilterDescriptor, TensorDescriptor,
};
use candle::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use candle::cuda_backend::{CudaDType, DeviceId};
use candle::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, WithDType};
use half::{bf16, f16};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The most workspace (bytes) one cuDNN convolution call may use: 256 MiB. Algorithms
/// that need more are skipped for a fallback (see the module docs).
pub(crate) const WORKSPACE_CAP: usize = 256 << 20;

#[derive(Clone, Copy, Debug)]
enum Algo {
    Fwd(FwdAlgo),
    Data(DataAlgo),
    Filter(FilterAlgo),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    kind: Kind,
    geom: Geom,
    dtype: DType,
    tf32: bool,
    device: DeviceId,
}

/// `(algorithm, workspace bytes)` per key.
fn cache() -> &'static Mutex<HashMap<Key, (Algo, usize)>> {
    static CACHE: OnceLock<Mutex<HashMap<Key, (Algo, usize)>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
}

fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(dev.cuda_stream())?;
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

/// The first of `candidates` whose workspace is known and within the cap.
fn first_fitting<A: Copy>(
    candidates: impl IntoIterator<Item = std::result::Result<A, CudnnError>>,
    workspace: impl Fn(A) -> std::result::Result<usize, CudnnError>,
) -> Option<(A, usize)> {
    candidates
        .into_iter()
        .filter_map(|a| a.ok())
        .find_map(|a| match workspace(a) {
            Ok(ws) if ws <= WORKSPACE_CAP => Some((a, ws)),
            _ => None,
        })
}

fn dims_i32(op: &str, d: [usize; 4]) -> Result<[i32; 4]> {
    let mut out = [0i32; 4];
    for (o, v) in out.iter_mut().zip(d) {
        *o = match i32::try_from(v) {
            Ok(v) => v,
            Err(_) => bail!("{op} (cudnn): dimension {v} of {d:?} does not fit in i32"),
        };
    }
    Ok(out)
}

/// The descriptors of one call: convolution (f32 compute type), x, w, y.
type Descs<T> = (
    ConvDescriptor<f32>,
    TensorDescriptor<T>,
    FilterDescriptor<T>,
    TensorDescriptor<T>,
);

/// Builds descriptors for data type `T` with an f32 compute type.
fn descs<T: CudnnDataType>(
    op: &str,
    cudnn: &Arc<Cudnn>,
    g: &Geom,
    dtype: DType,
    tf32: bool,
) -> Result<Descs<T>> {
    let i = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
    let mut conv = cudnn.create_conv2d::<f32>(
        [i(g.padding); 2],
        [i(g.stride); 2],
        [i(g.dilation); 2],
        cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
    )?;
    conv.set_group_count(i(g.groups))?;
    let math = match (dtype, tf32) {
        (DType::F32, false) => cudnnMathType_t::CUDNN_FMA_MATH,
        _ => cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    };
    conv.set_math_type(math)?;
    let nchw = cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let x = cudnn.create_4d_tensor::<T>(nchw, dims_i32(op, g.x_dims())?)?;
    let w = cudnn.create_4d_filter::<T>(nchw, dims_i32(op, g.w_dims())?)?;
    let y = cudnn.create_4d_tensor::<T>(nchw, dims_i32(op, g.y_dims())?)?;
    Ok((conv, x, w, y))
}

/// The contiguous view of a storage described by `l`.
fn view<'a, T: CudaDType + DeviceRepr>(
    op: &str,
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("{op} (cudnn): operands must be contiguous (layout {l:?})"),
    }
}

/// Runs convolution `kind` of geometry `g` on `(s1, s2)`: `(x, w)`, `(dy, w)` or `(x, dy)`.
pub(crate) fn run(
    kind: Kind,
    g: &Geom,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    match (s1.dtype(), s2.dtype()) {
        (DType::F32, DType::F32) => launch::<f32>(kind, g, s1, l1, s2, l2),
        (DType::F16, DType::F16) => launch::<f16>(kind, g, s1, l1, s2, l2),
        (DType::BF16, DType::BF16) => launch::<bf16>(kind, g, s1, l1, s2, l2),
        (a, b) => {
            bail!("conv2d (cudnn): operands must be both f32, f16 or bf16, got {a:?} and {b:?}")
        }
    }
}

fn launch<T>(
    kind: Kind,
    g: &Geom,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)>
where
    T: CudaDType + DeviceRepr + ValidAsZeroBits + CudnnDataType + WithDType,
{
    const OP: &str = "conv2d";
    let dev = s1.device().clone();
    let out_dims = match kind {
        Kind::Forward => g.y_dims(),
        Kind::BackwardData => g.x_dims(),
        Kind::BackwardFilter => g.w_dims(),
    };
    let n_out: usize = out_dims.iter().product();
    let shape = Shape::from(&out_dims[..]);
    if g.n == 0 || n_out == 0 {
        // Nothing to convolve: empty outputs, or a zero weight gradient.
        let out = dev.alloc_zeros::<T>(n_out)?;
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
    }
    let a = view::<T>(OP, s1, l1)?;
    let b = view::<T>(OP, s2, l2)?;
    // SAFETY: every element of `out` is written by the cuDNN call below (beta = 0 for all
    // three directions, so the previous contents are never read).
    let mut out = unsafe { dev.alloc::<T>(n_out)? };
    if poison_outputs() {
        poison(
            &dev,
            super::group_norm::MODULE,
            super::group_norm::PTX,
            &out,
        )?;
    }
    let cudnn = handle(&dev)?;
    let tf32 = crate::conv::conv_tf32();
    let (conv, x, w, y) = descs::<T>(OP, &cudnn, g, T::DTYPE, tf32)?;
    let key = Key {
        kind,
        geom: *g,
        dtype: T::DTYPE,
        tf32,
        device: dev.id(),
    };
    let cached = cache().lock().ok().and_then(|c| c.get(&key).copied());
    let one = T::from_f64(1.0);
    let zero = T::from_f64(0.0);
    let pick = |found: Option<(Algo, usize)>| -> Result<(Algo, usize)> {
        match found {
            Some(f) => {
                if let Ok(mut c) = cache().lock() {
                    c.insert(key, f);
                }
                Ok(f)
            }
            None => bail!("{OP} (cudnn): no {kind:?} algorithm fits the {WORKSPACE_CAP}-byte workspace cap for {g:?} in {:?}", T::DTYPE),
        }
    };
    match kind {
        Kind::Forward => {
            let op = ConvForward {
                conv: &conv,
                x: &x,
                w: &w,
                y: &y,
            };
            let (algo, ws) = match cached {
                Some(c) => c,
                None => {
                    use FwdAlgo::*;
                    let cands = [op.pick_algorithm()].into_iter().chain(
                        [
                            CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                            CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                        ]
                        .map(Ok),
                    );
                    pick(
                        first_fitting(cands, |a| op.get_workspace_size(a))
                            .map(|(a, s)| (Algo::Fwd(a), s)),
                    )?
                }
            };
            let Algo::Fwd(algo) = algo else {
                bail!("{OP} (cudnn): algorithm cache mismatch for {key:?}")
            };
            let mut wsb = workspace(&dev, ws)?;
            // SAFETY: `a` is x (N, C_in, H, W), `b` is w (C_out, C_in/G, kH, kW) and `out` is y
            // (N, C_out, H_out, W_out), all contiguous NCHW of dtype T, exactly the
            // descriptors `x`, `w`, `y` built from the same validated geometry; the workspace
            // has the size cuDNN reported for `algo`.
            unsafe {
                op.launch::<CudaSlice<u8>, _, _, _>(
                    algo,
                    wsb.as_mut(),
                    (one, zero),
                    &a,
                    &b,
                    &mut out,
                )
            }?;
        }
        Kind::BackwardData => {
            let op = ConvBackwardData {
                conv: &conv,
                dx: &x,
                w: &w,
                dy: &y,
            };
            let (algo, ws) = match cached {
                Some(c) => c,
                None => {
                    use DataAlgo::*;
                    let cands = [op.pick_algorithm()].into_iter().chain(
                        [
                            CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
                            CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
                        ]
                        .map(Ok),
                    );
                    pick(
                        first_fitting(cands, |a| op.get_workspace_size(a))
                            .map(|(a, s)| (Algo::Data(a), s)),
                    )?
                }
            };
            let Algo::Data(algo) = algo else {
                bail!("{OP} (cudnn): algorithm cache mismatch for {key:?}")
            };
            let mut wsb = workspace(&dev, ws)?;
            // SAFETY: `a` is dy (N, C_out, H_out, W_out), `b` is w and `out` is dx (N, C_in, H,
            // W), contiguous NCHW of dtype T matching the descriptors `y`, `w`, `x`; the
            // workspace has the size cuDNN reported for `algo`.
            unsafe {
                op.launch::<CudaSlice<u8>, _, _, _>(
                    algo,
                    wsb.as_mut(),
                    (one, zero),
                    &mut out,
                    &b,
                    &a,
                )
            }?;
        }
        Kind::BackwardFilter => {
            let op = ConvBackwardFilter {
                conv: &conv,
                x: &x,
                dw: &w,
                dy: &y,
            };
            let (algo, ws) = match cached {
                Some(c) => c,
                None => {
                    use FilterAlgo::*;
                    let cands = [op.pick_algorithm()].into_iter().chain(
                        [
                            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
                            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
                        ]
                        .map(Ok),
                    );
                    pick(
                        first_fitting(cands, |a| op.get_workspace_size(a))
                            .map(|(a, s)| (Algo::Filter(a), s)),
                    )?
                }
            };
            let Algo::Filter(algo) = algo else {
                bail!("{OP} (cudnn): algorithm cache mismatch for {key:?}")
            };
            let mut wsb = workspace(&dev, ws)?;
            // SAFETY: `a` is x, `b` is dy and `out` is dw (C_out, C_in/G, kH, kW), contiguous
            // NCHW of dtype T matching the descriptors `x`, `y`, `w`; the workspace has the
            // size cuDNN reported for `algo`.
            unsafe {
                op.launch::<CudaSlice<u8>, _, _, _>(
                    algo,
                    wsb.as_mut(),
                    (one, zero),
                    &a,
                    &mut out,
                    &b,
                )
            }?;
        }
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

/// An uninitialized workspace of `bytes` bytes (`None` for 0).
fn workspace(dev: &CudaDevice, bytes: usize) -> Result<Option<CudaSlice<u8>>> {
    if bytes == 0 {
        return Ok(None);
    }
    // SAFETY: cuDNN treats the workspace as scratch memory it writes before reading.
    Ok(Some(unsafe { dev.alloc::<u8>(bytes)? }))
}
